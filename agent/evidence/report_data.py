"""The one place that builds TDX REPORTDATA: ``nonce (32 bytes) ‖ SHA-256(SPKI DER of a certificate)``.

The Chutes validator checks exactly this layout (chutes-protocol.md §2.4): bytes 0–31 are the raw nonce,
bytes 32–63 the SHA-256 of the certificate's SubjectPublicKeyInfo in DER (not the whole certificate,
not the raw key). A nonce is accepted only as 64 hex characters or 32 raw bytes; anything else is
rejected, never truncated or padded, because a silently reshaped nonce would produce a quote the
validator refuses for reasons nobody can see.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import BadInputError

NONCE_LEN = 32
REPORT_DATA_LEN = 64
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class ReportDataError(BadInputError, ValueError):
    """A nonce or certificate cannot be turned into REPORTDATA; the message names the field."""


def parse_nonce(value: str | bytes) -> bytes:
    """The 32 nonce bytes from 64 hex characters (str) or 32 raw bytes (bytes)."""
    if isinstance(value, str):
        if len(value) != 2 * NONCE_LEN:
            raise ReportDataError(f"nonce: expected 64 hex characters, got {len(value)} characters")
        if not _HEX64.fullmatch(value):
            raise ReportDataError("nonce: expected 64 hex characters, got non-hex characters")
        return bytes.fromhex(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) != NONCE_LEN:
            raise ReportDataError(f"nonce: expected 32 bytes, got {len(raw)} bytes")
        return raw
    raise ReportDataError(f"nonce: expected a hex string or bytes, got {type(value).__name__}")


def _load_cert(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, str):
        cert = cert.encode()
    if not isinstance(cert, bytes | bytearray):
        raise ReportDataError(f"certificate: expected an x509.Certificate or PEM/DER bytes, got {type(cert).__name__}")
    data = bytes(cert)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ReportDataError(f"certificate: not a valid PEM or DER X.509 certificate ({exc})") from None


def spki_sha256(cert: x509.Certificate | bytes | str) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo DER (what the validator's get_public_key_hash does)."""
    spki = _load_cert(cert).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def build_report_data(nonce: str | bytes, cert: x509.Certificate | bytes | str) -> bytes:
    """64 bytes of REPORTDATA: the parsed nonce followed by the certificate's SPKI hash."""
    out = parse_nonce(nonce) + spki_sha256(cert)
    assert len(out) == REPORT_DATA_LEN
    return out
