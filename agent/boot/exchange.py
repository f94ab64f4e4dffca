"""One attempt of the boot exchange: nonce → REPORTDATA → quote → self-check → attestation.

On SEV-SNP the "quote" is the bare 1184-byte attestation report, sent base64 in the same ``quote``
field (sev-snp.md §0.3: the validator tells the kinds apart by the bytes).

The request shape depends on the generation the VM speaks (reference §4, §10): which host serves
the nonce and whether it takes ``?miner_hotkey=``, whether the body carries ``first_boot``, and
whether the call is signed with the sr25519 request proof. Retrying is :mod:`agent.boot.retrying`'s
business; this module only runs one attempt and records timings and measurements.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from agent.boot.failure import BootFailure
from agent.boot.retrying import CallBudget
from agent.boot.stages import StageTimer
from agent.evidence.base import QuoteSource
from agent.evidence.own_quote import QUOTE_V4, TDX, OwnEvidenceError, check_own_evidence
from agent.evidence.report_data import ReportDataError, build_report_data
from agent.exitcodes import EXIT_VERIFY_FAILED
from agent.validator.client import ValidatorClient, compact_json
from agent.validator.errors import ValidatorProtocolError
from agent.validator.schemas import BootAttestationResponse, NonceResponse


@dataclass
class Shape:
    """How this VM asks for its root key (fixed by configuration and the config volume, before any answer)."""

    nonce_client: ValidatorClient
    attest_client: ValidatorClient
    #: ``?miner_hotkey=`` on the nonce call (1.4.0 on the mTLS front; the baseline client sent it too).
    nonce_query: bool
    #: ``first_boot`` in the body (1.4.0), else None.
    first_boot: bool | None
    #: Signs the call (1.4.0): ``(nonce, body) -> proof headers`` (``proof_headers`` bound to this boot's hotkey),
    #: else None.
    sign: Callable[[str, bytes], dict[str, str]] | None = None


@dataclass
class Exchange:
    """Inputs shared by every attempt."""

    quote_source: QuoteSource
    timer: StageTimer
    budget: CallBudget
    status: dict[str, Any]
    vm_name: str
    hotkey: str
    allow_quote_v5: bool = False
    #: The TEE this guest is ("tdx" or "snp"), resolved by the boot after the network (flow.resolve_tee_stage).
    tee: str = TDX

    async def nonce(self, client: ValidatorClient, query: bool, attempt: int) -> str:
        with self.timer.stage("nonce", attempt=attempt) as st, st.waiting("network"):
            body = await self.budget.bounded("GET /servers/nonce", client.request(
                "GET /servers/nonce", "GET", "/servers/nonce",
                params={"miner_hotkey": self.hotkey} if query else None))
            nonce = NonceResponse.parse(body).nonce
            st.detail = f"nonce {nonce[:8]}… from {client.base_url}"
        return nonce

    async def quote(self, nonce: str, cert: x509.Certificate, attempt: int, stage: str = "quote",
                    record: str = "measurements") -> bytes:
        """A quote over ``nonce ‖ SHA-256(SPKI of cert)``, self-checked before it leaves the VM."""
        with self.timer.stage(stage, attempt=attempt) as st:
            try:
                rd = build_report_data(nonce, cert)
            except ReportDataError as exc:
                raise BootFailure(stage, f"report_data: {exc}") from None
            with st.waiting("quote"):
                raw = await asyncio.to_thread(self.quote_source.get_quote, rd)
            st.detail = f"{len(raw)} bytes from {self.quote_source.name}"
        self.self_check(raw, rd, attempt, record)
        return raw

    def self_check(self, raw: bytes, rd: bytes, attempt: int, record: str = "measurements") -> None:
        """Our own evidence under the one own-evidence policy (:mod:`agent.evidence.own_quote`): REPORTDATA
        as built and debug off; TDX: a v4 quote (the validator's offsets); SEV-SNP: VMPL 0, a signed report."""
        with self.timer.stage("self_check", attempt=attempt) as st:
            try:
                ev = check_own_evidence(raw, rd, tee=self.tee, allow_v5=self.allow_quote_v5)
            except OwnEvidenceError as exc:
                raise BootFailure("self_check", exc.message, EXIT_VERIFY_FAILED) from None
            m = ev.measurements
            if ev.tee == TDX:
                self.status[record] = {
                    "quote_version": ev.version, "mr_td": m["mr_td"], **{f"rtmr{i}": m[f"rtmr{i}"] for i in range(4)},
                    "debug": ev.debug,
                }
                st.detail = f"v{ev.version} report_data ok, debug off"
            else:
                self.status[record] = {"tee": ev.tee, "report_version": ev.version, **m, "debug": ev.debug}
                st.detail = (f"SNP v{ev.version} report_data ok, debug off, VMPL 0, {m['signing_key'].upper()}, "
                             f"{m['product']}, measurement {m['measurement'][:16]}…")

    async def attest_once(self, shape: Shape, cert: x509.Certificate, attempt: int) -> BootAttestationResponse:
        nonce = await self.nonce(shape.nonce_client, shape.nonce_query, attempt)
        raw = await self.quote(nonce, cert, attempt)
        doc: dict[str, Any] = {"quote": base64.b64encode(raw).decode("ascii"), "vm_name": self.vm_name,
                               "miner_hotkey": self.hotkey}
        if shape.first_boot is not None:
            doc["first_boot"] = shape.first_boot
        body = compact_json(doc)
        headers = {"X-Chutes-Nonce": nonce}
        if shape.sign is not None:
            headers.update(shape.sign(nonce, body))
        ep = "POST /servers/boot/attestation"
        with self.timer.stage("attestation", attempt=attempt) as st, st.waiting("network"):
            answer = await self.budget.bounded(ep, shape.attest_client.request(
                ep, "POST", "/servers/boot/attestation", headers=headers, body=body))
            resp = BootAttestationResponse.parse(answer)
            self.status["validator_fields"] = resp.fields_seen
            st.detail = "fields: " + ",".join(resp.fields_seen)
        return resp


__all__ = ["QUOTE_V4", "Exchange", "Shape", "ValidatorProtocolError"]
