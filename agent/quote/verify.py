"""Signature self-check of a TDX quote with ``cryptography``; no collateral, no TCB status.

Four independent checks, each reported by name so callers see exactly what held:

- ``quote_signature``: ECDSA-P256-SHA256 by the attestation key over the signed region;
- ``qe_report_signature``: the PCK leaf certificate's key signed the 384-byte QE report;
- ``qe_report_data_binding``: QE report_data == SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes;
- ``pck_chain``: each certificate is signed by the next, issuers are CAs, all are inside their
  validity window, and the chain ends at (or directly under) the pinned root.

Nothing here is Intel-specific apart from the default root, so a simulated PCK hierarchy verifies
the same way when its root is passed as ``root_ca_pem``.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from agent.checks import Check
from agent.quote import _tdxquote
from agent.quote.parser import Quote, parse_quote

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: SHA-256 of the DER of Intel's SGX Root CA (CN=Intel SGX Root CA, 2018-05-21..2049-12-31): the root
#: embedded in every real PCK chain and byte-identical to the anchor compiled into dcap-qvl 0.7.0.
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

CHECK_NAMES = ("quote_signature", "qe_report_signature", "qe_report_data_binding", "pck_chain")

_CHECK_ERRORS = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm)


@dataclass(frozen=True)
class VerifyResult:
    """All four checks; ``ok`` only when every one passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return len(self.checks) == len(CHECK_NAMES) and all(c.passed for c in self.checks)

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if absent)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


@functools.lru_cache(maxsize=1)
def load_pinned_root() -> bytes:
    """The packaged Intel SGX Root CA PEM, refused if its fingerprint is not the pinned one."""
    pem = (resources.files("agent") / "data" / "intel_sgx_root_ca.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    if digest != INTEL_SGX_ROOT_CA_SHA256:
        raise RuntimeError(f"packaged Intel SGX Root CA has fingerprint {digest}, expected "
                           f"{INTEL_SGX_ROOT_CA_SHA256}")
    return pem


def _p256_key(raw_xy: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_xy)


def _verify_raw(key: CertificatePublicKeyTypes, raw_rs: bytes, message: bytes) -> None:
    """Verify a raw r‖s (big-endian, 32+32) ECDSA-P256-SHA256 signature; raises on failure."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise TypeError(f"expected a P-256 public key, got {type(key).__name__}")
    r = int.from_bytes(raw_rs[:32], "big")
    s = int.from_bytes(raw_rs[32:], "big")
    key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))


def _name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _check_quote_signature(q: Quote) -> Check:
    name = "quote_signature"
    try:
        _verify_raw(_p256_key(q.attestation_key), q.signature, q.signed_data)
    except _CHECK_ERRORS as exc:
        return Check(name, False, f"attestation key does not verify the signature over bytes "
                                  f"{q.signed_region[0]}..{q.signed_region[1]}: {exc or type(exc).__name__}")
    return Check(name, True, f"ECDSA-P256-SHA256 over bytes {q.signed_region[0]}..{q.signed_region[1]} "
                             "verifies with the attestation key")


def _check_binding(q: Quote) -> Check:
    name = "qe_report_data_binding"
    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)
    if q.qe_report_data == expected:
        return Check(name, True, "QE report_data == SHA-256(attestation_key || qe_auth_data) || 0*32")
    return Check(name, False, f"QE report_data {q.qe_report_data.hex()} != expected {expected.hex()}")


def _load_chain(q: Quote) -> list[x509.Certificate]:
    if q.pck_cert_chain_type != 5:
        raise ValueError(f"certification data type {q.pck_cert_chain_type} carries no PEM chain")
    pems = q.pck_certs
    if not pems:
        raise ValueError("the PCK chain holds no PEM certificate")
    return [x509.load_pem_x509_certificate(p) for p in pems]


def _check_qe_report_signature(chain: list[x509.Certificate] | None, why: str, q: Quote) -> Check:
    name = "qe_report_signature"
    if chain is None:
        return Check(name, False, f"no PCK leaf certificate: {why}")
    try:
        _verify_raw(chain[0].public_key(), q.qe_report_signature, q.qe_report)
    except _CHECK_ERRORS as exc:
        return Check(name, False, f"PCK leaf '{_name(chain[0])}' does not verify the QE report signature: "
                                  f"{exc or type(exc).__name__}")
    return Check(name, True, f"QE report signature verifies with the PCK leaf '{_name(chain[0])}'")


def _check_chain(chain: list[x509.Certificate] | None, why: str, root: x509.Certificate,
                 now: dt.datetime) -> Check:
    name = "pck_chain"
    if chain is None:
        return Check(name, False, why)
    root_der = root.public_bytes(Encoding.DER)
    root_fp = hashlib.sha256(root_der).hexdigest()
    certs = list(chain)
    if certs[-1].public_bytes(Encoding.DER) == root_der:
        certs.pop()
    elif certs[-1].issuer == certs[-1].subject:
        fp = hashlib.sha256(certs[-1].public_bytes(Encoding.DER)).hexdigest()
        return Check(name, False, f"chain ends at root '{_name(certs[-1])}' (sha256 {fp}), "
                                  f"not the pinned root (sha256 {root_fp})")
    if not certs:
        return Check(name, False, "the chain holds only the root, no PCK leaf")
    path = [*certs, root]
    for i, cert in enumerate(path):
        issuer = path[i + 1] if i + 1 < len(path) else root
        try:
            cert.verify_directly_issued_by(issuer)
        except _CHECK_ERRORS as exc:
            return Check(name, False, f"certificate {i} '{_name(cert)}' is not signed by "
                                      f"'{_name(issuer)}': {exc or type(exc).__name__}")
        if i + 1 < len(path):
            try:
                bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                return Check(name, False, f"issuer '{_name(issuer)}' of certificate {i} is not a CA "
                                          "(basicConstraints cA is not true)")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return Check(name, False, f"certificate {i} '{_name(cert)}' is outside its validity window "
                                      f"{cert.not_valid_before_utc.isoformat()}..{cert.not_valid_after_utc.isoformat()}"
                                      f" at {now.isoformat()}")
    names = " -> ".join(_name(c) for c in path)
    return Check(name, True, f"{len(chain)} certificate(s) chain to the pinned root: {names} "
                             f"(root sha256 {root_fp})")


def verify_quote(q_or_bytes: _tdxquote.Quote | Buffer, root_ca_pem: bytes | None = None, *,
                 now: dt.datetime | None = None) -> VerifyResult:
    """Run the four signature self-checks; ``root_ca_pem`` None means the pinned Intel SGX Root CA.

    Raises :class:`QuoteError` only if given bytes that do not parse; every check failure is
    reported in the result instead. ``now`` (aware datetime) sets the certificate validity time.
    """
    if isinstance(q_or_bytes, Quote):
        q = q_or_bytes
    elif isinstance(q_or_bytes, _tdxquote.Quote):  # the bare C type: re-wrap for pck_certs
        q = parse_quote(q_or_bytes.raw)
    else:
        q = parse_quote(q_or_bytes)
    root = x509.load_pem_x509_certificate(root_ca_pem if root_ca_pem is not None else load_pinned_root())
    when = now or dt.datetime.now(dt.UTC)
    chain: list[x509.Certificate] | None
    why = ""
    try:
        chain = _load_chain(q)
    except _CHECK_ERRORS as exc:
        chain, why = None, f"PCK chain unusable: {exc}"
    return VerifyResult([
        _check_quote_signature(q),
        _check_qe_report_signature(chain, why, q),
        _check_binding(q),
        _check_chain(chain, why, root, when),
    ])
