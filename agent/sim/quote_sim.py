"""Simulated TDX quote source: structurally real v4 quotes under a simulated PCK chain. NEVER TRUSTED.

Why it exists: this machine (CI, laptops, the demo) has no TDX module, yet the parser, the signature
self-check and every consumer of quotes should run on real bytes with real ECDSA P-256 signatures. The
quotes follow tdx-quote.md §1 byte for byte (v4 header, 584-byte TD body, signature data with a type-6
QE report certification block and a type-5 PEM chain), but the chain ends in a *simulated* root CA kept in
``state_dir``, so they verify only against that root (``SimulatedQuoteSource.root_ca_pem``) and fail
against Intel's pinned root. Selected only by explicit configuration; every use logs a warning.

Default measurements (fixed so tests and the demo can pin them):
  MRTD  = SHA-384(b"chutes-attest simulated MRTD")
  RTMR0 = SHA-384(b"chutes-attest simulated RTMR0"), RTMR1 / RTMR2 likewise, RTMR3 = 48 zero bytes
  TD_ATTRIBUTES = 0x10000000 (SEPT_VE_DISABLE), DEBUG bit only when ``debug=True``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from agent.fsutil import write_atomic
from agent.log import get_logger

log = get_logger(__name__)

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
QUOTE_VERSION = 4
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
CERT_TYPE_QE_REPORT = 6
CERT_TYPE_PCK_CHAIN = 5
SIGNED_REGION_LEN = 632  # v4: header 48 + TD body 584


def _h384(label: str) -> bytes:
    return hashlib.sha384(label.encode()).digest()


DEFAULT_MR_TD = _h384("chutes-attest simulated MRTD")
DEFAULT_RTMRS: tuple[bytes, bytes, bytes, bytes] = (
    _h384("chutes-attest simulated RTMR0"),
    _h384("chutes-attest simulated RTMR1"),
    _h384("chutes-attest simulated RTMR2"),
    bytes(48),
)
DEFAULT_MR_SEAM = _h384("chutes-attest simulated MRSEAM")
DEFAULT_TEE_TCB_SVN = bytes.fromhex("06010300000000000000000000000000")
DEFAULT_XFAM = bytes.fromhex("e702060000000000")
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_DEBUG = 1 << 0
QE_AUTH_DATA = bytes(range(32))  # what real quotes carry (tdx-quote.md §1.5)
QE_ID = hashlib.sha256(b"chutes-attest simulated QE").digest()[:16]

_ROOT_CN = "SIMULATED SGX Root CA (untrusted)"
_PLATFORM_CN = "SIMULATED SGX PCK Platform CA (untrusted)"
_LEAF_CN = "SIMULATED SGX PCK Certificate (untrusted)"
_FILES = ("root", "platform", "pck")


@dataclass(frozen=True)
class SimPki:
    """Simulated root CA → PCK platform CA → PCK leaf (all P-256)."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    platform_key: ec.EllipticCurvePrivateKey
    platform_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate

    @property
    def root_ca_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """PEM chain in quote order: leaf, platform CA, root (no trailing NUL)."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.pck_cert, self.platform_cert, self.root_cert)
        )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chutes-attest simulation (not Intel)"),
        ]
    )


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool,
    path_len: int | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=not ca, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_key is not key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _create_pki() -> SimPki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    platform_key = ec.generate_private_key(ec.SECP256R1())
    pck_key = ec.generate_private_key(ec.SECP256R1())
    root = _issue(_ROOT_CN, root_key, _ROOT_CN, root_key, ca=True, path_len=1)
    platform = _issue(_PLATFORM_CN, platform_key, _ROOT_CN, root_key, ca=True, path_len=0)
    pck = _issue(_LEAF_CN, pck_key, _PLATFORM_CN, platform_key, ca=False, path_len=None)
    return SimPki(root_key, root, platform_key, platform, pck_key, pck)


def load_or_create_sim_pki(state_dir: str | os.PathLike[str]) -> SimPki:
    """Load the simulated PCK chain from ``state_dir``, creating it (keys 0600, dir 0700) on first use."""
    d = Path(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = {n: (d / f"sim-{n}.key", d / f"sim-{n}.pem") for n in _FILES}
    if not all(k.exists() and c.exists() for k, c in paths.values()):
        pki = _create_pki()
        items = {
            "root": (pki.root_key, pki.root_cert),
            "platform": (pki.platform_key, pki.platform_cert),
            "pck": (pki.pck_key, pki.pck_cert),
        }
        for n, (key, cert) in items.items():
            kpath, cpath = paths[n]
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            write_atomic(kpath, key_pem, 0o600)
            write_atomic(cpath, cert.public_bytes(serialization.Encoding.PEM), 0o600)
        log.warning("sim.pki_created", state_dir=str(d), reason="simulated PCK chain, never trusted")
    loaded: list[tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] = []
    for n in _FILES:
        kpath, cpath = paths[n]
        ec_key = serialization.load_pem_private_key(kpath.read_bytes(), password=None)
        if not isinstance(ec_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{kpath}: not an EC private key")
        loaded.append((ec_key, x509.load_pem_x509_certificate(cpath.read_bytes())))
    (root_key, root), (platform_key, platform), (pck_key, pck) = loaded
    return SimPki(root_key, root, platform_key, platform, pck_key, pck)


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as raw r‖s (32 + 32 big-endian), the encoding quotes use."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pubkey(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Uncompressed point without the 0x04 prefix (x‖y), as in the quote's attestation key field."""
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return point[1:]


def build_qe_report(att_pub: bytes, auth_data: bytes = QE_AUTH_DATA) -> bytes:
    """A 384-byte SGX report body of a (simulated) TD quoting enclave, binding the attestation key."""
    binding = hashlib.sha256(att_pub + auth_data).digest() + bytes(32)
    report = bytearray(384)
    report[0:16] = bytes.fromhex("0b0b0205ff8003000000000000000000")  # cpu_svn
    report[48:64] = bytes.fromhex("11000000000000000700000000000000")  # attributes (INIT|MODE64BIT, XFRM)
    report[64:96] = hashlib.sha256(b"chutes-attest simulated QE mr_enclave").digest()
    report[128:160] = hashlib.sha256(b"chutes-attest simulated QE mr_signer").digest()
    struct.pack_into("<HH", report, 256, 2, 4)  # isv_prod_id 2 (TD QE), isv_svn 4
    report[320:384] = binding
    return bytes(report)


def build_td_body(
    report_data: bytes, *, mr_td: bytes, rtmrs: tuple[bytes, bytes, bytes, bytes], td_attributes: int
) -> bytes:
    """The 584-byte TDX 1.0 report body (tdx-quote.md §1.3)."""
    body = bytearray(584)
    body[0:16] = DEFAULT_TEE_TCB_SVN
    body[16:64] = DEFAULT_MR_SEAM
    struct.pack_into("<Q", body, 120, td_attributes)
    body[128:136] = DEFAULT_XFAM
    body[136:184] = mr_td
    for i, rtmr in enumerate(rtmrs):
        body[328 + 48 * i : 376 + 48 * i] = rtmr
    body[520:584] = report_data
    return bytes(body)


def build_quote(
    report_data: bytes,
    *,
    att_key: ec.EllipticCurvePrivateKey,
    qe_report: bytes,
    qe_report_sig: bytes,
    chain_pem: bytes,
    mr_td: bytes = DEFAULT_MR_TD,
    rtmrs: tuple[bytes, bytes, bytes, bytes] = DEFAULT_RTMRS,
    td_attributes: int = TD_ATTR_SEPT_VE_DISABLE,
) -> bytes:
    """Assemble and sign one v4 quote (header, TD body, signature data with QE report + PEM chain)."""
    header = struct.pack(
        "<HHIHH16s20s", QUOTE_VERSION, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, 0, 0, INTEL_QE_VENDOR_ID, QE_ID + bytes(4)
    )
    signed = header + build_td_body(report_data, mr_td=mr_td, rtmrs=rtmrs, td_attributes=td_attributes)
    assert len(signed) == SIGNED_REGION_LEN
    pem = chain_pem + b"\x00"
    qe_cert_data = (
        qe_report + qe_report_sig + struct.pack("<H", len(QE_AUTH_DATA)) + QE_AUTH_DATA
        + struct.pack("<HI", CERT_TYPE_PCK_CHAIN, len(pem)) + pem
    )
    sig_data = (
        _raw_sig(att_key, signed) + _raw_pubkey(att_key)
        + struct.pack("<HI", CERT_TYPE_QE_REPORT, len(qe_cert_data)) + qe_cert_data
    )
    return signed + struct.pack("<I", len(sig_data)) + sig_data


def _check_m48(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes) or len(value) != 48:
        raise ValueError(f"{name}: expected 48 bytes, got {len(value) if isinstance(value, bytes) else value!r}")
    return value


class SimulatedQuoteSource:
    """QuoteSource producing simulated v4 quotes; a fresh attestation key per source instance."""

    name = "simulated"
    tee = "tdx"

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        mr_td: bytes = DEFAULT_MR_TD,
        rtmrs: tuple[bytes, bytes, bytes, bytes] = DEFAULT_RTMRS,
        debug: bool = False,
    ) -> None:
        self.pki = load_or_create_sim_pki(state_dir)
        self.mr_td = _check_m48("mr_td", mr_td)
        if len(rtmrs) != 4:
            raise ValueError(f"rtmrs: expected 4 values, got {len(rtmrs)}")
        self.rtmrs = tuple(_check_m48(f"rtmr{i}", r) for i, r in enumerate(rtmrs))
        self.td_attributes = TD_ATTR_SEPT_VE_DISABLE | (TD_ATTR_DEBUG if debug else 0)
        self._att_key = ec.generate_private_key(ec.SECP256R1())
        self._qe_report = build_qe_report(_raw_pubkey(self._att_key))
        self._qe_report_sig = _raw_sig(self.pki.pck_key, self._qe_report)
        self._chain_pem = self.pki.chain_pem
        log.warning("quote.simulated_source", state_dir=str(state_dir), debug=debug,
                    reason="simulated TDX quotes: not hardware evidence, never trusted")

    @property
    def root_ca_pem(self) -> bytes:
        """The simulated root CA: the only root these quotes verify against."""
        return self.pki.root_ca_pem

    def get_quote(self, report_data: bytes) -> bytes:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != 64:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
            raise ValueError(f"report_data: expected 64 bytes, got {got}")
        log.warning("quote.simulated", reason="simulated TDX quote issued (not hardware evidence)")
        return build_quote(
            bytes(report_data),
            att_key=self._att_key,
            qe_report=self._qe_report,
            qe_report_sig=self._qe_report_sig,
            chain_pem=self._chain_pem,
            mr_td=self.mr_td,
            rtmrs=self.rtmrs,  # type: ignore[arg-type]
            td_attributes=self.td_attributes,
        )
