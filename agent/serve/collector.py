"""Evidence building blocks shared by ``/v1/evidence``, the compat routes and ``chutes-attest evidence``.

Quote work always goes through the evidence queue (bounded, deadline-aware); REPORTDATA is always
``nonce ‖ SHA-256(SPKI of the service cert)`` built by :mod:`agent.evidence.report_data`. Tracks the
health the watchdog needs: the last quote outcome and how long the oldest quote has been in flight.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.evidence.base import EvidenceError, GpuEvidenceSource, QueueFullError
from agent.evidence.report_data import parse_nonce
from agent.evidence.tpm import collect_tpm_evidence, resolve_tcti
from agent.log import get_logger
from agent.serve.service_cert import ServiceCert

log = get_logger(__name__)


@dataclass
class SourceHealth:
    ok: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_ok_at: float = 0.0
    in_flight: dict[int, float] = field(default_factory=dict)

    def oldest_in_flight_s(self, now: float | None = None) -> float:
        if not self.in_flight:
            return 0.0
        now = time.monotonic() if now is None else now
        return now - min(self.in_flight.values())


class Collector:
    """Quote + GPU evidence + device info for one nonce, bound to the service certificate."""

    def __init__(self, cfg: AgentConfig, cert: ServiceCert, queue: Any, gpu: GpuEvidenceSource | None) -> None:
        self.cfg = cfg
        self.cert = cert
        self.queue = queue
        self.gpu = gpu
        self.health = SourceHealth()
        self._seq = 0

    def report_data(self, nonce: bytes) -> bytes:
        """nonce ‖ SHA-256(SPKI of the service cert); the SPKI hash was computed once at start."""
        return parse_nonce(nonce) + self.cert.spki_sha256

    async def quote(self, nonce: bytes, *, caller: str = "") -> bytes:
        """A quote whose REPORTDATA is nonce ‖ SHA-256(SPKI(service cert)); errors propagate typed."""
        rd = self.report_data(nonce)
        self._seq += 1
        seq = self._seq
        self.health.in_flight[seq] = time.monotonic()
        try:
            quote = await self.queue.get(rd, caller=caller)
        except EvidenceError as exc:
            if not isinstance(exc, QueueFullError):  # back-pressure is not a source failure
                self.health.failed += 1
                self.health.consecutive_failures += 1
                self.health.last_error = str(exc)
            raise
        finally:
            self.health.in_flight.pop(seq, None)
        self.health.ok += 1
        self.health.consecutive_failures = 0
        self.health.last_ok_at = time.time()
        return bytes(quote)

    async def gpu_evidence(self, nonce: bytes, gpu_ids: list[str] | None) -> list[dict[str, Any]]:
        """The nv-attestation-sdk style list for the same nonce; [] when GPUs are off on this node."""
        if self.gpu is None:
            return []
        return list(await self.gpu.evidence(nonce, gpu_ids))

    async def devices(self, gpu_ids: list[str] | None) -> list[dict[str, Any]]:
        if self.gpu is None:
            return []
        return list(await self.gpu.devices(gpu_ids))

    async def evidence(self, nonce: bytes, gpu_ids: list[str] | None, *, caller: str = "") -> dict[str, Any]:
        """The ``/v1/evidence`` document (also what ``chutes-attest evidence --json`` prints)."""
        quote = await self.quote(nonce, caller=caller)
        gpu = await self.gpu_evidence(nonce, gpu_ids)
        tpm = None
        # Only hop to a thread (ESAPI blocks) when a TPM can be there at all: no per-request cost otherwise.
        if self.cfg.tpm.mode != "off" and resolve_tcti(self.cfg.tpm) is not None:
            tpm = await asyncio.to_thread(collect_tpm_evidence, self.cfg, nonce)
        return {
            "nonce": nonce.hex(),
            "report_data": self.report_data(nonce).hex(),
            "quote": base64.b64encode(quote).decode(),
            "gpu_evidence": gpu,
            "certificate": self.cert.pem,
            "tpm": tpm,
        }
