"""One attempt of the boot exchange: nonce → REPORTDATA → quote → self-check → attestation.

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
from agent.evidence.report_data import ReportDataError, build_report_data
from agent.exitcodes import EXIT_VERIFY_FAILED
from agent.quote import QuoteError, parse_quote
from agent.validator.client import ValidatorClient, compact_json
from agent.validator.errors import ValidatorProtocolError
from agent.validator.schemas import BootAttestationResponse, NonceResponse

#: The Chutes validator reads the TD report at fixed v4 offsets (reference §3.4).
QUOTE_V4 = 4


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
        """Parse our own quote: REPORTDATA as built, debug off, and a v4 quote (the validator's offsets)."""
        with self.timer.stage("self_check", attempt=attempt) as st:
            try:
                q = parse_quote(raw)
            except QuoteError as exc:
                raise BootFailure("self_check", f"own quote does not parse: {exc}", EXIT_VERIFY_FAILED) from None
            if bytes(q.report_data) != rd:
                raise BootFailure("self_check", "own quote: report_data differs from nonce || SHA-256(client cert "
                                  "SPKI)", EXIT_VERIFY_FAILED)
            if q.debug:
                raise BootFailure("self_check", "own quote: TD DEBUG attribute is set; refusing to request keys",
                                  EXIT_VERIFY_FAILED)
            if q.version != QUOTE_V4 and not self.allow_quote_v5:
                raise BootFailure("self_check", f"own quote is version {q.version}: the Chutes validator reads v4 "
                                  "offsets only (boot.allow_quote_v5 = true for other verifiers)", EXIT_VERIFY_FAILED)
            self.status[record] = {
                "quote_version": q.version, "mr_td": q.mr_td.hex(),
                **{f"rtmr{i}": getattr(q, f"rtmr{i}").hex() for i in range(4)}, "debug": bool(q.debug),
            }
            st.detail = f"v{q.version} report_data ok, debug off"

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


__all__ = ["Exchange", "Shape", "ValidatorProtocolError"]
