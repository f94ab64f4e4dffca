"""The faithful validator's HTTP app: route guards, fault injection and every endpoint's checks.

Checks run in the live validator's order with the newest validator's status codes and texts
(chutes-vm-generations.md §3–§5, §12.4–12.5; chutes-api ``api/server/util.py``, ``exceptions.py``):
route/front guards 403, schema 422, boot nonce 400 ("Nonce is invalid, expired, or already used. Fetch a
fresh one …"), sr25519 proof 401, client certificate 403, quote decoding 403, report_data nonce half 400
/ cert half 403, quote signature 403, DEBUG 403, measurements 403 ("No registered measurement matches
this host's topology x QEMU version …"), hotkey on the subnet (403 from 1.4, 401 before), unknown VM 404.
SEV-SNP reports (told from TDX quotes by their bytes, as the production API does) go through the same order
with :func:`agent.quote.snp_verify.verify_snp_report` against the configured :class:`SnpTrust`.
NEVER production.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from agent.log import Secret
from agent.sim import validator_nginx as nginx_mod
from agent.sim.validator_signing import SigningRoot
from agent.sim.validator_state import (
    BOOT_TOKEN_TTL_S,
    CONFIRM_NONCE_TTL_S,
    LUKS_QUOTE_NONCE_TTL_S,
    NONCE_TTL_S,
    SUPPORTED_VOLUMES,
    AnyMeasurement,
    Fault,
    MeasuredQuote,
    ValidatorState,
    VolumeKeys,
    _Nonce,
    _Vm,
    new_k3s_key,
    new_passphrase,
    parse_version,
)

ENDPOINTS = ("nonce", "attestation", "luks_get", "luks_put", "luks_post", "luks_attest", "luks_confirm",
             "provision", "provision_confirm", "root_confirm", "storage_confirm", "signing_keys", "launch_nonce")
STATE_KEY = web.AppKey("state", ValidatorState)
if hasattr(web, "RequestKey"):  # aiohttp ≥ 3.13 typed request storage
    _FRONT: Any = web.RequestKey("front", str)
    _LOST: Any = web.RequestKey("lost_answer", str)
else:  # pragma: no cover
    _FRONT, _LOST = "front", "lost_answer"
# The newest validator's texts (chutes-api ``api/server/util.py`` guards, ``exceptions.py`` defaults).
#: ``require_mtls_proxy``: /boot/attestation through neither mTLS front.
NOT_VIA_PROXY = "Request did not arrive via a trusted attestation proxy."
#: ``require_attestation_proxy``: /luks/attest (1.3.x) through any front but the legacy attestation proxy.
LEGACY_ONLY = ("This endpoint serves only legacy VMs, via the attestation proxy. Newer VMs provision through "
               "POST /servers/{vm_name}/provision.")
#: ``require_cvm_proxy``: /provision and /provision/confirm through any front but cvm.
CVM_ONLY = "This endpoint is only accessible via the CVM mTLS proxy."
#: ``gate_legacy_attestation``: /nonce, /luks/confirm off cvm from a server already ≥ tee_mtls_min_version.
MUST_USE_CVM = "This VM must use the CVM mTLS proxy (cvm.chutes.ai)."
#: ``NonceError`` (400): the boot nonce is unknown, expired, consumed, or bound to another caller/hotkey.
NONCE_ERROR = ("Nonce is invalid, expired, or already used. Fetch a fresh one from GET /servers/nonce immediately "
               "before attesting; nonces are single-use and short-lived.")
#: ``NonceError`` (400) raised by ``verify_quote``: REPORTDATA[0:32] is not the expected nonce.
QUOTE_NONCE_MISMATCH = "Quote nonce does not match expected nonce."
#: ``NoClientCertError`` (403) as ``_get_client_certificate`` raises it (absent or unparseable).
NO_CLIENT_CERT = "No client certificate provided"
#: ``InvalidClientCertError`` (403): REPORTDATA[32:64] is not the presented certificate's SPKI hash.
INVALID_CLIENT_CERT = ("The mTLS client certificate does not match the one bound to this attestation. The VM must "
                       "present the same per-boot certificate whose hash is in the quote's report data.")
#: ``InvalidQuoteError`` (403): the quote does not parse (or is no TDX v4/v5 quote).
INVALID_QUOTE = ("The TDX quote could not be parsed. Check that the guest is running on TDX hardware and that the "
                 "attestation service produced a complete quote.")
#: ``InvalidSignatureError`` (403) as ``verify_quote_signature`` raises it.
INVALID_QUOTE_SIGNATURE = "TDX quote signature verification failed"
#: ``MeasurementMismatchError`` (403): no entry matches, the DCAP cross-check differs, or an rc entry the
#: caller is not authorized for (deliberately the same text).
MEASUREMENT_MISMATCH = ("No registered measurement matches this host's topology x QEMU version. If this hardware is "
                        "new, run `chutes-cvm discover-profile` and submit the profile so measurements can be "
                        "generated; otherwise check that the VM image and QEMU version are supported.")

#: §2/§12.4 guards: which fronts may carry a route. nonce and luks/confirm have their own (version) rule.
_FRONT_GUARDS: dict[str, tuple[frozenset[str], str]] = {
    "attestation": (frozenset({"cvm", "legacy"}), NOT_VIA_PROXY),
    "luks_attest": (frozenset({"legacy"}), LEGACY_ONLY),
    "provision": (frozenset({"cvm"}), CVM_ONLY),
    "provision_confirm": (frozenset({"cvm"}), CVM_ONLY),
}
_MTLS_OR_OLDER = frozenset({"nonce", "luks_confirm"})


class _Refuse(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(str(detail))
        self.status, self.detail = status, detail


def _missing(where: str, names: list[str], msg: str = "field required") -> _Refuse:
    """FastAPI/pydantic's 422 shape."""
    return _Refuse(422, [{"loc": [where, n], "msg": msg, "type": "missing"} for n in names])


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


def _expires_iso(expires: float) -> str:
    return dt.datetime.fromtimestamp(expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _client_ip(req: web.Request) -> str:
    return req.headers.get("X-Real-IP", "") or (req.remote or "")


def _hdr_is(req: web.Request, name: str, secret: str) -> bool:
    return secrets.compare_digest(req.headers.get(name, "").encode(), secret.encode())


# ── faults ───────────────────────────────────────────────────────────────────


def _take_fault(state: ValidatorState, names: list[str]) -> tuple[str, Fault] | None:
    for name in names:
        for f in state.faults.get(name) or []:
            if f.times is None or f.times > 0:
                if f.times is not None:
                    f.times -= 1
                f.hits += 1
                return name, f
    return None


def _edit(doc: Any, path: Any, value: Any = None, *, delete: bool = False) -> None:
    keys = (path,) if isinstance(path, str) else tuple(path)
    node = doc
    for k in keys[:-1]:
        if not isinstance(node, dict) or k not in node:
            return
        node = node[k]
    if not isinstance(node, dict):
        return
    if delete:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def _rewrite(fault: Fault, body: bytes) -> bytes:
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if fault.kind == "missing_fields":
        for path in fault.fields:
            _edit(doc, path, delete=True)
    elif fault.kind == "override":
        for path, value in fault.fields.items():
            _edit(doc, path, value)
    elif fault.kind == "bad_signature" and isinstance(doc, dict) and isinstance(doc.get("signatures"), dict):
        sigs = doc["signatures"]
        for name in fault.fields or list(sigs)[:1]:
            if name in sigs:
                raw = bytearray(base64.b64decode(sigs[name]))
                raw[len(raw) // 2] ^= 0x01
                sigs[name] = base64.b64encode(bytes(raw)).decode()
    return json.dumps(doc).encode()


async def _peek_confirm_target(req: web.Request) -> str:
    try:
        vols = json.loads(await req.read()).get("volumes")
    except (ValueError, AttributeError, RecursionError):
        return "storage_confirm"
    return "root_confirm" if isinstance(vols, dict) and "root" in vols else "storage_confirm"


async def _apply_fault(req: web.Request, handler: Any, fault: Fault) -> web.StreamResponse:
    if fault.kind == "delay":
        await asyncio.sleep(fault.delay_s)
        return await handler(req)
    if fault.kind in ("status", "garbage", "drop") and fault.applied:
        req[_LOST] = fault.kind
        await handler(req)  # state changes happen; the answer is lost
    if fault.kind == "status":
        hdrs = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        return _json(fault.status, {"detail": fault.detail}, hdrs)
    if fault.kind == "garbage":
        return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    if fault.kind == "drop":
        return web.Response(status=nginx_mod.DROP_STATUS)
    if fault.kind == "redirect":
        status = fault.status if 300 <= fault.status < 400 else 307
        location = fault.location or f"http://{req.host}{req.path_qs}"
        return _json(status, {"detail": "moved"}, {"Location": location})
    state: ValidatorState = req.app[STATE_KEY]
    if fault.kind == "replay_nonce" and state.last_nonce is not None:
        return _json(200, {"nonce": state.last_nonce, "expires_at": _expires_iso(state.now() + NONCE_TTL_S)})
    resp = await handler(req)
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b"{}"
    ctype = resp.content_type if isinstance(resp, web.Response) else "application/json"
    if fault.kind == "truncated":
        return web.Response(status=resp.status, body=body[: max(1, len(body) // 2)], content_type=ctype)
    if fault.kind in ("missing_fields", "override", "bad_signature"):
        return web.Response(status=resp.status, body=_rewrite(fault, body), content_type=ctype)
    if fault.kind == "split":  # two writes, apart in time: the client must read to the end
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": ctype})
        out.content_length = len(body)
        await out.prepare(req)
        await out.write(body[: len(body) // 2])
        await asyncio.sleep(fault.delay_s or 0.2)
        await out.write(body[len(body) // 2:])
        await out.write_eof()
        return out
    return resp


@web.middleware
async def _front_middleware(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Provenance (only nginx talks to the app), which front, route guards, then faults."""
    req = request  # aiohttp's Middleware protocol names the parameter ``request``
    state: ValidatorState = req.app[STATE_KEY]
    if not _hdr_is(req, nginx_mod.FRONT_AUTH_HEADER, state.front_auth):  # not through nginx at all
        return _json(403, {"detail": NOT_VIA_PROXY})
    if _hdr_is(req, nginx_mod.CVM_AUTH_HEADER, state.cvm_auth):
        front = "cvm"
    elif _hdr_is(req, nginx_mod.PROXY_AUTH_HEADER, state.proxy_auth):
        front = "legacy"
    else:
        front = "api"
    req[_FRONT] = front
    route = req.match_info.route.name or ""
    guard = _FRONT_GUARDS.get(route)
    if guard is not None and front not in guard[0]:
        state.events.append({"endpoint": route, "front": front, "status": 403, "reason": guard[1]})
        return _json(403, {"detail": guard[1]})
    if route in _MTLS_OR_OLDER and front != "cvm" and state.tee_mtls_min_version is not None:
        version = state.server_versions.get(_client_ip(req))
        if version is not None and parse_version(version) >= parse_version(state.tee_mtls_min_version):
            state.events.append({"endpoint": route, "front": front, "status": 403, "reason": MUST_USE_CVM})
            return _json(403, {"detail": MUST_USE_CVM})
    names = [route]
    if route in ("provision_confirm", "luks_confirm"):
        names.insert(0, await _peek_confirm_target(req))
    taken = _take_fault(state, names) if route else None
    try:
        if taken is None:
            return await handler(req)
        name, fault = taken
        state.events.append({"endpoint": route, "fault": fault.kind, "fault_target": name, "status": fault.status,
                             "front": front, "applied": fault.applied})
        return await _apply_fault(req, handler, fault)
    except web.HTTPException as exc:  # unknown path / method: FastAPI answers JSON
        return _json(exc.status, {"detail": exc.reason})


# ── common checks ────────────────────────────────────────────────────────────

Handler = Callable[[web.Request, ValidatorState, dict[str, Any]], Awaitable[Any]]


def _endpoint(name: str) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Record an event per call; a ``_Refuse`` becomes ``{"detail"}`` with its status."""

    def deco(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapper(req: web.Request) -> web.StreamResponse:
            state: ValidatorState = req.app[STATE_KEY]
            rec: dict[str, Any] = {"endpoint": name, "front": req.get(_FRONT), "ip": _client_ip(req),
                                   "user_agent": req.headers.get("User-Agent")}
            if req.get(_LOST):
                rec["lost_answer"] = req[_LOST]
            state.events.append(rec)
            try:
                result = await fn(req, state, rec)
            except _Refuse as exc:
                rec.update(status=exc.status, reason=exc.detail if isinstance(exc.detail, str) else "invalid request")
                return _json(exc.status, {"detail": exc.detail})
            if isinstance(result, web.StreamResponse):
                rec.setdefault("status", result.status)
                return result
            rec.update(status=200, reason="ok")
            return _json(200, result)

        return wrapper

    return deco


async def _body(req: web.Request) -> tuple[bytes, Any]:
    raw = await req.read()
    try:
        return raw, json.loads(raw)
    except (ValueError, RecursionError):
        return raw, None


def _headers(req: web.Request, *names: str) -> list[str]:
    missing = [n.lower() for n in names if not req.headers.get(n)]
    if missing:
        raise _missing("header", missing)
    return [req.headers[n] for n in names]


def _key_desc(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC-{key.curve.name}"
    return type(key).__name__


def _client_cert(req: web.Request, rec: dict[str, Any]) -> x509.Certificate:
    escaped = req.headers.get("X-Client-Cert", "")
    rec["client_verify"] = req.headers.get("X-Client-Verify")
    if not escaped:
        rec["client_cert_problem"] = "absent"
        raise _Refuse(403, NO_CLIENT_CERT)
    try:
        cert = x509.load_pem_x509_certificate(unquote(escaped).encode())
    except ValueError:
        rec["client_cert_problem"] = "unreadable"
        raise _Refuse(403, NO_CLIENT_CERT) from None
    rec["client_cert"] = {"subject": cert.subject.rfc4514_string(), "key": _key_desc(cert),
                          "version": cert.version.name, "extensions": len(cert.extensions)}
    return cert


@dataclass(frozen=True)
class _V4View:
    """What the validator reads: the TD report at the fixed v4 offset 48, whatever the header says (§3.4)."""

    mr_td: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes

    @classmethod
    def of(cls, raw: bytes) -> _V4View:
        td = raw[48:632]
        r = [td[328 + 48 * i: 376 + 48 * i] for i in range(4)]
        return cls(td[136:184], r[0], r[1], r[2], r[3], td[520:584])


@dataclass(frozen=True)
class _SnpView:
    """What an SEV-SNP entry compares: the verified report's MEASUREMENT (and what was bound)."""

    measurement: bytes
    report_data: bytes
    tee: str = "snp"


def _evidence_kind(raw: bytes) -> str:
    """The production API tells the kinds apart by the bytes (sev-snp.md §0.3); what is neither goes to the
    TDX parser, whose error decides the answer as before."""
    from agent.errors import BadInputError
    from agent.quote.kind import evidence_kind

    try:
        return evidence_kind(raw)
    except BadInputError:
        return "tdx"


def _verified_quote(state: ValidatorState, quote_b64: str, nonce: str, cert: x509.Certificate,
                    rec: dict[str, Any]) -> _V4View | _SnpView:
    """Decode, tell TDX from SEV-SNP by the bytes, bind (nonce ‖ SPKI hash of the presented cert), verify,
    refuse DEBUG; TDX: cross-check the v4 read."""
    from agent.evidence.report_data import spki_sha256
    from agent.quote import QuoteError, parse_quote, verify_quote

    try:
        raw = base64.b64decode(quote_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        rec["quote_problem"] = type(exc).__name__
        raise _Refuse(403, INVALID_QUOTE) from None
    if _evidence_kind(raw) == "snp":
        rec["tee"] = "snp"
        return _verified_snp(state, raw, nonce, cert, rec)
    try:
        q = parse_quote(raw)
    except (ValueError, QuoteError) as exc:
        rec["quote_problem"] = type(exc).__name__
        raise _Refuse(403, INVALID_QUOTE) from None
    rec["tee"] = "tdx"
    rec["quote_version"] = q.version
    if q.version not in (4, 5) or q.tee_type != 0x81 or len(raw) < 632:
        rec["quote_problem"] = "not a TDX v4/v5 quote"
        raise _Refuse(403, INVALID_QUOTE)
    view = _V4View.of(raw)
    rec["report_data_nonce_match"] = view.report_data[:32].hex() == nonce.lower()
    rec["cert_hash_match"] = view.report_data[32:] == spki_sha256(cert)
    if not rec["report_data_nonce_match"]:
        raise _Refuse(400, QUOTE_NONCE_MISMATCH)
    if not rec["cert_hash_match"]:
        raise _Refuse(403, INVALID_CLIENT_CERT)
    result = verify_quote(q, state.root_ca_pem)
    rec["quote_verified"] = result.ok
    if not result.ok:
        rec["quote_failed_checks"] = [c.name for c in result.checks if not c.passed]  # logged, never answered
        raise _Refuse(403, INVALID_QUOTE_SIGNATURE)
    if q.debug:
        raise _Refuse(403, "TD debug mode is enabled")
    verified = (bytes(q.mr_td), bytes(q.rtmr0), bytes(q.rtmr1), bytes(q.rtmr2), bytes(q.rtmr3))
    if verified != (view.mr_td, view.rtmr0, view.rtmr1, view.rtmr2, view.rtmr3):
        rec["measurement_problem"] = "quote differs from the verified report"
        raise _Refuse(403, MEASUREMENT_MISMATCH)
    rec["rtmr3_zero"] = view.rtmr3 == bytes(48)
    return view


#: SEV-SNP refusals (403). The production API's own texts are not public (sev-snp.md §5.5): these are ours.
INVALID_SNP_REPORT = "The SEV-SNP attestation report could not be parsed."
SNP_NO_VCEK = "No VCEK is available for this chip and TCB (AMD KDS)."
INVALID_SNP_SIGNATURE = "SEV-SNP report verification failed"
SNP_DEBUG = "SEV-SNP guest policy allows debugging"
SNP_VMPL = "SEV-SNP report was not requested at VMPL 0"


def _verified_snp(state: ValidatorState, raw: bytes, nonce: str, cert: x509.Certificate,
                  rec: dict[str, Any]) -> _SnpView:
    """The SEV-SNP branch: parse, bind, fetch the VCEK ("KDS": :class:`SnpTrust`), verify signature, chain to
    the trusted ARK, TCB = REPORTED_TCB, hwID = CHIP_ID, DEBUG and VMPL (agent.quote.snp_verify)."""
    from agent.evidence.report_data import spki_sha256
    from agent.quote.snp_parser import SnpReportError, parse_snp_report
    from agent.quote.snp_verify import SnpCertificateError, verify_snp_report

    try:
        r = parse_snp_report(raw)
    except SnpReportError as exc:
        rec["quote_problem"] = f"SnpReportError: {exc.field}"
        raise _Refuse(403, INVALID_SNP_REPORT) from None
    rec["quote_version"] = r.version
    rd = bytes(r.report_data)
    rec.update(quote_bytes=len(raw), report_data=rd.hex())  # public evidence, for assertions
    rec["report_data_nonce_match"] = rd[:32].hex() == nonce.lower()
    rec["cert_hash_match"] = rd[32:] == spki_sha256(cert)
    if not rec["report_data_nonce_match"]:
        raise _Refuse(400, QUOTE_NONCE_MISMATCH)
    if not rec["cert_hash_match"]:
        raise _Refuse(403, INVALID_CLIENT_CERT)
    trust = state.snp
    vek = trust.vek_for(r.chip_id) if trust is not None else None
    if trust is None or vek is None:
        rec["quote_problem"] = "no SNP trust configured" if trust is None else "no VCEK for this CHIP_ID"
        raise _Refuse(403, SNP_NO_VCEK)
    try:
        result = verify_snp_report(r, vek=vek, chain_pem=trust.chain_pem, trusted_arks=trust.arks,
                                   expected_report_data=bytes.fromhex(nonce) + spki_sha256(cert))
    except (SnpCertificateError, ValueError) as exc:
        rec["quote_problem"] = f"{type(exc).__name__}: {exc}"
        raise _Refuse(403, INVALID_SNP_SIGNATURE) from None
    rec["quote_verified"] = result.ok
    failed = [c.name for c in result.checks if not c.passed]
    if failed:
        rec["quote_failed_checks"] = failed  # logged, never answered
        if set(failed) - {"policy_debug_off", "vmpl_zero"}:
            raise _Refuse(403, INVALID_SNP_SIGNATURE)
        raise _Refuse(403, SNP_DEBUG if "policy_debug_off" in failed else SNP_VMPL)
    rec["snp_product"] = result.product
    return _SnpView(bytes(r.measurement), rd)


def _match(state: ValidatorState, q: MeasuredQuote | _SnpView, rec: dict[str, Any], *,
           runtime: bool) -> AnyMeasurement:
    match = next((m for m in state.measurements if m.matches(q, runtime=runtime)), None)
    rec["measurement"] = match.name if match else None
    if match is None:
        rec["measurement_problem"] = "no runtime match" if runtime else "no boot match"
        raise _Refuse(403, MEASUREMENT_MISMATCH)
    rec.update(version=match.version, generation=match.generation)
    if state.tee_minimum_boot_version and parse_version(match.version) < parse_version(state.tee_minimum_boot_version):
        raise _Refuse(403, f"VM version {match.version} is below the minimum boot version")
    return match


def _check_proof(req: web.Request, raw: bytes, nonce: str, hotkey: str, rec: dict[str, Any]) -> None:
    """The sr25519 request proof (§3.5) over the exact body bytes received."""
    from agent.validator.proof import HEADER_HOTKEY, HEADER_NONCE, HEADER_SIGNATURE, verify_proof

    hk, sig = req.headers.get(HEADER_HOTKEY, ""), req.headers.get(HEADER_SIGNATURE, "")
    rec["proof"] = "missing"
    if not hk or not sig:
        raise _Refuse(401, "Missing request signature (X-Chutes-Hotkey, X-Chutes-Signature)")
    if hk != hotkey:
        rec["proof"] = "hotkey mismatch"
        raise _Refuse(401, "X-Chutes-Hotkey does not match the miner hotkey")
    if not secrets.compare_digest(req.headers.get(HEADER_NONCE, "").encode(), nonce.encode()):
        rec["proof"] = "nonce mismatch"
        raise _Refuse(401, "X-Chutes-Nonce does not match the nonce of this call")
    if not verify_proof(hk, nonce, raw, sig):
        rec["proof"] = "invalid"
        raise _Refuse(401, "Invalid request signature")
    rec["proof"] = "valid"


def _check_registered(state: ValidatorState, hotkey: str, generation: str) -> None:
    if hotkey in state.blacklisted_hotkeys:
        raise _Refuse(401, "Miner hotkey is blacklisted")
    if state.registered_hotkeys is not None and hotkey not in state.registered_hotkeys:
        raise _Refuse(403 if generation == "1.4" else 401, "Miner hotkey is not registered on the subnet")


def _owned_vm(state: ValidatorState, vm_name: str, hotkey: str) -> _Vm:
    vm = state.vms.get(vm_name)
    if vm is None:
        raise _Refuse(404, "VM not found")
    if vm.hotkey != hotkey:
        raise _Refuse(403, "VM belongs to a different miner hotkey")
    return vm


def _volume_list(data: Any, rec: dict[str, Any]) -> list[str]:
    vols = data.get("volumes") if isinstance(data, dict) else None
    if not isinstance(vols, list) or not all(isinstance(v, str) for v in vols):
        raise _missing("body", ["volumes"], "value is not a valid list of volume names")
    rec["volumes"] = list(vols)
    if not vols:
        raise _Refuse(400, "No volumes requested")
    for v in vols:
        if v not in SUPPORTED_VOLUMES:
            raise _Refuse(400, f"Unsupported volume: {v!r} (supported: {', '.join(SUPPORTED_VOLUMES)})")
    if len(set(vols)) != len(vols):
        raise _Refuse(400, "Duplicate volume names")
    return vols


def _reveal(state: ValidatorState, s: Secret) -> str:
    value = bytes(s.reveal())
    state.handed_out.append(value)
    return value.decode()


# ── endpoints ────────────────────────────────────────────────────────────────


@_endpoint("nonce")
async def _nonce(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    hotkey = req.query.get("miner_hotkey") or None
    nonce = secrets.token_hex(32)
    expires = state.now() + NONCE_TTL_S
    state.nonces[nonce] = _Nonce(_client_ip(req), hotkey, expires)
    state.counters["boot_nonce.issued"] += 1
    state.last_nonce = nonce
    rec.update(nonce=nonce, miner_hotkey=hotkey, client_cert=bool(req.headers.get("X-Client-Cert")))
    return {"nonce": nonce, "expires_at": _expires_iso(expires)}


def _take_boot_nonce(state: ValidatorState, req: web.Request, nonce: str, hotkey: str, rec: dict[str, Any]) -> None:
    """Every refusal is the newest validator's ``NonceError`` (400, §12.5): the VM retries with a fresh nonce.

    Why it was refused stays server-side, in the event (``nonce_problem``)."""
    entry = state.nonces.pop(nonce, None)  # consumed on first use, whatever happens next
    if entry is None or entry.expires < state.now():
        state.counters["boot_nonce.refused" if entry is None else "boot_nonce.expired"] += 1
        rec["nonce_problem"] = "unknown or used" if entry is None else "expired"
        raise _Refuse(400, NONCE_ERROR)
    state.counters["boot_nonce.consumed"] += 1
    if entry.ip != _client_ip(req) or entry.purpose != "boot":
        rec["nonce_problem"] = "issued to a different client"
        raise _Refuse(400, NONCE_ERROR)
    if entry.hotkey is not None and entry.hotkey != hotkey:
        rec["nonce_problem"] = "issued for a different miner_hotkey"
        raise _Refuse(400, NONCE_ERROR)


@_endpoint("attestation")
async def _attestation(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    raw, data = await _body(req)
    missing = [k for k in ("quote", "vm_name", "miner_hotkey")
               if not isinstance(data, dict) or not isinstance(data.get(k), str)]
    if missing:
        raise _missing("body", missing)
    first_boot = data.get("first_boot")
    if first_boot is not None and not isinstance(first_boot, bool):
        raise _missing("body", ["first_boot"], "value could not be parsed to a boolean")
    quote_b64, vm_name, hotkey = data["quote"], data["vm_name"], data["miner_hotkey"]
    nonce = req.headers.get("X-Chutes-Nonce", "")
    rec.update(nonce=nonce, vm_name=vm_name, miner_hotkey=hotkey, first_boot=first_boot)
    _take_boot_nonce(state, req, nonce, hotkey, rec)
    signed = "X-Chutes-Signature" in req.headers or "X-Chutes-Hotkey" in req.headers
    if signed:
        _check_proof(req, raw, nonce, hotkey, rec)
    cert = _client_cert(req, rec)
    q = _verified_quote(state, quote_b64, nonce, cert, rec)
    if rec.get("tee") != "snp" and not rec["rtmr3_zero"]:  # SEV-SNP has no RTMR3 (sev-snp.md §5.2)
        raise _Refuse(403, "Boot quote RTMR3 is not zero: a runtime quote is not boot evidence")
    match = _match(state, q, rec, runtime=False)
    gen = match.generation
    if gen == "1.4":
        if not signed:
            rec["proof"] = "missing"
            raise _Refuse(401, "Missing request signature (X-Chutes-Hotkey, X-Chutes-Signature)")
        if first_boot is None:
            raise _missing("body", ["first_boot"])
    if match.rc and (not signed or hotkey not in match.authorized_hotkeys):
        rec["measurement_problem"] = "rc measurement, hotkey not authorized"  # answered like no match at all
        raise _Refuse(403, MEASUREMENT_MISMATCH)
    _check_registered(state, hotkey, gen)
    vm = state.vms.get(vm_name)
    if vm is None or vm.hotkey != hotkey:
        raise _Refuse(404, "VM not found")
    state.server_versions[_client_ip(req)] = match.version
    vm.generation, vm.first_boot = gen, first_boot
    vm.boots += 1
    return {**_boot_response(state, vm, vm_name, hotkey, gen, bool(first_boot)), **state.response_extras}


def _boot_response(state: ValidatorState, vm: _Vm, vm_name: str, hotkey: str, gen: str,
                   first_boot: bool) -> dict[str, Any]:
    if gen == "1.2":
        token = secrets.token_hex(32)
        state.boot_tokens[token] = (hotkey, vm_name, state.now() + BOOT_TOKEN_TTL_S)
        state.counters["boot_token.issued"] += 1
        return {"key": _reveal(state, vm.root), "boot_token": token}
    lqn = state.issue_timed(state.luks_quote_nonces, (hotkey, vm_name), LUKS_QUOTE_NONCE_TTL_S, "luks_quote_nonce")
    if gen == "1.3":
        return {"key": _reveal(state, vm.root), "luks_quote_nonce": lqn, "boot_token": None}
    from agent.validator.proof import Hotkey

    if first_boot:  # a fresh image still has the build passphrase: forget any rotated key
        for s in (vm.root_stored, vm.pending_root):
            if s is not None:
                s.wipe()
        vm.root_stored = vm.pending_root = None
    key = vm.root_stored if vm.root_stored is not None else vm.root
    if vm.pending_root is not None:
        vm.pending_root.wipe()
    vm.pending_root = new_passphrase()
    confirm = state.issue_timed(state.confirm_nonces, (hotkey, vm_name), CONFIRM_NONCE_TTL_S, "confirm_nonce")
    vm.vm_auth = Hotkey.from_seed_hex(secrets.token_hex(32))
    return {"key": _reveal(state, key), "luks_quote_nonce": lqn, "boot_token": None,
            "root_next": _reveal(state, vm.pending_root), "root_confirm_nonce": confirm,
            "vm_auth_ss58": vm.vm_auth.ss58}


def _check_boot_token(state: ValidatorState, token: str, vm_name: str, hotkey: str) -> None:
    tok = state.boot_tokens.get(token)
    if tok is None or tok[2] < state.now():
        state.counters["boot_token.refused"] += 1
        raise _Refuse(401, "Invalid or expired boot token")
    if tok[0] != hotkey or tok[1] != vm_name:
        raise _Refuse(403, "Boot token was issued for a different VM")


async def _luks_legacy(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    """The removed ``GET``/``PUT /servers/{vm}/luks?hotkey=`` cache calls (only with ``legacy_luks``)."""
    if not state.legacy_luks:
        raise _Refuse(405, "Method Not Allowed")
    vm_name, hotkey = req.match_info["vm_name"], req.query.get("hotkey", "")
    rec.update(vm_name=vm_name, miner_hotkey=hotkey)
    _check_boot_token(state, req.headers.get("X-Boot-Token", ""), vm_name, hotkey)
    vm = state.vms.get(vm_name)
    if vm is None:
        raise _Refuse(404, "VM not found")
    if req.method == "PUT":
        vm.cache = Secret(secrets.token_hex(64))
    elif vm.cache is None:
        raise _Refuse(404, "No LUKS passphrase for this VM")
    return {"passphrase": _reveal(state, vm.cache)}


_luks_get = _endpoint("luks_get")(_luks_legacy)
_luks_put = _endpoint("luks_put")(_luks_legacy)


@_endpoint("luks_post")
async def _luks_post(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    """≤1.2 storage volumes: the boot token (consumed) buys one passphrase per volume."""
    vm_name = req.match_info["vm_name"]
    hotkey, token = _headers(req, "X-Chutes-Hotkey", "X-Boot-Token")
    rec.update(vm_name=vm_name, miner_hotkey=hotkey)
    _, data = await _body(req)
    vols = _volume_list(data, rec)
    rekey = data.get("rekey") or []
    if not isinstance(rekey, list) or not set(rekey) <= set(vols):
        raise _Refuse(400, "rekey must list requested volumes")
    _check_boot_token(state, token, vm_name, hotkey)
    del state.boot_tokens[token]
    state.counters["boot_token.consumed"] += 1
    vm = _owned_vm(state, vm_name, hotkey)
    out = {}
    for v in vols:
        keys = vm.volumes.setdefault(v, VolumeKeys())
        if keys.current is None or v in rekey:
            keys.current = new_passphrase()
        out[v] = _reveal(state, keys.current)
    rec["rekeyed"] = sorted(rekey)
    return out


async def _volume_keys(req: web.Request, state: ValidatorState, rec: dict[str, Any], *, provision: bool) -> Any:
    """``luks/attest`` (1.3) and ``provision`` (1.4): a runtime quote over luks_quote_nonce ‖ client-cert hash."""
    vm_name = req.match_info["vm_name"]
    quote_nonce, hotkey = _headers(req, "X-Quote-Nonce", "X-Chutes-Hotkey")
    rec.update(vm_name=vm_name, miner_hotkey=hotkey)
    raw, data = await _body(req)
    if not isinstance(data, dict) or not isinstance(data.get("quote"), str):
        raise _missing("body", ["quote"] + ([] if isinstance(data, dict) and "volumes" in data else ["volumes"]))
    vols = _volume_list(data, rec)
    vm = _owned_vm(state, vm_name, hotkey)
    if not state.take_timed(state.luks_quote_nonces, (hotkey, vm_name), quote_nonce, "luks_quote_nonce"):
        raise _Refuse(401, "Invalid or expired quote nonce")
    if provision:
        _check_proof(req, raw, quote_nonce, hotkey, rec)
    cert = _client_cert(req, rec)
    q = _verified_quote(state, data["quote"], quote_nonce, cert, rec)
    match = _match(state, q, rec, runtime=True)
    want = "1.4" if provision else "1.3"
    if match.generation != want:
        path = "provision" if provision else "luks/attest"
        raise _Refuse(403, f"{path} is not served to VM version {match.version}")
    _check_registered(state, hotkey, match.generation)
    if provision:
        vm.vm_root_ca_pem = cert.public_bytes(Encoding.PEM)
        rec["stored_ca"] = True
    volumes: dict[str, Any] = {}
    for v in vols:
        keys = vm.volumes.setdefault(v, VolumeKeys())
        if keys.pending is not None:
            keys.pending.wipe()
        keys.pending = new_passphrase()
        current = _reveal(state, keys.current) if keys.current is not None else None
        volumes[v] = {"current": current, "next": _reveal(state, keys.pending)}
    confirm = state.issue_timed(state.confirm_nonces, (hotkey, vm_name), CONFIRM_NONCE_TTL_S, "confirm_nonce")
    if vm.k3s_key is None:
        vm.k3s_key = new_k3s_key()
    return {"volumes": volumes, "confirm_nonce": confirm, "k3s_encryption_key": _reveal(state, vm.k3s_key)}


@_endpoint("luks_attest")
async def _luks_attest(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    return await _volume_keys(req, state, rec, provision=False)


@_endpoint("provision")
async def _provision(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    return await _volume_keys(req, state, rec, provision=True)


def _promote(keys_current: Secret | None, pending: Secret | None, rotated: bool) -> tuple[str, Secret | None]:
    """(result, new current) for one confirmed volume (§5 Validator state)."""
    if pending is None:
        return "no_pending", keys_current
    if rotated or keys_current is None:  # a fresh volume was formatted with `next`: keep it either way
        if keys_current is not None:
            keys_current.wipe()
        return "promoted", pending
    pending.wipe()
    return "discarded", keys_current


async def _confirm(req: web.Request, state: ValidatorState, rec: dict[str, Any], *, provision: bool) -> Any:
    vm_name = req.match_info["vm_name"]
    confirm_nonce, hotkey = _headers(req, "X-Confirm-Nonce", "X-Chutes-Hotkey")
    rec.update(vm_name=vm_name, miner_hotkey=hotkey)
    raw, data = await _body(req)
    vols = data.get("volumes") if isinstance(data, dict) else None
    if not isinstance(vols, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("rotated"), bool) for v in vols.values()):
        raise _missing("body", ["volumes"], 'expected {"volumes": {name: {"rotated": bool}}}')
    allowed = (*SUPPORTED_VOLUMES, "root") if provision else SUPPORTED_VOLUMES
    rec["volumes"] = {n: v["rotated"] for n, v in vols.items()}
    if not vols:
        raise _Refuse(400, "No volumes to confirm")
    for n in vols:
        if n not in allowed:
            raise _Refuse(400, f"Unsupported volume: {n!r}")
    vm = _owned_vm(state, vm_name, hotkey)
    if provision:
        _check_proof(req, raw, confirm_nonce, hotkey, rec)
    want = "1.4" if provision else "1.3"
    if vm.generation != want:
        raise _Refuse(403, f"{'provision/confirm' if provision else 'luks/confirm'} is not served to this VM's "
                           f"generation ({vm.generation})")
    if not state.take_timed(state.confirm_nonces, (hotkey, vm_name), confirm_nonce, "confirm_nonce"):
        raise _Refuse(401, "Invalid or expired confirm nonce")
    results: dict[str, dict[str, str]] = {}
    for n, v in vols.items():
        if n == "root":
            if vm.pending_root is None:
                result = "no_pending"
            elif v["rotated"]:
                if vm.root_stored is not None:
                    vm.root_stored.wipe()
                vm.root_stored, result = vm.pending_root, "promoted"
            else:
                vm.pending_root.wipe()
                result = "discarded"
            vm.pending_root = None
        else:
            keys = vm.volumes.setdefault(n, VolumeKeys())
            result, keys.current = _promote(keys.current, keys.pending, v["rotated"])
            keys.pending = None
        results[n] = {"result": result}
    rec["results"] = {n: r["result"] for n, r in results.items()}
    return {"status": "confirmed", "volumes": results}


@_endpoint("luks_confirm")
async def _luks_confirm(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    return await _confirm(req, state, rec, provision=False)


@_endpoint("provision_confirm")
async def _provision_confirm(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    return await _confirm(req, state, rec, provision=True)


@_endpoint("signing_keys")
async def _signing_keys(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    if state.signing is None:
        state.signing = SigningRoot()
    doc = state.signing.document()
    rec["keys"] = sorted(state.signing.keys)
    return doc


@_endpoint("launch_nonce")
async def _launch_nonce(req: web.Request, state: ValidatorState, rec: dict[str, Any]) -> Any:
    cid = req.match_info["config_id"]
    rec["config_id"] = cid
    launch = state.launches.get(cid)
    if launch is None or not secrets.compare_digest(req.headers.get("Authorization", ""), launch.token):
        raise _Refuse(401, "Invalid launch token")
    if launch.nonce is None:
        raise _Refuse(404, "Nonce not found or already used")
    nonce, launch.nonce = launch.nonce, None
    return web.Response(status=200, text=nonce, content_type="text/plain")


def make_app(state: ValidatorState) -> web.Application:
    app = web.Application(middlewares=[_front_middleware], client_max_size=1024 * 1024)
    app[STATE_KEY] = state
    r = app.router
    r.add_get("/servers/nonce", _nonce, name="nonce")
    r.add_post("/servers/boot/attestation", _attestation, name="attestation")
    r.add_get("/servers/signing-keys", _signing_keys, name="signing_keys")
    r.add_get("/servers/{vm_name}/luks", _luks_get, name="luks_get", allow_head=False)
    r.add_put("/servers/{vm_name}/luks", _luks_put, name="luks_put")
    r.add_post("/servers/{vm_name}/luks", _luks_post, name="luks_post")
    r.add_post("/servers/{vm_name}/luks/attest", _luks_attest, name="luks_attest")
    r.add_post("/servers/{vm_name}/luks/confirm", _luks_confirm, name="luks_confirm")
    r.add_post("/servers/{vm_name}/provision", _provision, name="provision")
    r.add_post("/servers/{vm_name}/provision/confirm", _provision_confirm, name="provision_confirm")
    r.add_get("/instances/launch_config/{config_id}/nonce", _launch_nonce, name="launch_nonce")
    return app
