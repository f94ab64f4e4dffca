"""Local verification of an AMD SEV-SNP attestation report with ``cryptography``; nothing is fetched.

The report is checked against its VEK (the VCEK, or the VLEK of a cloud provider) and AMD's chain
VEK <- ASK (VCEK) or ASVK (VLEK) <- ARK, with the ARK pinned per product line (Milan, Genoa (also
Bergamo and Siena), Turin). Every check is reported by name, so callers see exactly what held:

- ``report_signature``: ECDSA P-384/SHA-384 by the VEK over bytes [0, 0x2A0); r and s are 72-byte
  little-endian numbers;
- ``ark_pinned``: the ARK is the pinned ARK of the report's product line (SHA-256 of its DER);
- ``ark_self_signature``: the ARK is self-issued, a CA, and its RSASSA-PSS signature verifies;
- ``intermediate_signed_by_ark``: the ASK (VCEK) or ASVK (VLEK) is named ``SEV-<P>`` /
  ``SEV-VLEK-<P>``, issued by the ARK, a CA, and signed by it with RSASSA-PSS SHA-384 (MGF1-SHA-384,
  salt 48);
- ``vek_signed_by_intermediate``: the VEK is named ``SEV-VCEK`` / ``SEV-VLEK``, issued by the
  intermediate and signed by it in the same way;
- ``validity``: every certificate of the path is inside its validity window at ``now``;
- ``tcb_matches_certificate``: the VEK's TCB extensions equal REPORTED_TCB component by component,
  decoded in the product's layout (Turin adds FMC);
- ``hwid_matches_chip_id`` (VCEK: hwID == CHIP_ID; Turin: 8 bytes == CHIP_ID[0:8], the rest zero) or
  ``csp_id_present`` (VLEK: a cspID and no hwID);
- ``signing_key_matches_certificate``: KEY_INFO.SIGNING_KEY names the kind of certificate given;
- ``policy_debug_off``: POLICY bit 19 (DEBUG) is 0;
- ``vmpl_zero``: the report was requested for VMPL 0;
- ``report_data_binding``: REPORT_DATA equals the caller's expected 64 bytes (only when given).

What is *not* verified is listed in ``not_checked`` in plain words: the measurement against a
published value, CRL revocation, minimum TCB / firmware policy, and, when no VEK was available, every
check that needs it. A result is never ``ok`` without a VEK: upstream KVM hosts return an empty
certificate table, and this module never fetches a VCEK from AMD's KDS.

AMD's VCEK/VLEK certificates have serial number 0 and no basicConstraints, key usage or key
identifiers, so the links are verified by hand (signature, names, time) rather than by an RFC 5280
path builder; ``cryptography``'s serial-number warning is silenced locally while they are loaded.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from agent.checks import Check
from agent.errors import BadInputError
from agent.quote import _snpreport
from agent.quote.snp_parser import decode_tcb, parse_snp_report

#: Product lines with a pinned AMD chain (Bergamo and Siena use Genoa's, per AMD's KDS).
PRODUCTS = ("Milan", "Genoa", "Turin")

#: SHA-256 over the DER of each packaged AMD certificate (sev-snp.md §3.1), keyed (product, kind):
#: kind "ark" (root), "ask" (signs VCEKs), "asvk" (signs VLEKs). A packaged file whose fingerprint
#: differs is refused (:func:`load_amd_cert`).
AMD_CERT_SHA256: dict[tuple[str, str], str] = {
    ("Milan", "ark"): "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    ("Milan", "ask"): "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    ("Milan", "asvk"): "c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5",
    ("Genoa", "ark"): "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    ("Genoa", "ask"): "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    ("Genoa", "asvk"): "197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372",
    ("Turin", "ark"): "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
    ("Turin", "ask"): "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
    ("Turin", "asvk"): "104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c",
}

#: The pinned ARK fingerprints alone, mapped to their product line.
ARK_SHA256: dict[str, str] = {fp: p for (p, kind), fp in AMD_CERT_SHA256.items() if kind == "ark"}

#: Every check this module can report, in result order (one of the hwID/cspID pair appears, and
#: ``report_data_binding`` only when an expected value is given).
CHECK_NAMES = ("report_signature", "ark_pinned", "ark_self_signature", "intermediate_signed_by_ark",
               "vek_signed_by_intermediate", "validity", "tcb_matches_certificate", "hwid_matches_chip_id",
               "csp_id_present", "signing_key_matches_certificate", "policy_debug_off", "vmpl_zero",
               "report_data_binding")

#: The GHCB extended-request certificate table GUIDs (sev-snp.md §2.3); ASK is also the ASVK's slot.
CERT_TABLE_GUIDS: dict[str, str] = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
}
_ENTRY = 24  # GUID[16] + u32 offset + u32 length
#: GUID bytes in textual (RFC 4122) order, as the kernel, go-sev-guest and virtee/sev store them, and
#: in the mixed-endian (Microsoft) order some hosts may use: the four GUIDs stay distinct either way.
_GUID_BYTES: dict[bytes, str] = {
    **{uuid.UUID(g).bytes: k for k, g in CERT_TABLE_GUIDS.items()},
    **{uuid.UUID(g).bytes_le: k for k, g in CERT_TABLE_GUIDS.items()},
}

NO_VEK = ("VCEK not supplied: the host's certificate table was empty (upstream KVM supplies none) and "
          "quote.snp_vek_file is not set; nothing is fetched from AMD KDS")

_AMD_OID = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION = _AMD_OID + "1"
OID_PRODUCT_NAME = _AMD_OID + "2"
OID_HWID = _AMD_OID + "4"
OID_CSPID = _AMD_OID + "5"
#: TCB component -> VEK extension OID (blSPL, teeSPL, snpSPL, ucodeSPL, fmcSPL (Turin)).
TCB_OIDS: dict[str, str] = {
    "bl": _AMD_OID + "3.1",
    "tee": _AMD_OID + "3.2",
    "snp": _AMD_OID + "3.3",
    "ucode": _AMD_OID + "3.8",
    "fmc": _AMD_OID + "3.9",
}

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_SIGNED_LEN = 0x2A0
_CHECK_ERRORS = (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm)
_NAMES_BY_KIND = {"VCEK": ("ask", "SEV-{p}", "SEV-VCEK"), "VLEK": ("asvk", "SEV-VLEK-{p}", "SEV-VLEK")}


class SnpCertTableError(BadInputError, ValueError):
    """The auxblob certificate table does not parse; ``offset`` is the byte the problem is at."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"SEV-SNP certificate table: {message}")
        self.offset = offset


class SnpCertificateError(BadInputError, ValueError):
    """A VEK or CA certificate given to the verifier does not load."""


@contextmanager
def _amd_cert_warnings() -> Iterator[None]:
    """AMD's VCEKs/VLEKs have serial number 0; ``cryptography`` warns on loading and reading it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        yield


def _load_cert(data: bytes, what: str) -> x509.Certificate:
    raw = bytes(data)
    try:
        with _amd_cert_warnings():
            if raw.lstrip().startswith(b"-----BEGIN"):
                return x509.load_pem_x509_certificate(raw)
            return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise SnpCertificateError(f"{what} ({len(raw)} bytes) is neither DER nor PEM X.509: {exc}") from None


def load_vek(data: bytes) -> x509.Certificate:
    """A VCEK/VLEK certificate from DER or PEM bytes (the serial-0 warning silenced)."""
    return _load_cert(data, "VEK certificate")


def _load_pem_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        with _amd_cert_warnings():
            return x509.load_pem_x509_certificates(bytes(pem))
    except ValueError as exc:
        raise SnpCertificateError(f"{what} holds no loadable PEM certificate: {exc}") from None


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def _data_dir() -> Traversable:
    """The packaged ``agent/data/amd`` folder."""
    return resources.files("agent") / "data" / "amd"


@functools.cache
def load_amd_cert(product: str, kind: str) -> x509.Certificate:
    """The packaged AMD ``kind`` ("ark", "ask", "asvk") of ``product``, refused if its fingerprint is
    not the pinned one."""
    pinned = AMD_CERT_SHA256.get((product, kind))
    if pinned is None:
        raise KeyError(f"no pinned AMD {kind} for product line {product!r}")
    name = f"{product.lower()}-{kind}.pem"
    pem = (_data_dir() / name).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    digest = _fingerprint(cert)
    if digest != pinned:
        raise RuntimeError(f"packaged AMD certificate {name} has fingerprint {digest}, expected {pinned}")
    return cert


def pinned_arks() -> list[x509.Certificate]:
    """AMD's pinned ARKs, one per product line (:data:`PRODUCTS` order)."""
    return [load_amd_cert(p, "ark") for p in PRODUCTS]


def parse_cert_table(aux: bytes) -> dict[str, bytes]:
    """The certificates of a GHCB certificate table (configfs ``auxblob``), by kind.

    Keys are "vcek", "vlek", "ask", "ark" (matched by GUID, in either byte order); entries with other
    GUIDs are bounds-checked and otherwise ignored. Empty input is an empty table. Raises
    :class:`SnpCertTableError` for a table without its all-zero terminator, an entry pointing into the
    entry list or past the end of the blob, a zero length, overlapping entries or a repeated GUID.
    """
    blob = bytes(aux)
    if not blob:
        return {}
    entries: list[tuple[int, bytes, int, int]] = []
    pos = 0
    while True:
        if pos + _ENTRY > len(blob):
            raise SnpCertTableError(f"no all-zero terminating entry within the {len(blob)}-byte table "
                                    f"({len(entries)} entries read)", pos)
        guid, off, length = (blob[pos:pos + 16], int.from_bytes(blob[pos + 16:pos + 20], "little"),
                             int.from_bytes(blob[pos + 20:pos + 24], "little"))
        if not any(blob[pos:pos + _ENTRY]):
            break
        entries.append((pos, guid, off, length))
        pos += _ENTRY
    header_end = pos + _ENTRY
    found: dict[str, bytes] = {}
    seen: dict[bytes, int] = {}
    spans: list[tuple[int, int, int, str]] = []
    for i, (at, guid, off, length) in enumerate(entries):
        kind = _GUID_BYTES.get(guid)
        label = f"entry {i} ({kind or str(uuid.UUID(bytes=guid))})"
        canon = uuid.UUID(CERT_TABLE_GUIDS[kind]).bytes if kind else guid
        if canon in seen:
            raise SnpCertTableError(f"{label} repeats the GUID of entry {seen[canon]}", at)
        seen[canon] = i
        if length == 0:
            raise SnpCertTableError(f"{label} has length 0", at + 20)
        if off < header_end:
            raise SnpCertTableError(f"{label} offset {off} points into the {header_end}-byte entry list", at + 16)
        if off + length > len(blob):
            raise SnpCertTableError(f"{label} certificate [{off}, {off + length}) ends past the "
                                    f"{len(blob)}-byte table", at + 16)
        for j_start, j_end, j, j_label in spans:
            if off < j_end and j_start < off + length:
                raise SnpCertTableError(f"{label} [{off}, {off + length}) overlaps entry {j} {j_label} "
                                        f"[{j_start}, {j_end})", at + 16)
        spans.append((off, off + length, i, label.split(" ", 2)[2]))
        if kind:
            found[kind] = blob[off:off + length]
    return found


# --- certificate helpers -----------------------------------------------------------------------------

def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def _ext_raw(cert: x509.Certificate, oid: str) -> bytes | None:
    for ext in cert.extensions:
        if ext.oid.dotted_string == oid:
            value = ext.value
            return bytes(value.value) if isinstance(value, x509.UnrecognizedExtension) else None
    return None


def _der_tlv(raw: bytes, tag: int) -> bytes:
    """The content of one DER TLV with ``tag`` spanning all of ``raw`` (ValueError otherwise)."""
    if len(raw) < 2 or raw[0] != tag:
        raise ValueError(f"expected DER tag 0x{tag:02x}, got {raw[:4].hex() or 'nothing'}")
    n, pos = raw[1], 2
    if n & 0x80:
        width = n & 0x7F
        if width == 0 or width > 4 or len(raw) < 2 + width:
            raise ValueError(f"bad DER length in {raw[:8].hex()}")
        n, pos = int.from_bytes(raw[2:2 + width], "big"), 2 + width
    if pos + n != len(raw):
        raise ValueError(f"DER length {n} does not span the {len(raw) - pos} content bytes")
    return raw[pos:]


def _ext_int(cert: x509.Certificate, oid: str) -> int | None:
    raw = _ext_raw(cert, oid)
    if raw is None:
        return None
    content = _der_tlv(raw, 0x02)
    if not content or content[0] & 0x80:
        raise ValueError(f"extension {oid} is not a non-negative INTEGER ({raw.hex()})")
    return int.from_bytes(content, "big")


def _ext_ia5(cert: x509.Certificate, oid: str) -> str | None:
    raw = _ext_raw(cert, oid)
    return None if raw is None else _der_tlv(raw, 0x16).decode("ascii")


def _product_from_name(name: str) -> str | None:
    """"Milan-B0" -> "Milan", "Bergamo"/"Siena" -> "Genoa"; None when not a known line."""
    line = name.split("-", 1)[0]
    if line in ("Bergamo", "Siena"):
        return "Genoa"
    return line if line in PRODUCTS else None


def _verify_pss(child: x509.Certificate, parent: x509.Certificate) -> None:
    """``parent`` signed ``child`` with RSASSA-PSS SHA-384, MGF1-SHA-384, salt 48; raises otherwise."""
    if child.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS:
        raise ValueError(f"signature algorithm {child.signature_algorithm_oid.dotted_string} is not RSASSA-PSS")
    if not isinstance(child.signature_hash_algorithm, hashes.SHA384):
        raise ValueError("signature hash is not SHA-384")
    key = parent.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError(f"issuer key is {type(key).__name__}, not RSA")
    key.verify(child.signature, child.tbs_certificate_bytes, _PSS, hashes.SHA384())


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _err(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# --- the result --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SnpVerifyResult:
    """The named checks and what was not checked; ``ok`` only when there are checks and all passed.

    ``product`` is the product line whose chain and TCB layout were used (None when undetermined),
    ``signing_key`` the KEY_INFO kind ("VCEK", "VLEK" or "unknown (<n>)"), ``vek_source`` where the
    VEK came from ("cert_table", "argument" or None) and ``chain_source`` where the ASK/ASVK and ARK
    came from ("chain_pem", "cert_table", "packaged", or a "+"-joined mix).
    """

    checks: list[Check] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    product: str | None = None
    product_source: str = ""
    signing_key: str = ""
    vek_source: str | None = None
    chain_source: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, name: str) -> Check:
        """The check called ``name`` (KeyError if absent)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "product": self.product,
            "product_source": self.product_source,
            "signing_key": self.signing_key,
            "vek_source": self.vek_source,
            "chain_source": self.chain_source,
            "checks": [c.to_dict() for c in self.checks],
            "not_checked": list(self.not_checked),
        }


# --- the checks --------------------------------------------------------------------------------------

def _check_report_signature(r: _snpreport.SnpReport, vek: x509.Certificate | None, no_vek: str) -> Check:
    name = "report_signature"
    if vek is None:
        return Check(name, False, f"not possible: {no_vek}")
    if r.signature_algo != 1:
        return Check(name, False, f"SIGNATURE_ALGO is {r.signature_algo}, not 1 (ECDSA P-384 with SHA-384)")
    key = vek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return Check(name, False, f"VEK '{_cn(vek)}' key is not EC P-384")
    sig = encode_dss_signature(int.from_bytes(r.signature_r, "little"), int.from_bytes(r.signature_s, "little"))
    try:
        key.verify(sig, r.signed_data, ec.ECDSA(hashes.SHA384()))
    except _CHECK_ERRORS as exc:
        return Check(name, False, f"VEK '{_cn(vek)}' does not verify the ECDSA P-384/SHA-384 signature over bytes "
                                  f"0..{_SIGNED_LEN}: {_err(exc)}")
    return Check(name, True, f"ECDSA P-384/SHA-384 over bytes 0..{_SIGNED_LEN} verifies with the VEK '{_cn(vek)}'")


def _check_ark_pinned(ark: x509.Certificate | None, product: str | None,
                      trusted: Sequence[x509.Certificate] | None) -> Check:
    name = "ark_pinned"
    if product is None:
        return Check(name, False, "product line undetermined (no CPUID in the report, no VEK productName, no "
                                  "ARK that verifies), so there is no ARK to pin")
    if ark is None:
        return Check(name, False, f"no ARK for {product}: none supplied and none of the trusted ARKs is "
                                  f"'ARK-{product}'")
    fp = _fingerprint(ark)
    if trusted is None:
        pinned_for = ARK_SHA256.get(fp)
        if pinned_for is None:
            return Check(name, False, f"ARK '{_cn(ark)}' (sha256 {fp}) is not one of AMD's pinned ARKs")
        if pinned_for != product:
            return Check(name, False, f"ARK is AMD's pinned {pinned_for} root (sha256 {fp}), but the product "
                                      f"line is {product}")
        return Check(name, True, f"ARK 'ARK-{product}' is AMD's pinned {product} root (sha256 {fp})")
    der = ark.public_bytes(Encoding.DER)
    if not any(t.public_bytes(Encoding.DER) == der for t in trusted):
        return Check(name, False, f"ARK '{_cn(ark)}' (sha256 {fp}) is not one of the {len(trusted)} trusted ARKs")
    if _cn(ark) != f"ARK-{product}":
        return Check(name, False, f"trusted ARK is '{_cn(ark)}', but the product line is {product}")
    return Check(name, True, f"ARK '{_cn(ark)}' is a trusted ARK given by the caller (sha256 {fp})")


def _check_ark_self(ark: x509.Certificate | None) -> Check:
    name = "ark_self_signature"
    if ark is None:
        return Check(name, False, "no ARK")
    if ark.issuer != ark.subject:
        return Check(name, False, f"ARK '{_cn(ark)}' is not self-issued (issuer {ark.issuer.rfc4514_string()})")
    if not _is_ca(ark):
        return Check(name, False, f"ARK '{_cn(ark)}' is not a CA (basicConstraints cA is not true)")
    try:
        _verify_pss(ark, ark)
    except _CHECK_ERRORS as exc:
        return Check(name, False, f"ARK '{_cn(ark)}' self-signature does not verify: {_err(exc)}")
    return Check(name, True, f"ARK '{_cn(ark)}' is self-signed (RSASSA-PSS SHA-384, MGF1-SHA-384, salt 48)")


def _check_link(name: str, child: x509.Certificate | None, parent: x509.Certificate | None,
                want_cn: str | None, child_what: str, parent_what: str, need_ca: bool, no_child: str) -> Check:
    if child is None:
        return Check(name, False, no_child)
    if want_cn is None:
        return Check(name, False, f"product line undetermined, so the {child_what} name cannot be checked")
    if _cn(child) != want_cn:
        return Check(name, False, f"{child_what} is '{_cn(child)}', expected '{want_cn}'")
    if parent is None:
        return Check(name, False, f"no {parent_what} certificate to verify '{want_cn}' with")
    if child.issuer != parent.subject:
        return Check(name, False, f"'{want_cn}' is issued by '{child.issuer.rfc4514_string()}', not by "
                                  f"{parent_what} '{parent.subject.rfc4514_string()}'")
    if need_ca and not _is_ca(child):
        return Check(name, False, f"{child_what} '{want_cn}' is not a CA (basicConstraints cA is not true)")
    try:
        _verify_pss(child, parent)
    except _CHECK_ERRORS as exc:
        return Check(name, False, f"'{want_cn}' is not signed by {parent_what} '{_cn(parent)}': {_err(exc)}")
    return Check(name, True, f"'{want_cn}' is signed by '{_cn(parent)}' (RSASSA-PSS SHA-384, MGF1-SHA-384, "
                             "salt 48)")


def _check_validity(path: list[tuple[str, x509.Certificate | None]], now: dt.datetime) -> Check:
    name = "validity"
    missing = [what for what, c in path if c is None]
    for what, cert in path:
        if cert is None:
            continue
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not start <= now <= end:
            return Check(name, False, f"{what} '{_cn(cert)}' is outside its validity window {start.isoformat()}.."
                                      f"{end.isoformat()} at {now.isoformat()}")
    held = ", ".join(f"{what} '{_cn(c)}'" for what, c in path if c is not None)
    if missing:
        return Check(name, False, f"not possible for {', '.join(missing)} (not available); "
                                  f"{held or 'nothing else'} within its window at {now.isoformat()}")
    return Check(name, True, f"{held} within their validity windows at {now.isoformat()}")


def _check_tcb(r: _snpreport.SnpReport, vek: x509.Certificate | None, product: str | None, no_vek: str) -> Check:
    name = "tcb_matches_certificate"
    if vek is None:
        return Check(name, False, f"not possible: {no_vek}")
    if product is None:
        return Check(name, False, "product line undetermined, so the REPORTED_TCB layout is unknown")
    reported = decode_tcb(r.reported_tcb, product)
    mismatched: list[str] = []
    try:
        for comp, value in reported.items():
            oid = TCB_OIDS.get(comp)
            cert_value = None if oid is None else _ext_int(vek, oid)
            if cert_value is None:
                mismatched.append(f"{comp}: no {comp}SPL extension ({oid or 'unknown OID'}) in the VEK")
            elif cert_value != value:
                mismatched.append(f"{comp}: report {value}, certificate {cert_value}")
    except (ValueError, UnicodeDecodeError) as exc:
        return Check(name, False, f"VEK TCB extension does not decode: {_err(exc)}")
    shown = " ".join(f"{k}={v}" for k, v in reported.items())
    if mismatched:
        return Check(name, False, f"VEK TCB differs from REPORTED_TCB {r.reported_tcb.hex()} ({product} layout): "
                                  + "; ".join(mismatched))
    return Check(name, True, f"VEK TCB extensions equal REPORTED_TCB {r.reported_tcb.hex()} ({product} layout: "
                             f"{shown})")


def _check_hwid(r: _snpreport.SnpReport, vek: x509.Certificate | None, product: str | None, no_vek: str) -> Check:
    name = "hwid_matches_chip_id"
    if vek is None:
        return Check(name, False, f"not possible: {no_vek}")
    raw = _ext_raw(vek, OID_HWID)
    if raw is None:
        return Check(name, False, f"VEK '{_cn(vek)}' has no hwID extension ({OID_HWID})")
    # KDS puts the raw bytes there with no DER tag; a DER OCTET STRING wrapping is accepted too.
    hwid = raw[2:] if len(raw) >= 2 and raw[0] == 0x04 and raw[1] == len(raw) - 2 and len(raw) - 2 in (8, 64) \
        else raw
    chip = bytes(r.chip_id)
    if not any(chip):
        return Check(name, False, "CHIP_ID is all zero (masked by the host), so it cannot match the VCEK hwID")
    if len(hwid) == 64:
        if hmac.compare_digest(hwid, chip):
            return Check(name, True, "VCEK hwID equals CHIP_ID (64 bytes)")
        return Check(name, False, f"VCEK hwID {hwid.hex()} != CHIP_ID {chip.hex()}")
    if len(hwid) == 8 and product == "Turin":
        if hmac.compare_digest(hwid, chip[:8]) and not any(chip[8:]):
            return Check(name, True, "VCEK hwID (8 bytes, Turin) equals CHIP_ID[0:8] and CHIP_ID[8:64] is zero")
        return Check(name, False, f"VCEK hwID {hwid.hex()} != CHIP_ID[0:8] {chip[:8].hex()} or CHIP_ID[8:64] "
                                  "is not zero")
    return Check(name, False, f"VCEK hwID is {len(hwid)} bytes; expected 64 (or 8 on Turin, product line "
                              f"{product or 'undetermined'})")


def _check_csp_id(vek: x509.Certificate | None, no_vek: str) -> Check:
    name = "csp_id_present"
    if vek is None:
        return Check(name, False, f"not possible: {no_vek}")
    try:
        csp = _ext_ia5(vek, OID_CSPID)
    except (ValueError, UnicodeDecodeError) as exc:
        return Check(name, False, f"VLEK cspID extension does not decode: {_err(exc)}")
    if not csp:
        return Check(name, False, f"VLEK '{_cn(vek)}' has no (or an empty) cspID extension ({OID_CSPID})")
    if _ext_raw(vek, OID_HWID) is not None:
        return Check(name, False, f"VLEK carries cspID '{csp}' but also a hwID, which a VLEK must not")
    return Check(name, True, f"VLEK cspID '{csp}', no hwID")


def _check_signing_key(r: _snpreport.SnpReport, vek: x509.Certificate | None, no_vek: str) -> Check:
    name = "signing_key_matches_certificate"
    if vek is None:
        return Check(name, False, f"not possible: {no_vek}")
    kinds = {"SEV-VCEK": 0, "SEV-VLEK": 1}
    cert_kind = kinds.get(_cn(vek))
    report_kind = {0: "VCEK", 1: "VLEK"}.get(r.signing_key, f"unknown ({r.signing_key})")
    if cert_kind is None:
        return Check(name, False, f"VEK subject '{_cn(vek)}' is neither SEV-VCEK nor SEV-VLEK")
    if cert_kind != r.signing_key:
        return Check(name, False, f"KEY_INFO.SIGNING_KEY is {r.signing_key} ({report_kind}) but the certificate is "
                                  f"'{_cn(vek)}'")
    return Check(name, True, f"KEY_INFO.SIGNING_KEY {r.signing_key} ({report_kind}) matches '{_cn(vek)}'")


def _check_debug(r: _snpreport.SnpReport) -> Check:
    if r.debug:
        return Check("policy_debug_off", False, f"POLICY 0x{r.policy:X} has DEBUG (bit 19) set: the host can read "
                                                "and change guest memory")
    return Check("policy_debug_off", True, f"POLICY 0x{r.policy:X}: DEBUG (bit 19) is 0")


def _check_vmpl(r: _snpreport.SnpReport) -> Check:
    if r.vmpl != 0:
        return Check("vmpl_zero", False, f"VMPL is {r.vmpl}, not 0")
    return Check("vmpl_zero", True, "VMPL is 0")


def _check_report_data(r: _snpreport.SnpReport, expected: bytes) -> Check:
    name = "report_data_binding"
    want = bytes(expected)
    if len(want) != 64:
        return Check(name, False, f"expected REPORT_DATA is {len(want)} bytes, not 64")
    if hmac.compare_digest(bytes(r.report_data), want):
        return Check(name, True, "REPORT_DATA equals the expected 64 bytes")
    return Check(name, False, f"REPORT_DATA {bytes(r.report_data).hex()} != expected {want.hex()}")


# --- assembly ----------------------------------------------------------------------------------------

def _pick_vek(kind: str, table: dict[str, bytes], vek: bytes | None) -> tuple[x509.Certificate | None, str | None]:
    slot = "vlek" if kind == "VLEK" else "vcek"
    if slot in table:
        return _load_cert(table[slot], f"certificate table {slot} entry"), "cert_table"
    if vek is not None:
        return _load_cert(vek, "VEK certificate (vek argument)"), "argument"
    return None, None


def _no_vek_reason(kind: str, table: dict[str, bytes]) -> str:
    """Why there is no VEK, in the words of :data:`NO_VEK` (adjusted for a VLEK or a non-empty table)."""
    reason = NO_VEK.replace("VCEK", kind, 1)
    if table:
        reason = reason.replace("the host's certificate table was empty (upstream KVM supplies none)",
                                f"the host's certificate table has no {kind} entry (it holds: "
                                f"{', '.join(sorted(table))})")
    return reason


def _trusted_ark(product: str, trusted: Sequence[x509.Certificate] | None) -> x509.Certificate | None:
    if trusted is None:
        return load_amd_cert(product, "ark")
    return next((t for t in trusted if _cn(t) == f"ARK-{product}"), None)


def _determine_product(r: _snpreport.SnpReport, vek: x509.Certificate | None,
                       supplied_arks: list[x509.Certificate], trusted: Sequence[x509.Certificate] | None,
                       inter_kind: str) -> tuple[str | None, str]:
    if r.product is not None:
        return r.product, "report CPUID"
    if vek is not None:
        try:
            name = _ext_ia5(vek, OID_PRODUCT_NAME)
        except (ValueError, UnicodeDecodeError):
            name = None
        if name and (p := _product_from_name(name)):
            return p, f"VEK productName '{name}'"
    for ark in supplied_arks:
        p = ARK_SHA256.get(_fingerprint(ark)) if trusted is None else None
        if p is None and ark.subject == ark.issuer and _cn(ark).startswith("ARK-"):
            p = _product_from_name(_cn(ark)[4:])
        if p:
            return p, f"supplied ARK '{_cn(ark)}'"
    if vek is not None and trusted is None:
        # the ARK that verifies: the product whose packaged intermediate signed this VEK
        for p in PRODUCTS:
            try:
                _verify_pss(vek, load_amd_cert(p, inter_kind))
            except _CHECK_ERRORS:
                continue
            return p, f"the {p} chain verifies the VEK"
    return None, "undetermined"


def verify_snp_report(report: _snpreport.SnpReport | bytes, *, vek: bytes | None = None,
                      cert_table: bytes | None = None, chain_pem: bytes | None = None,
                      trusted_arks: Sequence[x509.Certificate] | None = None,
                      expected_report_data: bytes | None = None, now: dt.datetime | None = None) -> SnpVerifyResult:
    """Run the named checks on an SEV-SNP report; nothing is fetched from the network.

    ``vek``: the VCEK/VLEK (DER or PEM), used when the certificate table has none. ``cert_table``: the
    configfs ``auxblob`` (GHCB certificate table); its VCEK/VLEK, ASK and ARK entries are used.
    ``chain_pem``: the ASK/ASVK and ARK (PEM, any order; it wins over the table); without it the
    packaged AMD certificates of the product line are used. ``trusted_arks``: the roots to accept
    (None: AMD's pinned ARKs; a simulated hierarchy passes its own). ``expected_report_data``: the 64
    bytes REPORT_DATA must equal. ``now`` (aware datetime): the validity time (default: now).

    Raises ``SnpReportError`` for report bytes that do not parse, :class:`SnpCertTableError` for a
    malformed table and :class:`SnpCertificateError` for a certificate that does not load; every
    verification failure is a failed check in the result. Without a VEK the signature and VEK checks
    fail ("not possible"), so the result is never ``ok``.
    """
    # the bare C type (``_snpreport.SnpReport``) carries every attribute used here
    r = report if isinstance(report, _snpreport.SnpReport) else parse_snp_report(report)
    when = now or dt.datetime.now(dt.UTC)
    if when.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    table = parse_cert_table(cert_table) if cert_table else {}
    kind = {0: "VCEK", 1: "VLEK"}.get(r.signing_key, f"unknown ({r.signing_key})")
    names_kind = kind if kind in _NAMES_BY_KIND else "VCEK"
    inter_kind, inter_cn_fmt, vek_cn = _NAMES_BY_KIND[names_kind]

    vek_cert, vek_source = _pick_vek(names_kind, table, vek)
    no_vek = _no_vek_reason(names_kind, table)

    # the CA certificates offered with the evidence: chain_pem wins over the certificate table
    sources: list[str] = []
    offered: list[x509.Certificate] = []
    if chain_pem is not None:
        offered = _load_pem_certs(chain_pem, "chain_pem")
        sources.append("chain_pem")
    else:
        for slot in ("ask", "ark"):
            if slot in table:
                offered.append(_load_cert(table[slot], f"certificate table {slot} entry"))
                if "cert_table" not in sources:
                    sources.append("cert_table")
    offered_arks = [c for c in offered if c.subject == c.issuer]
    offered_mids = [c for c in offered if c.subject != c.issuer]

    product, product_source = _determine_product(r, vek_cert, offered_arks, trusted_arks, inter_kind)
    ark: x509.Certificate | None = None
    mid: x509.Certificate | None = None
    want_mid_cn = inter_cn_fmt.format(p=product) if product else None
    if offered_arks:
        ark = next((a for a in offered_arks if product and _cn(a) == f"ARK-{product}"), offered_arks[0])
    elif product is not None:
        ark = _trusted_ark(product, trusted_arks)
        sources.append("packaged" if trusted_arks is None else "trusted_arks")
    if offered_mids:
        mid = next((m for m in offered_mids if _cn(m) == want_mid_cn), offered_mids[0])
    elif product is not None:
        mid = load_amd_cert(product, inter_kind)
        if "packaged" not in sources:
            sources.append("packaged")
    inter_name = inter_kind.upper()

    checks = [
        _check_report_signature(r, vek_cert, no_vek),
        _check_ark_pinned(ark, product, trusted_arks),
        _check_ark_self(ark),
        _check_link("intermediate_signed_by_ark", mid, ark, want_mid_cn, inter_name, "ARK", True,
                    f"no {inter_name} for the {product or 'undetermined'} product line"),
        _check_link("vek_signed_by_intermediate", vek_cert, mid, vek_cn, names_kind, inter_name, False,
                    f"not possible: {no_vek}"),
        _check_validity([(names_kind, vek_cert), (inter_name, mid), ("ARK", ark)], when),
        _check_tcb(r, vek_cert, product, no_vek),
        _check_csp_id(vek_cert, no_vek) if names_kind == "VLEK" else _check_hwid(r, vek_cert, product, no_vek),
        _check_signing_key(r, vek_cert, no_vek),
        _check_debug(r),
        _check_vmpl(r),
    ]
    if expected_report_data is not None:
        checks.append(_check_report_data(r, expected_report_data))

    not_checked = [
        "MEASUREMENT is not compared with a published launch digest; HOST_DATA, ID_KEY_DIGEST, AUTHOR_KEY_DIGEST, "
        "FAMILY_ID, IMAGE_ID and GUEST_SVN are not compared with expected values",
        "revocation: the ASK/ASVK is not checked against AMD's ARK-signed CRL (no network fetch)",
        "minimum TCB / firmware policy: REPORTED, CURRENT, COMMITTED and LAUNCH TCB, the firmware version and the "
        "mitigation vectors are not compared with any minimum, nor the VEK TCB with CURRENT_TCB",
        "POLICY is checked for DEBUG only: SMT, MIGRATE_MA, SINGLE_SOCKET, the ABI minimum and the other bits are "
        "not pinned; PLATFORM_INFO is not evaluated",
    ]
    if expected_report_data is None:
        not_checked.append("report_data_binding: no expected REPORT_DATA was given, so freshness (nonce) and key "
                           "binding are not verified")
    if vek_cert is None:
        not_checked.append(no_vek)
    return SnpVerifyResult(checks=checks, not_checked=not_checked, product=product, product_source=product_source,
                           signing_key=kind, vek_source=vek_source, chain_source="+".join(sources) or "none")
