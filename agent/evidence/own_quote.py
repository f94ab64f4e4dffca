"""One policy for this VM's own evidence, before it leaves the VM (issue 19, issue 20 "own-quote policy once").

Every producer of our own evidence runs the same checks on what the hardware returned: the boot
(:meth:`agent.boot.exchange.Exchange.self_check`, before a quote goes to the validator), the service's
start-up self-check (:meth:`agent.serve.server.Service._self_check`) and the configfs-tsm collector's
final check. What is checked depends only on the TEE:

- **TDX** (a DCAP quote): it parses; REPORTDATA equals the 64 bytes asked for; the TD's DEBUG attribute
  is off; the quote is version 4 unless ``allow_v5`` (the Chutes validator reads the TD report at v4
  offsets, tdx-quote.md §3.4); TEE type TDX (0x81).
- **SEV-SNP** (a bare 1184-byte ATTESTATION_REPORT, sev-snp.md §0.1): it parses; REPORT_DATA equals the
  64 bytes asked for; POLICY.DEBUG (bit 19) is off; VMPL is 0 (Chutes' guests run at VMPL 0 and a
  report from a higher VMPL is not the guest kernel's); KEY_INFO.SIGNING_KEY is VCEK or VLEK (7 means
  unsigned); POLICY bit 17 (reserved, must be one) is set.

No signature is checked here: that needs the host's PCK/VCEK chain and is the validator's job (and
``doctor``'s, locally). The point is to never send evidence the validator must refuse, and never to
serve evidence bound to anything but what was asked for. Failures raise :class:`OwnEvidenceError`
whose ``message`` is one console line; ``check`` names the rule that failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import VerificationError
from agent.evidence.tee import SNP, TDX, TEES

#: The TDX quote version the Chutes validator reads (TD report at the fixed v4 offsets).
QUOTE_V4 = 4
TDX_TEE_TYPE = 0x81
#: SEV-SNP guest policy bits (sev-snp.md §1.4).
SNP_POLICY_RESERVED_ONE = 1 << 17
SNP_POLICY_DEBUG = 1 << 19
#: KEY_INFO.SIGNING_KEY values that mean "signed" (0 VCEK, 1 VLEK; 7 = not signed).
SNP_SIGNING_KEYS = {0: "vcek", 1: "vlek"}

#: What the default messages say the report_data binds (the boot's mTLS client certificate).
BOOT_BINDING = "nonce || SHA-256(client cert SPKI)"
BOOT_REFUSAL = "refusing to request keys"


class OwnEvidenceError(VerificationError):
    """Our own quote/report fails the policy; never send or serve it. ``message`` is one console line."""

    reason = "own_evidence_refused"

    def __init__(self, message: str, *, check: str, tee: str) -> None:
        super().__init__(message)
        self.message = message
        #: "parse", "report_data", "debug", "version", "tee_type", "vmpl", "signing_key", "policy".
        self.check = check
        self.tee = tee


@dataclass(frozen=True)
class OwnEvidence:
    """What passed: the TEE, the evidence's version, the bound 64 bytes and the measurement values (hex)."""

    tee: str
    version: int
    report_data: bytes
    debug: bool
    #: TDX: mr_td, rtmr0..rtmr3. SNP: measurement, policy (0x-hex), reported_tcb, chip_id_prefix (first 8
    #: bytes), product ("Milan"/"Genoa"/"Turin"/"unknown"), version, vmpl, signing_key ("vcek"/"vlek").
    measurements: dict[str, str] = field(default_factory=dict)


def evidence_noun(tee: str) -> str:
    """How messages name our own evidence: "own quote" (TDX) or "own SNP report"."""
    return "own SNP report" if tee == SNP else "own quote"


def check_own_evidence(raw: bytes, expected_report_data: bytes, *, tee: str, allow_v5: bool = False,
                       binding: str = BOOT_BINDING, refusal: str = BOOT_REFUSAL) -> OwnEvidence:
    """Apply the own-evidence policy for ``tee`` to ``raw``; :class:`OwnEvidenceError` on the first failure.

    ``binding`` names what ``expected_report_data`` is (for the message), ``refusal`` what the caller will
    not do with debug evidence. With the defaults, the TDX messages are the boot's historical ones.
    """
    if tee == TDX:
        return _check_tdx(bytes(raw), bytes(expected_report_data), allow_v5, binding, refusal)
    if tee == SNP:
        return _check_snp(bytes(raw), bytes(expected_report_data), binding, refusal)
    raise ValueError(f"tee: one of {', '.join(TEES)}, got {tee!r}")


def _check_tdx(raw: bytes, rd: bytes, allow_v5: bool, binding: str, refusal: str) -> OwnEvidence:
    from agent.quote import QuoteError, parse_quote

    what = evidence_noun(TDX)
    try:
        q = parse_quote(raw)
    except QuoteError as exc:
        raise OwnEvidenceError(f"{what} does not parse: {exc}", check="parse", tee=TDX) from None
    if bytes(q.report_data) != rd:
        raise OwnEvidenceError(f"{what}: report_data differs from {binding}", check="report_data", tee=TDX)
    if q.debug:
        raise OwnEvidenceError(f"{what}: TD DEBUG attribute is set; {refusal}", check="debug", tee=TDX)
    if q.version != QUOTE_V4 and not allow_v5:
        raise OwnEvidenceError(f"{what} is version {q.version}: the Chutes validator reads v4 offsets only "
                               "(boot.allow_quote_v5 = true for other verifiers)", check="version", tee=TDX)
    if q.tee_type != TDX_TEE_TYPE:
        raise OwnEvidenceError(f"{what}: TEE type 0x{q.tee_type:x} is not TDX (0x81)", check="tee_type", tee=TDX)
    m = {"mr_td": bytes(q.mr_td).hex(), **{f"rtmr{i}": bytes(getattr(q, f"rtmr{i}")).hex() for i in range(4)}}
    return OwnEvidence(TDX, int(q.version), bytes(q.report_data), bool(q.debug), m)


def _check_snp(raw: bytes, rd: bytes, binding: str, refusal: str) -> OwnEvidence:
    from agent.quote.snp_parser import SnpReportError, parse_snp_report

    what = evidence_noun(SNP)
    try:
        r = parse_snp_report(raw)
    except SnpReportError as exc:
        raise OwnEvidenceError(f"{what} does not parse: {exc}", check="parse", tee=SNP) from None
    if bytes(r.report_data) != rd:
        raise OwnEvidenceError(f"{what}: report_data differs from {binding}", check="report_data", tee=SNP)
    policy = int(r.policy)
    key = SNP_SIGNING_KEYS.get(int(r.signing_key))
    m = {"measurement": bytes(r.measurement).hex(), "policy": f"0x{policy:x}",
         "reported_tcb": bytes(r.reported_tcb).hex(), "chip_id_prefix": bytes(r.chip_id)[:8].hex(),
         "product": r.product or "unknown", "version": str(int(r.version)), "vmpl": str(int(r.vmpl)),
         "signing_key": key or f"unknown ({r.signing_key})"}
    debug = bool(r.debug or policy & SNP_POLICY_DEBUG)
    if debug:
        raise OwnEvidenceError(f"{what}: POLICY.DEBUG is set; {refusal}", check="debug", tee=SNP)
    if r.vmpl != 0:
        raise OwnEvidenceError(f"{what}: requested at VMPL {r.vmpl}, not 0 (a report from a higher VMPL is not "
                               "the guest kernel's); " + refusal, check="vmpl", tee=SNP)
    if key is None:
        raise OwnEvidenceError(f"{what}: KEY_INFO.SIGNING_KEY is {r.signing_key} (not VCEK or VLEK: the report is "
                               f"not signed); {refusal}", check="signing_key", tee=SNP)
    if not policy & SNP_POLICY_RESERVED_ONE:
        raise OwnEvidenceError(f"{what}: POLICY 0x{policy:x} has reserved bit 17 clear (must be one); {refusal}",
                               check="policy", tee=SNP)
    return OwnEvidence(SNP, int(r.version), bytes(r.report_data), False, m)


#: How the TEEs are named on consoles and in summaries.
TEE_NAMES = {TDX: "Intel TDX", SNP: "AMD SEV-SNP"}


def tee_resolution(quote_cfg: object, tee: str, source_name: str = "configfs") -> str:
    """How ``tee`` was chosen, in words: pinned by ``quote.tee``, probed (which device), or by the quote source.

    ``quote_cfg`` is the :class:`agent.config.QuoteConfig`; the probe order is Chutes' next (§12.8): the TDX
    guest device first, then the SEV guest device.
    """
    pinned = getattr(quote_cfg, "tee", "auto")
    if source_name not in ("configfs", ""):
        return f"from the {source_name} quote source"
    if pinned in TEES:
        return f'pinned by quote.tee = "{pinned}"'
    tdx_dev = getattr(quote_cfg, "tdx_device", "/dev/tdx_guest")
    if tee == TDX:
        return f"probed: {tdx_dev} present"
    return f"probed: {tdx_dev} absent, {getattr(quote_cfg, 'sev_device', '/dev/sev-guest')} present"


__all__ = ["QUOTE_V4", "SNP", "TDX", "TEES", "TEE_NAMES", "OwnEvidence", "OwnEvidenceError", "check_own_evidence",
           "evidence_noun", "tee_resolution"]
