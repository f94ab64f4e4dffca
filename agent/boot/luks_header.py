"""Strict LUKS2 header policy, checked BEFORE the key from the validator is used.

The host supplies the disk, so it can supply a header too: one whose segment or keyslot uses
``cipher_null`` (dstack GHSA-jxq2-hpw3-m5wf, prior-art.md) would "unlock" with any key and hand the
guest a plaintext disk the host can read and write. This module refuses every header that is not
plainly the one we expect: LUKS2, exactly one ``crypt`` segment with an approved cipher, keyslots
with approved ciphers, sane key sizes and KDFs, digests tying keyslots to the segment, no tokens, no
pending requirements. Pure logic over ``cryptsetup luksDump --dump-json-metadata`` output and the
binary header bytes; the caller validates a private copy and opens with that copy (no TOCTOU).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from agent.errors import VerificationError

LUKS2_MAGIC_1 = b"LUKS\xba\xbe"
LUKS2_MAGIC_2 = b"SKUL\xba\xbe"
#: Approved data ciphers (cipher-chainmode-ivmode as cryptsetup writes it).
APPROVED_CIPHERS = frozenset({"aes-xts-plain64", "aes-xts-plain", "serpent-xts-plain64", "twofish-xts-plain64"})
#: Volume key sizes in bytes: XTS with 128- or 256-bit AES keys (two halves).
APPROVED_KEY_SIZES = frozenset({32, 64})
APPROVED_KDFS = frozenset({"argon2id", "argon2i", "pbkdf2"})
APPROVED_HASHES = frozenset({"sha256", "sha384", "sha512"})
APPROVED_SECTOR_SIZES = frozenset({512, 4096})
#: Activation flags that change performance only.
BENIGN_FLAGS = frozenset({"allow-discards", "same-cpu-crypt", "submit-from-crypt-cpus", "no-journal",
                          "no-read-workqueue", "no-write-workqueue"})
MIN_PBKDF2_ITERATIONS = 1000


class LuksHeaderError(VerificationError):
    """The header is refused; the message names the offending field."""


@dataclass
class HeaderSummary:
    """What was validated (non-secret; goes into boot-status.json)."""

    version: int
    uuid: str
    label: str
    cipher: str
    sector_size: int
    keyslots: list[str] = field(default_factory=list)
    key_size: int = 0
    json_sha256: str = ""
    #: The first-boot token 15 is present (1.4.0 images before their first boot).
    first_boot_token: bool = False


def check_binary_header(head: bytes) -> tuple[int, str, str]:
    """Magic, version 2, and the primary header's own SHA-256 checksum; returns (hdr_size, uuid, label)."""
    if len(head) < 4096:
        raise LuksHeaderError(f"header: only {len(head)} bytes readable, a LUKS2 header needs at least 4096")
    if head[:6] != LUKS2_MAGIC_1:
        raise LuksHeaderError("header: no LUKS magic at offset 0 (not a LUKS device)")
    (version,) = struct.unpack_from(">H", head, 6)
    if version != 2:
        raise LuksHeaderError(f"header: LUKS version {version}, only LUKS2 is accepted")
    (hdr_size,) = struct.unpack_from(">Q", head, 8)
    if hdr_size not in (16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304):
        raise LuksHeaderError(f"header: hdr_size {hdr_size} is not a LUKS2 header size")
    alg = head[72:104].rstrip(b"\0").decode("ascii", "replace")
    if alg != "sha256":
        raise LuksHeaderError(f"header: checksum_alg {alg!r}, expected sha256")
    if len(head) >= hdr_size:
        blob = bytearray(head[:hdr_size])
        stored = bytes(blob[448:448 + 32])
        blob[448:448 + 64] = bytes(64)
        if hashlib.sha256(blob).digest() != stored:
            raise LuksHeaderError("header: primary header checksum mismatch")
    label = head[24:72].split(b"\0", 1)[0].decode("ascii", "replace")
    uuid = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace")
    return hdr_size, uuid, label


def _one_of(value: object, allowed: frozenset[str]) -> TypeGuard[str]:
    """Membership that cannot crash on unhashable JSON values (lists, objects)."""
    return isinstance(value, str) and value in allowed


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LuksHeaderError(f"{where}: expected an integer, got {type(value).__name__}")
    try:
        return int(value)
    except ValueError:
        raise LuksHeaderError(f"{where}: expected an integer, got {value!r}") from None


def _check_kdf(kdf: Any, where: str) -> None:
    if not isinstance(kdf, dict):
        raise LuksHeaderError(f"{where}.kdf: missing")
    kind = kdf.get("type")
    if not _one_of(kind, APPROVED_KDFS):
        raise LuksHeaderError(f"{where}.kdf.type: {kind!r} not approved")
    if kind == "pbkdf2":
        if not _one_of(kdf.get("hash"), APPROVED_HASHES):
            raise LuksHeaderError(f"{where}.kdf.hash: {kdf.get('hash')!r} not approved")
        if _int(kdf.get("iterations"), f"{where}.kdf.iterations") < MIN_PBKDF2_ITERATIONS:
            raise LuksHeaderError(f"{where}.kdf.iterations: below {MIN_PBKDF2_ITERATIONS}")


#: The LUKS2 default header area (metadata + keyslots) that cryptsetup reserves, and the images are made with.
DEFAULT_DATA_OFFSET = 16 * 1024 * 1024
#: Token 15 as a 1.4.0 image build writes it: marks the first boot; removed after the first open.
FIRST_BOOT_TOKEN_ID = "15"  # noqa: S105 (a LUKS token id, not a password)
FIRST_BOOT_TOKEN_TYPE = "chutes-first-boot"  # noqa: S105


def _check_segments(meta: dict[str, Any], data_offset: int) -> tuple[str, int]:
    """Exactly one ``crypt`` segment, approved cipher, and the data window pinned: offset, size, iv_tweak.

    The host writes the header, so without the pin it could shift the window (offset, iv_tweak) and
    choose which bytes of the volume the VM sees as its disk.
    """
    segments = meta.get("segments")
    if not isinstance(segments, dict) or len(segments) != 1 or "0" not in segments:
        n = len(segments) if isinstance(segments, dict) else 0
        raise LuksHeaderError(f"segments: expected exactly one segment '0', found {n}")
    seg = segments["0"]
    if not isinstance(seg, dict) or seg.get("type") != "crypt":
        got = seg.get("type") if isinstance(seg, dict) else seg
        raise LuksHeaderError(f"segments.0.type: {got!r}, expected 'crypt'")
    cipher = seg.get("encryption")
    if not _one_of(cipher, APPROVED_CIPHERS):
        raise LuksHeaderError(f"segments.0.encryption: {cipher!r} not approved")
    if seg.get("integrity"):
        raise LuksHeaderError("segments.0.integrity: authenticated segments are not expected")
    sector = _int(seg.get("sector_size"), "segments.0.sector_size")
    if sector not in APPROVED_SECTOR_SIZES:
        raise LuksHeaderError(f"segments.0.sector_size: {sector} not approved")
    offset = _int(seg.get("offset"), "segments.0.offset")
    if offset < 4096 * 2:
        raise LuksHeaderError("segments.0.offset: data would overlap the header")
    if offset != data_offset:
        raise LuksHeaderError(f"segments.0.offset: {offset}, expected {data_offset} (boot.luks_data_offset: "
                              "the header area the image was made with)")
    if seg.get("size") != "dynamic":
        raise LuksHeaderError(f"segments.0.size: {seg.get('size')!r}, expected 'dynamic'")
    if seg.get("iv_tweak") != "0":
        raise LuksHeaderError(f"segments.0.iv_tweak: {seg.get('iv_tweak')!r}, expected '0'")
    if seg.get("flags"):
        raise LuksHeaderError(f"segments.0.flags: unexpected {seg.get('flags')!r}")
    return cipher, sector


def _check_keyslot(ks_id: str, ks: Any) -> int:
    """One keyslot: luks2, approved sizes, raw area with an approved cipher, AF splitter, KDF; its key size."""
    where = f"keyslots.{ks_id}"
    if not isinstance(ks, dict) or ks.get("type") != "luks2":
        raise LuksHeaderError(f"{where}.type: expected 'luks2'")
    ksz = _int(ks.get("key_size"), f"{where}.key_size")
    if ksz not in APPROVED_KEY_SIZES:
        raise LuksHeaderError(f"{where}.key_size: {ksz} bytes not approved")
    area = ks.get("area")
    if not isinstance(area, dict) or area.get("type") != "raw":
        raise LuksHeaderError(f"{where}.area.type: expected 'raw'")
    if not _one_of(area.get("encryption"), APPROVED_CIPHERS):
        raise LuksHeaderError(f"{where}.area.encryption: {area.get('encryption')!r} not approved")
    if _int(area.get("key_size"), f"{where}.area.key_size") not in APPROVED_KEY_SIZES:
        raise LuksHeaderError(f"{where}.area.key_size: not approved")
    af = ks.get("af")
    if not isinstance(af, dict) or af.get("type") != "luks1" or not _one_of(af.get("hash"), APPROVED_HASHES):
        raise LuksHeaderError(f"{where}.af: expected luks1 anti-forensic splitter with an approved hash")
    if _int(af.get("stripes"), f"{where}.af.stripes") != 4000:
        raise LuksHeaderError(f"{where}.af.stripes: expected 4000")
    _check_kdf(ks.get("kdf"), where)
    if ks.get("priority") is not None and _int(ks.get("priority"), f"{where}.priority") not in (1, 2):
        raise LuksHeaderError(f"{where}.priority: unexpected value")
    return ksz


def _check_keyslots(meta: dict[str, Any]) -> tuple[dict[str, Any], int]:
    keyslots = meta.get("keyslots")
    if not isinstance(keyslots, dict) or not keyslots:
        raise LuksHeaderError("keyslots: none")
    key_size = 0
    for ks_id, ks in keyslots.items():
        ksz = _check_keyslot(ks_id, ks)
        if key_size and ksz != key_size:
            raise LuksHeaderError(f"keyslots.{ks_id}.key_size: keyslots disagree on the volume key size")
        key_size = ksz
    return keyslots, key_size


def _check_digests(meta: dict[str, Any], keyslots: dict[str, Any]) -> None:
    """pbkdf2 digests over segment 0 that cover the keyslots one to one."""
    digests = meta.get("digests")
    if not isinstance(digests, dict) or not digests:
        raise LuksHeaderError("digests: none")
    covered: set[str] = set()
    for d_id, dg in digests.items():
        where = f"digests.{d_id}"
        if not isinstance(dg, dict) or dg.get("type") != "pbkdf2" or not _one_of(dg.get("hash"), APPROVED_HASHES):
            raise LuksHeaderError(f"{where}: expected a pbkdf2 digest with an approved hash")
        if dg.get("segments") != ["0"]:
            raise LuksHeaderError(f"{where}.segments: expected ['0']")
        refs = dg.get("keyslots")
        if not isinstance(refs, list) or not all(isinstance(k, str) for k in refs):
            raise LuksHeaderError(f"{where}.keyslots: expected a list of keyslot ids")
        covered.update(refs)
    if covered != set(keyslots):
        raise LuksHeaderError("digests: keyslots and digests do not match one to one")


def _check_tokens(meta: dict[str, Any], allow_first_boot_token: bool) -> bool:
    """No tokens, except (when allowed) the first-boot marker token 15 bound to no keyslot; True if present."""
    tokens = meta.get("tokens")
    if tokens is not None and not isinstance(tokens, dict):
        raise LuksHeaderError("tokens: not an object")
    tokens = dict(tokens or {})
    first = tokens.pop(FIRST_BOOT_TOKEN_ID, None) if allow_first_boot_token else None
    if first is not None and (not isinstance(first, dict) or first.get("type") != FIRST_BOOT_TOKEN_TYPE
                              or first.get("keyslots") != []):
        raise LuksHeaderError(f"tokens.{FIRST_BOOT_TOKEN_ID}: expected a {FIRST_BOOT_TOKEN_TYPE!r} token bound "
                              "to no keyslot")
    if tokens:
        raise LuksHeaderError(f"tokens: {len(tokens)} token(s) present, none expected")
    return first is not None


def _check_config(meta: dict[str, Any]) -> None:
    config = meta.get("config") or {}
    if not isinstance(config, dict):
        raise LuksHeaderError("config: not an object")
    flags = config.get("flags") or []
    if not isinstance(flags, list):
        raise LuksHeaderError("config.flags: not a list")
    for flag in flags:
        if not _one_of(flag, BENIGN_FLAGS):
            raise LuksHeaderError(f"config.flags: {flag!r} not allowed")
    if config.get("requirements"):
        raise LuksHeaderError(f"config.requirements: {config.get('requirements')!r} (e.g. reencryption) not allowed")


def validate_metadata(meta: dict[str, Any], head: bytes | None = None, *, data_offset: int = DEFAULT_DATA_OFFSET,
                      allow_first_boot_token: bool = False) -> HeaderSummary:
    """Apply the policy to the JSON metadata (and the binary header, when given), section by section."""
    uuid = label = ""
    if head is not None:
        _, uuid, label = check_binary_header(head)
    if not isinstance(meta, dict):
        raise LuksHeaderError("metadata: not a JSON object")
    cipher, sector = _check_segments(meta, data_offset)
    keyslots, key_size = _check_keyslots(meta)
    _check_digests(meta, keyslots)
    first_boot = _check_tokens(meta, allow_first_boot_token)
    _check_config(meta)
    canon = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return HeaderSummary(2, uuid, label, cipher, sector, sorted(keyslots), key_size,
                         hashlib.sha256(canon).hexdigest(), first_boot)
