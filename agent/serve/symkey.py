"""The dummy-port symmetric-key answer (chutes-protocol.md §5.4), produced and checked like the SDK/validator.

Wire form: ``"<iv as 32 lower-case hex>|<base64 ciphertext>"``; AES-128-CBC with the 16-byte key from the
validator's 32-hex ``symmetric_key``, a fresh 16-byte IV, PKCS7 (128-bit block), plaintext
``"response from <proto> <port>"``. The check splits on the first ``|`` and compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16
IV_BYTES = 16
PROTOCOLS = ("tcp", "udp", "http")


def expected_plaintext(proto: str, port: int) -> str:
    return f"response from {proto.lower()} {port}"


def encrypt_response(key: bytes, plaintext: str, iv: bytes | None = None) -> str:
    """The SDK's ``encrypt_response`` rendered as the wire reply."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"symmetric key must be {KEY_BYTES} bytes")
    iv = os.urandom(IV_BYTES) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode()) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(padded) + enc.finalize()
    return f"{iv.hex()}|{base64.b64encode(ct).decode()}"


def decrypt_response(key: bytes, wire: str) -> bytes:
    """Plaintext of a wire reply; ValueError with a stable reason code on any format/padding problem."""
    iv_hex, sep, b64 = wire.partition("|")
    if not sep:
        raise ValueError("missing_separator")
    try:
        iv = bytes.fromhex(iv_hex)
    except ValueError:
        raise ValueError("bad_iv") from None
    if len(iv) != IV_BYTES:
        raise ValueError("bad_iv")
    try:
        ct = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad_base64") from None
    if not ct or len(ct) % 16:
        raise ValueError("bad_ciphertext_length")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(ct) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise ValueError("bad_padding") from None


def verify_response(key: bytes, wire: str, proto: str, port: int) -> tuple[bool, str]:
    """(valid, reason) for a dummy-port answer; reason is "ok", "mismatch" or a format code."""
    try:
        plain = decrypt_response(key, wire)
    except ValueError as exc:
        return False, str(exc)
    if hmac.compare_digest(plain, expected_plaintext(proto, port).encode()):
        return True, "ok"
    return False, "mismatch"
