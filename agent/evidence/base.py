"""Interfaces between evidence producers (hardware or emulated) and their users (boot, serve).

Kept tiny and dependency-free so emulators can stand in for hardware without touching protocol
logic, and so ``boot``/``serve`` depend on these shapes rather than on concrete sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agent.errors import AgentError, DeadlineError, OverloadedError

REPORT_DATA_LEN = 64


class EvidenceError(AgentError):
    """Base class for evidence failures; ``str(exc)`` is a one-line, operator-readable reason.

    Over HTTP a source that cannot produce evidence is 503 (``agent.errors``: one map of exit codes and
    statuses); the queue's refusals below are 429 and 504.
    """

    http_status = 503


class QuoteSourceError(EvidenceError):
    """A quote could not be produced (the hint names the likely culprit)."""

    def __init__(self, message: str, *, hint: str = "", retryable: bool = False) -> None:
        super().__init__(f"{message} ({hint})" if hint else message)
        self.hint = hint
        self.retryable = retryable


class QueueFullError(OverloadedError, EvidenceError):
    """The hardware queue is at its bound; callers should answer 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(DeadlineError, EvidenceError):
    """The request's deadline passed before its quote was ready."""


class GpuEvidenceError(EvidenceError):
    """GPU evidence or device info could not be collected (NVML error, CC mode off, timeout...)."""


@dataclass(frozen=True)
class TeeEvidence:
    """What one hardware request returned: the TEE ("tdx" or "snp"), the raw evidence (a TDX quote or a
    bare 1184-byte SEV-SNP ATTESTATION_REPORT) and ``aux``, the host's SEV-SNP certificate table (the
    configfs ``auxblob``; ``b""`` when the host gave none, as upstream KVM does, and always on TDX)."""

    tee: str
    raw: bytes
    aux: bytes = b""


@runtime_checkable
class QuoteSource(Protocol):
    """Produces raw evidence whose report data is exactly the 64 bytes given: a TDX quote (``tee = "tdx"``)
    or a bare SEV-SNP attestation report (``tee = "snp"``). Blocking; slow (~1 s on TDX)."""

    name: str
    #: "tdx" or "snp" (:mod:`agent.evidence.tee`): which kind of evidence ``get_quote`` returns.
    tee: str

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
