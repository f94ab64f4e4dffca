"""Validation of the host-supplied names: VM name (hostname) and miner hotkey (SS58).

Both come from an unmeasured, host-controlled volume and end up in URLs, JSON and file names,
so they are reduced to what the protocol allows before anything else sees them.
"""

from __future__ import annotations

import hashlib
import re

from agent.errors import BadInputError

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")
MAX_VM_NAME = 63
MAX_HOTKEY = 64


class InvalidNameError(BadInputError, ValueError):
    """A host-supplied name is unusable; the message names the file/field."""


def sanitize_vm_name(raw: str) -> str:
    """The VM name = hostname with everything outside ``[A-Za-z0-9_-]`` dropped (as sek8s does)."""
    name = _NOT_NAME.sub("", raw.strip())
    if not name:
        raise InvalidNameError("hostname: empty after keeping only [A-Za-z0-9_-]")
    if len(name) > MAX_VM_NAME:
        raise InvalidNameError(f"hostname: {len(name)} characters, at most {MAX_VM_NAME} allowed")
    return name


def b58decode(text: str) -> bytes:
    num = 0
    for c in text:
        if c not in _B58_INDEX:
            raise InvalidNameError(f"miner-ss58: character {c!r} is not base58")
        num = num * 58 + _B58_INDEX[c]
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\x00" * pad + body


def b58encode(data: bytes) -> str:
    num = int.from_bytes(data, "big")
    out = ""
    while num:
        num, rem = divmod(num, 58)
        out = _B58[rem] + out
    pad = len(data) - len(data.lstrip(b"\x00"))
    return "1" * pad + out


def _ss58_checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(b"SS58PRE" + payload, digest_size=64).digest()[:2]


def ss58_encode(pubkey: bytes, prefix: int = 42) -> str:
    """SS58 address of a 32-byte public key (used by tests and the demo to make hotkeys)."""
    if len(pubkey) != 32 or not 0 <= prefix < 64:
        raise ValueError("ss58_encode: 32-byte key and a simple prefix (0..63) expected")
    payload = bytes([prefix]) + pubkey
    return b58encode(payload + _ss58_checksum(payload))


def validate_hotkey(raw: str) -> str:
    """The miner hotkey: first 64 characters, stripped, a well-formed SS58 address (checksum checked)."""
    text = raw.strip()[:MAX_HOTKEY].strip()
    if not text:
        raise InvalidNameError("miner-ss58: empty")
    data = b58decode(text)
    if len(data) not in (35, 36):
        raise InvalidNameError(f"miner-ss58: decodes to {len(data)} bytes, an SS58 account address has 35 or 36")
    prefix_len = 1 if data[0] < 64 else 2
    if len(data) != prefix_len + 32 + 2:
        raise InvalidNameError("miner-ss58: address prefix and length do not agree")
    if _ss58_checksum(data[:-2]) != data[-2:]:
        raise InvalidNameError("miner-ss58: checksum mismatch (typo in the hotkey?)")
    return text
