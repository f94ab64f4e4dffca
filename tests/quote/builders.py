"""Helpers that take real sample quotes apart and put them back together (for tests only).

``rebuild`` re-assembles a quote from its parts with consistent length fields, so tests can
make v5 body-type 2/4 variants or re-sign a quote under a throwaway PCK hierarchy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.conftest import QUOTES_DIR

SAMPLES = sorted(p.name for p in QUOTES_DIR.glob("*.bin"))
V4_SAMPLE = "dcapqvl_tdx_quote_v4.bin"
V5_SAMPLE = "gotdxguest_quote_v5_sample.bin"


def sample(name: str) -> bytes:
    return (QUOTES_DIR / name).read_bytes()


@dataclass(frozen=True)
class Parts:
    header: bytes          # 48 bytes
    body_type: int
    body: bytes            # 584 / 648 / 885 bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    chain_type: int
    chain: bytes           # raw nested certification data (NUL included if present)
    version: int


def split(raw: bytes) -> Parts:
    """Take a well-formed quote apart by the documented offsets (tdx-quote.md §1)."""
    version = struct.unpack_from("<H", raw, 0)[0]
    if version == 4:
        btype, body_off, bsize = 2, 48, 584
    else:
        btype, bsize = struct.unpack_from("<HI", raw, 48)
        body_off = 54
    sd = body_off + bsize + 4
    cd = sd + 134
    p = cd + 384 + 64
    (adl,) = struct.unpack_from("<H", raw, p)
    auth = raw[p + 2:p + 2 + adl]
    p += 2 + adl
    ctype, csize = struct.unpack_from("<HI", raw, p)
    return Parts(header=raw[:48], body_type=btype, body=raw[body_off:body_off + bsize],
                 signature=raw[sd:sd + 64], attestation_key=raw[sd + 64:sd + 128],
                 qe_report=raw[cd:cd + 384], qe_report_signature=raw[cd + 384:cd + 448],
                 qe_auth_data=auth, chain_type=ctype, chain=raw[p + 6:p + 6 + csize], version=version)


def signed_part(p: Parts) -> bytes:
    header = struct.pack("<H", p.version) + p.header[2:]
    if p.version == 4:
        return header + p.body
    return header + struct.pack("<HI", p.body_type, len(p.body)) + p.body


def rebuild(p: Parts, trailing: bytes = b"") -> bytes:
    """Serialise parts with every length field computed from the content."""
    cert6 = (p.qe_report + p.qe_report_signature + struct.pack("<H", len(p.qe_auth_data)) + p.qe_auth_data
             + struct.pack("<HI", p.chain_type, len(p.chain)) + p.chain)
    sig_data = p.signature + p.attestation_key + struct.pack("<HI", 6, len(cert6)) + cert6
    return signed_part(p) + struct.pack("<I", len(sig_data)) + sig_data + trailing


def as_v5(raw: bytes, body_type: int) -> bytes:
    """A v5 quote with the given body type built from a real sample (signatures no longer verify)."""
    p = split(raw)
    td10 = p.body[:584]
    if body_type == 2:
        body = td10
    elif body_type == 3:
        body = p.body[:648] if len(p.body) >= 648 else td10 + bytes(range(64))
    else:
        body = (p.body[:648] if len(p.body) >= 648 else td10 + bytes(range(64))) + bytes(
            (i * 7 + 3) & 0xFF for i in range(237))
    return rebuild(replace(p, version=5, body_type=body_type, body=body))


# -- a throwaway PCK hierarchy (same shape as Intel's: root -> platform CA -> PCK leaf) -----------------

def _raw_sig(key: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          ca: bool, not_after: dt.datetime | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


@dataclass
class SimPki:
    root_pem: bytes
    chain_pem: bytes
    leaf_key: ec.EllipticCurvePrivateKey


def make_pki(leaf_not_after: dt.datetime | None = None, root_name: str = "Sim Root CA") -> SimPki:
    root_k, ca_k, leaf_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert(root_name, root_k, root_name, root_k, True)
    ca = _cert("Sim PCK Platform CA", ca_k, root_name, root_k, True)
    leaf = _cert("Sim PCK Certificate", leaf_k, "Sim PCK Platform CA", ca_k, False, leaf_not_after)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, ca, root))
    return SimPki(root.public_bytes(serialization.Encoding.PEM), pem, leaf_k)


def resign(raw: bytes, pki: SimPki) -> bytes:
    """Re-sign a real quote's header+body under ``pki`` with a fresh attestation key: every self-check
    then passes against ``pki.root_pem``."""
    p = split(raw)
    att = ec.generate_private_key(ec.SECP256R1())
    nums = att.public_key().public_numbers()
    att_raw = nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")
    qe_rd = hashlib.sha256(att_raw + p.qe_auth_data).digest() + bytes(32)
    qe_report = p.qe_report[:320] + qe_rd
    p = replace(p, attestation_key=att_raw, qe_report=qe_report,
                qe_report_signature=_raw_sig(pki.leaf_key, qe_report), chain=pki.chain_pem + b"\x00")
    return rebuild(replace(p, signature=_raw_sig(att, signed_part(p))))
