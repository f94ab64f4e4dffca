"""Offline verification of one GPU's evidence: nonce, report signature, device chain, FWID.

What it proves: the report was signed by a GPU attestation key whose certificate chains to the
pinned NVIDIA Device Identity root (never the root the node sent), for exactly the nonce asked,
and the firmware id in the signed report equals the one NVIDIA certified in the leaf.

What it does NOT do, and says so in every result (``not_checked``):
- ``ocsp``: revocation of the device chain needs NVIDIA's live OCSP responder;
- ``rim``: golden-measurement comparison needs NVIDIA's signed RIM files for this driver/VBIOS.
The validator's NRAS call covers both; this check is for the node itself (e.g. before it sets
the GPU ready state) and for tests.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.checks import Check, CheckResult
from agent.evidence.spdm import NONCE_LEN, SIGNATURE_LEN, SpdmParseError, SpdmReport, parse_report

CHAIN_LENGTH = 5  # NVIDIA's MAX_CERT_CHAIN_LENGTH: leaf, BROM, provisioner ICA, identity, root
FWID_EXTENSION_OIDS = ("2.23.133.5.4.1", "2.23.133.5.4.1.1")  # TCG DICE TcbInfo (and its variant)
_SHA384_OID_DER = bytes.fromhex("0609608648016503040202")  # OID 2.16.840.1.101.3.4.2.2
NOT_CHECKED = ("ocsp", "rim")
ROOT_RESOURCE = "data/nvidia_device_identity_root.pem"


@dataclass
class GpuVerifyResult(CheckResult):
    """``ok`` only if every check passed; what is out of scope is listed in ``not_checked``."""

    report: SpdmReport | None = None
    not_checked: tuple[str, ...] = NOT_CHECKED



def pinned_root_pem(path: str | Path = "") -> bytes:
    """The NVIDIA Device Identity root: ``path`` when configured, else the copy shipped in the package."""
    if path:
        return Path(path).read_bytes()
    return resources.files("agent").joinpath(ROOT_RESOURCE).read_bytes()


def fwids_from_leaf(cert: x509.Certificate) -> list[bytes]:
    """SHA-384 FWIDs in the leaf's TcbInfo extension: every ``SEQUENCE {sha384 OID, OCTET STRING(48)}``.

    Walking the DER for that pair covers both NVIDIA's Hopper layout (FWID as the extension's last
    element) and the DICE ``fwids [6]`` list used on Blackwell, without trusting fixed offsets.
    """
    found: list[bytes] = []
    for oid in FWID_EXTENSION_OIDS:
        try:
            ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
        except x509.ExtensionNotFound:
            continue
        value = ext.value
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
        _collect_fwids(raw, found)
    return found


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level DER TLVs of ``data`` (definite lengths only); raises ValueError on bad encoding."""
    items: list[tuple[int, bytes]] = []
    off = 0
    while off < len(data):
        if off + 2 > len(data):
            raise ValueError("truncated DER header")
        tag, length = data[off], data[off + 1]
        off += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or off + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[off : off + n], "big")
            off += n
        if off + length > len(data):
            raise ValueError("truncated DER value")
        items.append((tag, data[off : off + length]))
        off += length
    return items


def _collect_fwids(data: bytes, out: list[bytes]) -> None:
    try:
        items = _der_items(data)
    except ValueError:
        return
    for tag, value in items:
        if tag == 0x30:  # SEQUENCE: is it {sha384 OID, OCTET STRING(48)}?
            try:
                inner = _der_items(value)
            except ValueError:
                continue
            if (
                len(inner) == 2
                and bytes([inner[0][0], len(inner[0][1])]) + inner[0][1] == _SHA384_OID_DER
                and inner[1][0] == 0x04
                and len(inner[1][1]) == 48
            ):
                out.append(inner[1][1])
                continue
        if tag & 0x20:  # constructed (SEQUENCE, SET, context-specific): descend
            _collect_fwids(value, out)


def _check_chain(certs: list[x509.Certificate], root: x509.Certificate, now: dt.datetime) -> Check:
    if len(certs) != CHAIN_LENGTH:
        return Check("chain", False, f"expected {CHAIN_LENGTH} certificates (leaf .. root), got {len(certs)}")
    # Never trust the root the node sent: drop it and chain the rest to the pinned root.
    path = [*certs[:-1], root]
    for i, cert in enumerate(path):
        subject = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return Check("chain", False, f"certificate {i} ({subject}) is outside its validity period")
        if i + 1 < len(path):
            issuer = path[i + 1]
            try:
                bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                issuer_name = issuer.subject.rfc4514_string()
                return Check("chain", False, f"issuer of certificate {i} ({issuer_name}) is not a CA")
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as exc:
                where = issuer.subject.rfc4514_string()
                if i + 1 == len(path) - 1:
                    where = f"the pinned root {where}"
                reason = str(exc) or "bad signature"
                return Check("chain", False, f"certificate {i} ({subject}) is not issued by {where}: {reason}")
    sent_root_matches = certs[-1] == root
    leaf = certs[0].subject.rfc4514_string()
    return Check(
        "chain",
        True,
        f"{leaf} chains to pinned root {root.subject.rfc4514_string()}"
        + ("" if sent_root_matches else " (the chain's own last certificate differs from the pinned root; ignored)"),
    )


def _check_signature(report: SpdmReport, leaf: x509.Certificate) -> Check:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return Check("signature", False, "leaf key is not ECDSA P-384")
    half = SIGNATURE_LEN // 2
    r = int.from_bytes(report.signature[:half], "big")
    s = int.from_bytes(report.signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return Check("signature", False,
                     "ECDSA P-384 signature over request||response does not verify with the leaf key")
    return Check("signature", True, "ECDSA P-384/SHA-384 signature verifies with the leaf key")


def _check_fwid(report: SpdmReport, leaf: x509.Certificate) -> Check:
    reported = report.opaque.fwid
    certified = fwids_from_leaf(leaf)
    if reported is None:
        return Check("fwid", True, "report carries no FWID (nothing to compare)")
    if not certified:
        return Check("fwid", False, "leaf certificate has no FWID extension (2.23.133.5.4.1)")
    if reported in certified:
        return Check("fwid", True, f"report FWID {reported.hex()[:16]}… equals the leaf certificate's")
    return Check("fwid", False, f"report FWID {reported.hex()[:16]}… differs from the leaf certificate's")


def verify_gpu_evidence(
    report: bytes, cert_chain_pem: bytes, nonce: bytes, root_pem: bytes | None = None, *, now: dt.datetime | None = None
) -> GpuVerifyResult:
    """Run every offline check and return them all (a failing check does not hide the others)."""
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce: expected exactly {NONCE_LEN} bytes, got {len(nonce) if nonce is not None else None}")
    now = now or dt.datetime.now(dt.UTC)
    root = x509.load_pem_x509_certificate(root_pem if root_pem is not None else pinned_root_pem())
    checks: list[Check] = []
    parsed: SpdmReport | None = None
    try:
        parsed = parse_report(report)
        checks.append(Check("parse", True, f"{len(parsed.raw)} bytes, {len(parsed.blocks)} measurement blocks"))
    except SpdmParseError as exc:
        checks.append(Check("parse", False, str(exc)))
    try:
        certs = x509.load_pem_x509_certificates(cert_chain_pem)
    except ValueError as exc:
        certs = []
        checks.append(Check("chain", False, f"certificate chain does not parse: {exc}"))
    else:
        checks.append(_check_chain(certs, root, now))
    if parsed is None:
        for name in ("nonce", "signature", "fwid"):
            checks.append(Check(name, False, "not run: the report does not parse"))
        return GpuVerifyResult(checks)
    if parsed.nonce == bytes(nonce):
        checks.append(Check("nonce", True, f"request nonce {parsed.nonce.hex()} as expected"))
    else:
        checks.append(Check("nonce", False, f"request nonce {parsed.nonce.hex()} != expected {bytes(nonce).hex()}"))
    if certs:
        checks.append(_check_signature(parsed, certs[0]))
        checks.append(_check_fwid(parsed, certs[0]))
    else:
        checks.append(Check("signature", False, "not run: no leaf certificate"))
        checks.append(Check("fwid", False, "not run: no leaf certificate"))
    info = {
        "driver_version": parsed.opaque.driver_version,
        "vbios_version": parsed.opaque.vbios_version,
        "feature_flag": parsed.opaque.feature_flag,
        "project": parsed.opaque.project,
    }
    return GpuVerifyResult(checks, report=parsed, info=info)


def verify_evidence_entry(entry: dict[str, Any], nonce: bytes, root_pem: bytes | None = None) -> GpuVerifyResult:
    """Verify one ``{"certificate": b64(PEM), "evidence": b64(report), ...}`` wire entry."""
    try:
        report = base64.b64decode(entry["evidence"], validate=True)
        chain = base64.b64decode(entry["certificate"], validate=True)
    except KeyError as exc:
        raise ValueError(f"evidence entry: missing field {exc.args[0]!r}") from None
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"evidence entry: evidence/certificate is not valid base64: {exc}") from None
    return verify_gpu_evidence(report, chain, nonce, root_pem)
