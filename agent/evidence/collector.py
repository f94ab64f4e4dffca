"""Evidence building blocks shared by ``/v1/evidence``, the compat routes and ``chutes-attest evidence``.

Quote work always goes through the evidence queue (bounded, deadline-aware); the evidence is the quote
source's TEE's (a TDX quote or an SEV-SNP report, named by ``tee`` in ``/v1/evidence``); REPORTDATA is always
``nonce ‖ SHA-256(SPKI of the service cert)`` built by :mod:`agent.evidence.report_data`. Tracks the
health the watchdog needs: the last quote outcome and how long the oldest quote has been in flight.

The compat socket's ``gpu_ids`` rule is the reference service's (sek8s ``_filter_evidence``): filter only
when fewer ids than GPUs are given (duplicates and unknown ids count), keep the GPUs named, in NVML order,
and drop unknown ids silently, possibly down to ``[]``.

Shared by the service and the ``evidence`` command (so the CLI returns exactly what ``/v1/evidence`` does),
hence here, below both.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid as uuid_mod
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.config import AgentConfig
from agent.evidence.base import EvidenceError, GpuEvidenceSource, QueueFullError
from agent.evidence.device_info import GpuIdError, sanitize_uuid
from agent.evidence.own_quote import TDX
from agent.evidence.report_data import parse_nonce
from agent.evidence.service_identity import ServiceCert
from agent.evidence.tpm import collect_tpm_evidence, resolve_tcti
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.evidence.quote_queue import QuoteQueue

log = get_logger(__name__)


@dataclass
class SourceHealth:
    ok: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_ok_at: float = 0.0
    #: v5 quotes the compat socket refused (quote.allow_v5 = false).
    v5_refused: int = 0
    in_flight: dict[int, float] = field(default_factory=dict)

    def oldest_in_flight_s(self, now: float | None = None) -> float:
        if not self.in_flight:
            return 0.0
        now = time.monotonic() if now is None else now
        return now - min(self.in_flight.values())


def quote_version(quote: bytes) -> int:
    """The quote header's version (u16 little-endian at offset 0): 4 or 5 for TDX."""
    return int.from_bytes(quote[:2], "little")


def snp_report_version(report: bytes) -> int:
    """An SEV-SNP attestation report's VERSION (u32 little-endian at offset 0): 2 to 5."""
    return int.from_bytes(report[:4], "little")


def compat_gpu_id(raw: str) -> str | None:
    """One compat ``gpu_ids`` value -> canonical 32-hex id, None when it can name no GPU (dropped).

    As the reference: an id starting with ``GPU`` is compared as an NVML UUID (so ``GPU-a`` simply
    matches nothing); anything else must parse as Python's ``uuid.UUID`` does (bare, hyphenated, braces,
    ``urn:uuid:``), and what does not is malformed (:class:`GpuIdError`, a 400 here, a 500 there).
    """
    if raw[:3].upper() == "GPU":
        text = sanitize_uuid(raw)
        return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) else None
    try:
        return uuid_mod.UUID(raw).hex
    except ValueError:
        shown = raw if len(raw) <= 80 else raw[:80] + "…"
        raise GpuIdError(f"gpu_ids: {shown!r} is not a GPU UUID (expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx "
                         "or a bare UUID)") from None


def _source_tee(queue: object) -> str:
    source = getattr(queue, "source", None) or getattr(queue, "_source", None)
    return str(getattr(source, "tee", TDX))


async def both(quote: Awaitable[bytes], gpu: Awaitable[list[dict[str, Any]]]) -> tuple[bytes, list[dict[str, Any]]]:
    """The TEE quote and the GPU evidence at once (independent hardware, the same nonce): a request takes
    the longer of the two, not their sum. Both are always awaited to the end, so a failure never leaves the
    other's hardware call running unowned (a CLI exiting under a live NVML call aborted the interpreter);
    then the quote's error wins, else the GPUs'."""
    q, g = await asyncio.gather(quote, gpu, return_exceptions=True)
    for result in (q, g):
        if isinstance(result, BaseException):
            raise result
    assert isinstance(q, bytes) and isinstance(g, list)
    return q, g


class Collector:
    """Quote + GPU evidence + device info for one nonce, bound to the service certificate."""

    def __init__(self, cfg: AgentConfig, cert: ServiceCert, queue: QuoteQueue,
                 gpu: GpuEvidenceSource | None, *, tee: str | None = None) -> None:
        self.cfg = cfg
        self.cert = cert
        self.queue = queue
        self.gpu = gpu
        #: The TEE whose evidence :meth:`quote` returns ("tdx" or "snp"): the quote source's (every source
        #: has ``.tee``; one without is a TDX source from before SEV-SNP existed).
        self.tee = tee if tee is not None else _source_tee(queue)
        self.health = SourceHealth()
        self._seq = 0
        self._uuids: list[str] | None = None

    def report_data(self, nonce: bytes) -> bytes:
        """nonce ‖ SHA-256(SPKI of the service cert); the SPKI hash was computed once at start."""
        return parse_nonce(nonce) + self.cert.spki_sha256

    async def quote(self, nonce: bytes, *, caller: str = "") -> bytes:
        """A quote (TDX) or bare attestation report (SEV-SNP) whose REPORTDATA is nonce ‖ SHA-256(SPKI(service
        cert)); errors propagate typed."""
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
        """The nv-attestation-sdk style list for the same nonce; [] when GPUs are off on this node or
        ``gpu_ids`` is an empty selection."""
        if self.gpu is None or gpu_ids == []:
            return []
        return list(await self.gpu.evidence(nonce, gpu_ids))

    async def devices(self, gpu_ids: list[str] | None) -> list[dict[str, Any]]:
        if self.gpu is None or gpu_ids == []:
            return []
        return list(await self.gpu.devices(gpu_ids))

    async def gpu_uuids(self) -> list[str]:
        """Canonical ids of every GPU in NVML order (read once: a VM's GPU set does not change)."""
        if self._uuids is None:
            self._uuids = [sanitize_uuid(d["uuid"]) for d in await self.devices(None)]
        return self._uuids

    async def compat_gpu_selection(self, raw: list[str] | None) -> list[str] | None:
        """The reference's filter on raw compat ids: None = all GPUs, else the known ones named (maybe [])."""
        if raw is None or self.gpu is None:
            return None
        canon = [compat_gpu_id(r) for r in raw]  # a malformed id fails first, as it does there
        uuids = await self.gpu_uuids()
        if len(raw) >= len(uuids):
            return None
        wanted = [u for u in uuids if u in canon]
        dropped = [r[:80] for r, c in zip(raw, canon, strict=True) if c not in uuids]
        if dropped:
            log.debug("compat.gpu_ids_dropped", dropped=dropped, kept=len(wanted), gpus=len(uuids))
        return wanted

    async def evidence(self, nonce: bytes, gpu_ids: list[str] | None, *, caller: str = "") -> dict[str, Any]:
        """The ``/v1/evidence`` document (also what ``chutes-attest evidence --json`` prints)."""
        quote, gpu = await both(self.quote(nonce, caller=caller), self.gpu_evidence(nonce, gpu_ids))
        tpm = None
        # Only hop to a thread (ESAPI blocks) when a TPM can be there at all: no per-request cost otherwise.
        if self.cfg.tpm.mode != "off" and resolve_tcti(self.cfg.tpm) is not None:
            tpm = await asyncio.to_thread(collect_tpm_evidence, self.cfg, nonce)
        return {
            "tee": self.tee,
            "nonce": nonce.hex(),
            "report_data": self.report_data(nonce).hex(),
            "quote_version": quote_version(quote) if self.tee == TDX else snp_report_version(quote),
            "quote": base64.b64encode(quote).decode(),
            "gpu_evidence": gpu,
            "certificate": self.cert.pem,
            "tpm": tpm,
        }
