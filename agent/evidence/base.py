"""Interfaces between evidence producers (hardware or emulated) and their users (boot, serve).

Kept tiny and dependency-free so emulators can stand in for hardware without touching protocol
logic, and so ``boot``/``serve`` depend on these shapes rather than on concrete sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from agent.errors import AgentError

REPORT_DATA_LEN = 64


class EvidenceError(AgentError):
    """Base class for evidence failures; ``str(exc)`` is a one-line, operator-readable reason."""


class QuoteSourceError(EvidenceError):
    """A quote could not be produced (the hint names the likely culprit)."""

    def __init__(self, message: str, *, hint: str = "", retryable: bool = False) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint
        self.retryable = retryable


class QueueFullError(EvidenceError):
    """The hardware queue is at its bound; callers should answer 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EvidenceError):
    """The request's deadline passed before its quote was ready."""


class GpuEvidenceError(EvidenceError):
    """GPU evidence or device info could not be collected (NVML error, CC mode off, timeout...)."""


@runtime_checkable
class QuoteSource(Protocol):
    """Produces a raw TDX quote whose report_data is exactly the 64 bytes given. Blocking; slow (~1 s)."""

    name: str

    def get_quote(self, report_data: bytes) -> bytes: ...


class GpuEmulation(Protocol):
    """An installed NVML emulation (``gpu.emulate``): its simulated GPUs and how to remove it again."""

    @property
    def gpus(self) -> Sequence[object]: ...

    def uninstall(self) -> None: ...


@runtime_checkable
class GpuEvidenceSource(Protocol):
    """NVIDIA GPU evidence and device info, in NVML index order."""

    async def evidence(self, nonce: bytes, gpu_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """``[{"certificate": b64(PEM chain), "evidence": b64(report), "arch": "HOPPER"|"BLACKWELL"}, ...]``."""
        ...

    async def devices(self, gpu_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """``[{"uuid", "name", "memory", "major", "minor", "clock_rate", "ecc", "model_short_ref"}, ...]``."""
        ...
