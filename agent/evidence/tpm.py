"""vTPM evidence through tpm2-pytss (ESAPI): AK quote over the configured PCRs, PCR values, EK cert.

Why this shape:
- tpm2-pytss is an optional extra, imported lazily; without it the agent runs and reports no TPM
  (or fails clearly when ``tpm.tcti`` explicitly asks for one).
- One ESAPI context per process behind a lock: ESAPI contexts are not thread-safe, the service calls
  in from worker threads, and a direct TCTI (swtpm, mssim) serves one connection at a time.
- The AK is a restricted ECC P-256 signing primary in the endorsement hierarchy (the same template
  gives the same key for the life of the EPS), or the persistent key at ``tpm.ak_handle``.
- PCRs are read after the quote and checked against the quoted digest before returning; a PCR that
  moved in between makes the whole quote be retried, so callers never get self-inconsistent evidence.
- After any failure the context is dropped; the next call reconnects (the TPM may come back).
"""

from __future__ import annotations

import base64
import os
import ssl
import threading
import time
from typing import Any

from agent.config import AgentConfig, TpmConfig
from agent.evidence import tpm_verify
from agent.evidence.base import EvidenceError
from agent.log import get_logger

log = get_logger(__name__)

DEVICE_PATH = "/dev/tpmrm0"
NONCE_MAX = 64  # TPM2B_DATA holds at most sizeof(TPMU_HA)
AK_ATTRIBUTES = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
AK_ALG = "ecc256:ecdsa-sha256:null"
PERSISTENT_FIRST, PERSISTENT_LAST = 0x81000000, 0x81FFFFFF
#: TCG EK Credential Profile NV indexes, in order of preference: RSA 2048, ECC P-256, then the high range.
EK_CERT_INDEXES = (0x01C00002, 0x01C0000A, 0x01C00012, 0x01C00014, 0x01C00016, 0x01C0001C)
NV_INDEX_FIRST = 0x01000000
PT_MANUFACTURER, PT_VENDOR_STRING_1, PT_FIRMWARE_VERSION_1, PT_NV_BUFFER_MAX = 0x105, 0x106, 0x10B, 0x12C
QUOTE_ATTEMPTS = 3
LOCK_TIMEOUT_S = 30.0
EVENT_LOG_MAX = 16 * 1024 * 1024


class TpmError(EvidenceError):
    """TPM evidence could not be produced (TPM gone, misconfigured, tpm2-pytss missing...)."""


def _pytss() -> Any:
    """Import tpm2-pytss on first use (ImportError when the ``tpm`` extra is absent)."""
    import tpm2_pytss

    return tpm2_pytss


def pytss_available() -> bool:
    try:
        _pytss()
    except ImportError:
        return False
    return True


def resolve_tcti(tc: TpmConfig) -> str | None:
    """The TCTI to use: ``tpm.tcti`` when set, else the kernel resource manager when present."""
    if tc.tcti:
        return tc.tcti
    if os.path.exists(DEVICE_PATH):
        return f"device:{DEVICE_PATH}"
    return None


def _selection(tc: TpmConfig) -> tuple[str, list[int]]:
    if tc.bank not in tpm_verify.BANK_SIZES:
        raise TpmError(f"tpm.bank: unsupported bank {tc.bank!r} (expected one of {', '.join(tpm_verify.BANK_SIZES)})")
    pcrs = sorted(set(tc.pcrs))
    if not pcrs or any(not 0 <= p <= 23 for p in pcrs):
        raise TpmError(f"tpm.pcrs: expected a non-empty list of PCR indexes 0..23, got {tc.pcrs!r}")
    if tc.ak_handle and not PERSISTENT_FIRST <= tc.ak_handle <= PERSISTENT_LAST:
        raise TpmError(f"tpm.ak_handle: 0x{tc.ak_handle:x} is not a persistent handle (0x81000000..0x81ffffff)")
    return tc.bank, pcrs


def _sel_string(bank: str, pcrs: list[int]) -> str:
    return f"{bank}:{','.join(map(str, pcrs))}"


class _Session:
    """One ESAPI context and its loaded AK. Not thread-safe: used only under ``_LOCK``."""

    def __init__(self, tcti: str, ak_handle: int) -> None:
        p = _pytss()
        self.p = p
        self.tcti, self.ak_handle = tcti, ak_handle
        self.ctx = p.ESAPI(tcti)
        self.ak: Any = None
        self.ak_transient = False
        self.ak_pem = ""
        self._ek_cert: str | bool | None = False  # False: not read yet

    def load_ak(self) -> None:
        p = self.p
        if self.ak is not None:
            return
        if self.ak_handle:
            try:
                tr = self.ctx.tr_from_tpmpublic(self.ak_handle)
                pub = self.ctx.read_public(tr)[0]
            except p.TSS2_Exception as exc:
                if exc.rc >> 16:  # not a TPM response code (TCTI/ESYS layer): the TPM itself is the problem
                    raise
                raise TpmError(f"tpm.ak_handle: cannot load 0x{self.ak_handle:x} from the TPM ({exc})") from exc
            attrs = pub.publicArea.objectAttributes
            need = p.TPMA_OBJECT.RESTRICTED | p.TPMA_OBJECT.SIGN_ENCRYPT
            if attrs & need != need:
                raise TpmError(f"tpm.ak_handle: 0x{self.ak_handle:x} is not a restricted signing key")
            self.ak, self.ak_transient = tr, False
        else:
            template = p.TPM2B_PUBLIC(p.TPMT_PUBLIC.parse(AK_ALG, objectAttributes=AK_ATTRIBUTES))
            tr, pub, *_ = self.ctx.create_primary(p.TPM2B_SENSITIVE_CREATE(), template, p.ESYS_TR.ENDORSEMENT)
            self.ak, self.ak_transient = tr, True
        self.ak_pem = pub.to_pem().decode()

    def quote(self, nonce: bytes, bank: str, pcrs: list[int]) -> tuple[bytes, bytes]:
        """TPM2_Quote → (marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE)."""
        self.load_ak()
        attest, sig = self.ctx.quote(self.ak, _sel_string(bank, pcrs), nonce)
        return attest.marshal()[2:], sig.marshal()

    def read_pcrs(self, bank: str, pcrs: list[int]) -> dict[int, bytes]:
        """PCR values; TPM2_PCR_Read answers at most 8 per call, so loop until all are in."""
        out: dict[int, bytes] = {}
        remaining = list(pcrs)
        while remaining:
            _, sel_out, digests = self.ctx.pcr_read(_sel_string(bank, remaining))
            got = [i for s in tpm_verify.parse_pcr_selection(sel_out.marshal()) if s.bank == bank for i in s.pcrs]
            if not got:
                raise TpmError(f"tpm.bank: the TPM returned no {bank} values for PCRs {remaining} (bank not active?)")
            for i, index in enumerate(got):
                out[index] = bytes(digests.digests[i])
            remaining = [i for i in remaining if i not in out]
        return out

    def nv_indexes(self) -> set[int]:
        p, start = self.p, NV_INDEX_FIRST
        found: set[int] = set()
        while True:
            more, cap = self.ctx.get_capability(p.TPM2_CAP.HANDLES, start, 128)
            handles = [cap.data.handles.handle[i] for i in range(cap.data.handles.count)]
            found.update(int(h) for h in handles)
            if not more or not handles:
                return found
            start = int(handles[-1]) + 1

    def properties(self, first: int, count: int) -> dict[int, int]:
        _, cap = self.ctx.get_capability(self.p.TPM2_CAP.TPM_PROPERTIES, first, count)
        props = cap.data.tpmProperties
        return {int(props.tpmProperty[i].property): int(props.tpmProperty[i].value) for i in range(props.count)}

    def ek_certificate(self) -> str | None:
        """The EK certificate (PEM) from the first TCG EK-cert NV index present; cached per session."""
        if self._ek_cert is False:
            try:
                self._ek_cert = self._read_ek_cert()
            except self.p.TSS2_Exception as exc:
                if exc.rc >> 16:  # TCTI/ESYS layer: the TPM itself failed, not just this NV area
                    raise
                log.warning("tpm.ek_cert_unreadable", reason=str(exc))
                self._ek_cert = None
        return self._ek_cert if isinstance(self._ek_cert, str) else None

    def _read_ek_cert(self) -> str | None:
        present = self.nv_indexes()
        index = next((i for i in EK_CERT_INDEXES if i in present), None)
        if index is None:
            return None
        chunk = self.properties(PT_NV_BUFFER_MAX, 1).get(PT_NV_BUFFER_MAX) or 1024
        tr = self.ctx.tr_from_tpmpublic(index)
        try:
            size = self.ctx.nv_read_public(tr)[0].nvPublic.dataSize
            der = b"".join(bytes(self.ctx.nv_read(tr, min(chunk, size - off), off, auth_handle=tr))
                           for off in range(0, size, chunk))
        finally:
            self.ctx.tr_close(tr)
        return _der_to_pem(der, index)

    def close(self) -> None:
        try:
            if self.ak is not None and self.ak_transient:
                self.ctx.flush_context(self.ak)
        except Exception as exc:  # the TPM may be gone; nothing to flush then
            log.debug("tpm.flush_failed", reason=str(exc))
        finally:
            self.ak = None
            try:
                self.ctx.close()
            except Exception as exc:
                log.debug("tpm.close_failed", reason=str(exc))


def _der_to_pem(der: bytes, index: int) -> str | None:
    """NV areas are often padded past the certificate: cut at the DER length, then PEM-wrap."""
    from cryptography import x509

    if len(der) >= 4 and der[0] == 0x30 and der[1] == 0x82:
        der = der[: 4 + int.from_bytes(der[2:4], "big")]
    try:
        x509.load_der_x509_certificate(der)
    except ValueError as exc:
        log.warning("tpm.ek_cert_unparsed", nv_index=f"0x{index:08x}", reason=str(exc))
        if not der or der[0] != 0x30:
            return None
    return ssl.DER_cert_to_PEM_cert(der)


_LOCK = threading.Lock()
_SESSION: _Session | None = None


def _session(tcti: str, ak_handle: int) -> _Session:
    global _SESSION
    if _SESSION is not None and (_SESSION.tcti, _SESSION.ak_handle) != (tcti, ak_handle):
        _drop_session()
    if _SESSION is None:
        _SESSION = _Session(tcti, ak_handle)
    return _SESSION


def _drop_session() -> None:
    global _SESSION
    if _SESSION is not None:
        sess, _SESSION = _SESSION, None
        sess.close()


def close_session() -> None:
    """Release the TPM connection (service shutdown, tests); the next call reconnects."""
    with _LOCK:
        _drop_session()


def _acquire() -> None:
    if not _LOCK.acquire(timeout=LOCK_TIMEOUT_S):
        raise TpmError(f"TPM busy: another request has held it for more than {LOCK_TIMEOUT_S:.0f} s")


def _read_event_log(path: str) -> str | None:
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            data = fh.read(EVENT_LOG_MAX + 1)
    except OSError as exc:
        log.debug("tpm.event_log_unreadable", path=path, reason=exc.strerror or str(exc))
        return None
    if len(data) > EVENT_LOG_MAX:
        log.warning("tpm.event_log_too_large", path=path, limit=EVENT_LOG_MAX)
        return None
    return base64.b64encode(data).decode() if data else None


def _access_hint(tcti: str) -> str:
    path = tcti.partition(":")[2] if tcti.startswith("device:") else ""
    if path and os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f" (no read/write access to {path}: run as root or in group tss)"
    return ""


def _unavailable(tc: TpmConfig, tcti: str) -> None:
    """tpm2-pytss is missing: an explicit ``tpm.tcti`` is an error, an auto-detected device is not."""
    if tc.tcti:
        raise TpmError(f"tpm.tcti is set ({tcti}) but tpm2-pytss is not installed (install the 'tpm' extra)")
    log.warning("tpm.unavailable", tcti=tcti, reason="tpm2-pytss not installed (the 'tpm' extra)")


def _consistent_quote(
    sess: _Session, nonce: bytes, bank: str, pcrs: list[int]
) -> tuple[bytes, bytes, dict[int, bytes]]:
    """Quote, then read PCRs; retry when a PCR moved in between so the pair is self-consistent."""
    for attempt in range(1, QUOTE_ATTEMPTS + 1):
        attest, sig = sess.quote(nonce, bank, pcrs)
        values = sess.read_pcrs(bank, pcrs)
        parsed = tpm_verify.parse_attest(attest)
        hash_alg = tpm_verify.parse_signature(sig).hash_alg
        if tpm_verify.pcr_digest(hash_alg, parsed.pcr_select, {bank: values}) == parsed.pcr_digest:
            return attest, sig, values
        log.info("tpm.pcrs_moved", attempt=attempt)
    raise TpmError(f"PCRs changed between quote and read in each of {QUOTE_ATTEMPTS} attempts")


def collect_tpm_evidence(cfg: AgentConfig, nonce: bytes) -> dict[str, Any] | None:
    """TPM evidence bound to ``nonce``, or None when no TPM is present or ``tpm.mode`` is "off".

    Blocking (call it from a worker thread). Raises :class:`TpmError` when a TPM is present or
    configured but the quote fails, and ValueError for a nonce the TPM cannot carry (1..64 bytes).
    """
    tc = cfg.tpm
    if tc.mode == "off":
        return None
    if not isinstance(nonce, (bytes, bytearray)) or not 1 <= len(nonce) <= NONCE_MAX:
        raise ValueError(f"nonce: must be 1..{NONCE_MAX} bytes, got {len(nonce) if nonce is not None else None}")
    tcti = resolve_tcti(tc)
    if tcti is None:
        log.debug("tpm.absent", reason=f"no {DEVICE_PATH} and no tpm.tcti configured")
        return None
    if not pytss_available():
        _unavailable(tc, tcti)
        return None
    bank, pcrs = _selection(tc)
    started = time.monotonic()
    _acquire()
    try:
        sess = _session(tcti, tc.ak_handle)
        attest, sig, values = _consistent_quote(sess, bytes(nonce), bank, pcrs)
        ek_cert, ak_pem = sess.ek_certificate(), sess.ak_pem
    except Exception as exc:
        _drop_session()
        log.warning("tpm.quote_failed", tcti=tcti, reason=str(exc))
        if isinstance(exc, TpmError):
            raise
        raise TpmError(f"TPM quote via {tcti} failed: {exc}{_access_hint(tcti)}") from exc
    finally:
        _LOCK.release()
    log.debug("tpm.quote", tcti=tcti, pcrs=len(values), duration_ms=round((time.monotonic() - started) * 1000, 2))
    return {
        "attest": base64.b64encode(attest).decode(),
        "signature": base64.b64encode(sig).decode(),
        "pcrs": {bank: {str(i): values[i].hex() for i in pcrs}},
        "ak_public": ak_pem,
        "ek_certificate": ek_cert,
        "event_log": _read_event_log(tc.event_log),
    }


def _ascii(words: list[int]) -> str:
    return b"".join(w.to_bytes(4, "big") for w in words).replace(b"\x00", b"").decode("ascii", "replace").strip()


def tpm_status(cfg: AgentConfig) -> dict[str, Any]:
    """For ``chutes-attest doctor``: is a TPM reachable, through which TCTI, who made it, or why not."""
    tc = cfg.tpm
    status: dict[str, Any] = {"present": False, "mode": tc.mode, "tcti": None, "manufacturer": None,
                              "vendor": None, "firmware": None, "ek_certificate": None,
                              "pytss": pytss_available(), "error": None}
    if tc.mode == "off":
        return status
    tcti = status["tcti"] = resolve_tcti(tc)
    if tcti is None:
        return status
    if not status["pytss"]:
        status["error"] = "tpm2-pytss not installed (install the 'tpm' extra)"
        return status
    try:
        _acquire()
    except TpmError as exc:
        status["error"] = str(exc)
        return status
    try:
        sess = _session(tcti, tc.ak_handle)
        props = sess.properties(PT_MANUFACTURER, 8)
        status["manufacturer"] = _ascii([props.get(PT_MANUFACTURER, 0)])
        status["vendor"] = _ascii([props.get(PT_VENDOR_STRING_1 + i, 0) for i in range(4)])
        v1, v2 = props.get(PT_FIRMWARE_VERSION_1, 0), props.get(PT_FIRMWARE_VERSION_1 + 1, 0)
        status["firmware"] = f"{v1 >> 16}.{v1 & 0xFFFF}.{v2 >> 16}.{v2 & 0xFFFF}"
        status["ek_certificate"] = sess.ek_certificate() is not None
        status["present"] = True
    except Exception as exc:
        _drop_session()
        status["error"] = f"TPM via {tcti} not usable: {exc}{_access_hint(tcti)}"
    finally:
        _LOCK.release()
    return status
