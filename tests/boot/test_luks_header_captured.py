"""The LUKS2 header policy over headers captured from real cryptsetup (tests/data/luks2-headers/): unit tier.

No root, no cryptsetup, no loop device. Each ``*.hdr.xz`` is the header area the policy reads (both binary
headers and JSON areas) of a header made by ``cryptsetup luksFormat`` (some then edited like a hostile host
would, with valid checksums; README.md there says how each was made). In production the agent validates the
binary header bytes plus ``cryptsetup luksDump --dump-json-metadata`` of the same header copy; here that metadata
is read from the captured bytes with cryptsetup's own rules for choosing a header copy (LUKS2_disk_hdr_read),
and checked against what cryptsetup printed for the same bytes when they were made (cases.json).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from functools import cache
from typing import Any

import pytest

from agent.boot.luks_header import (
    LUKS2_MAGIC_1,
    LUKS2_MAGIC_2,
    HeaderSummary,
    LuksHeaderError,
    check_binary_header,
    validate_metadata,
)
from tests.conftest import TESTDATA

HEADERS = TESTDATA / "luks2-headers"
CASES: dict[str, dict[str, Any]] = json.loads((HEADERS / "cases.json").read_text())["cases"]
#: Where cryptsetup looks for the secondary header when the primary is unusable (LUKS2_HDR2_OFFSETS).
HDR2_OFFSETS = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000)
#: Header copies of these captures are unreadable to cryptsetup; only the binary-header policy can answer.
UNREADABLE = {"short", "wipefs", "luks1"}
#: cryptsetup reads a header copy but its JSON validation refuses it: the agent never gets this far, the
#: policy refuses it on its own too (defence in depth).
CRYPTSETUP_REFUSES_JSON = {"kdf-missing", "keyslot-area-checksum", "keyslot-type-reencrypt", "digests-none",
                           "orphan-keyslot"}
OFFSET_MSG = ("segments.0.offset: {}, expected 16777216 (boot.luks_data_offset: the header area the image was made "
              "with)")
NULL_SEGMENT = "segments.0.encryption: 'cipher_null-ecb' not approved"
ACCEPT = "accepted"

#: (case, policy keywords of validate_metadata, the decision): every captured header, every refusal it triggers.
DECISIONS: list[tuple[str, dict[str, Any], str]] = [
    # accepted
    ("production", {}, ACCEPT),
    ("first-boot-token", {"allow_first_boot_token": True}, ACCEPT),
    ("test-image", {}, ACCEPT),
    ("sector-512", {}, ACCEPT),
    ("aes-128-xts", {}, ACCEPT),
    ("two-keyslots", {}, ACCEPT),
    ("priority-prefer", {}, ACCEPT),
    ("metadata-64k", {}, ACCEPT),
    ("offset-2MiB", {"data_offset": 2 * 1024 * 1024}, ACCEPT),
    ("benign-flags", {}, ACCEPT),
    ("secondary-corrupt", {}, ACCEPT),
    ("secondary-stale-null", {}, ACCEPT),
    # the binary header
    ("short", {}, "header: only 1024 bytes readable, a LUKS2 header needs at least 4096"),
    ("wipefs", {}, "header: no LUKS magic at offset 0 (not a LUKS device)"),
    ("luks1", {}, "header: LUKS version 1, only LUKS2 is accepted"),
    ("hdr-size", {}, "header: hdr_size 12288 is not a LUKS2 header size"),
    ("checksum-sha1", {}, "header: checksum_alg 'sha1', expected sha256"),
    ("primary-checksum", {}, "header: primary header checksum mismatch"),
    ("secondary-newer-null", {}, NULL_SEGMENT),
    # segments
    ("cipher-null", {}, NULL_SEGMENT),
    ("aes-cbc-essiv", {}, "segments.0.encryption: 'aes-cbc-essiv:sha256' not approved"),
    ("two-segments", {}, "segments: expected exactly one segment '0', found 2"),
    ("reencrypt", {}, "segments: expected exactly one segment '0', found 3"),
    ("linear-segment", {}, "segments.0.type: 'linear', expected 'crypt'"),
    ("integrity", {}, "segments.0.integrity: authenticated segments are not expected"),
    ("sector-1024", {}, "segments.0.sector_size: 1024 not approved"),
    ("detached-offset-0", {}, "segments.0.offset: data would overlap the header"),
    ("offset-20MiB", {}, OFFSET_MSG.format(20971520)),
    ("offset-2MiB", {}, OFFSET_MSG.format(2097152)),
    ("fixed-size", {}, "segments.0.size: '4194304', expected 'dynamic'"),
    ("iv-tweak", {}, "segments.0.iv_tweak: '8192', expected '0'"),
    ("segment-flags", {}, "segments.0.flags: unexpected ['bogus-flag']"),
    # keyslots
    ("keyslot-type-reencrypt", {}, "keyslots.0.type: expected 'luks2'"),
    ("keyslot-key-48", {}, "keyslots.0.key_size: 48 bytes not approved"),
    ("keyslot-area-checksum", {}, "keyslots.0.area.type: expected 'raw'"),
    ("keyslot-cipher-null", {}, "keyslots.0.area.encryption: 'cipher_null-ecb' not approved"),
    ("keyslot-cipher-cbc", {}, "keyslots.0.area.encryption: 'aes-cbc-essiv:sha256' not approved"),
    ("keyslot-area-key-48", {}, "keyslots.0.area.key_size: not approved"),
    ("hash-sha1", {}, "keyslots.0.af: expected luks1 anti-forensic splitter with an approved hash"),
    ("af-stripes", {}, "keyslots.0.af.stripes: expected 4000"),
    ("kdf-missing", {}, "keyslots.0.kdf: missing"),
    ("kdf-type-none", {}, "keyslots.0.kdf.type: 'none' not approved"),
    ("kdf-hash-sha1", {}, "keyslots.0.kdf.hash: 'sha1' not approved"),
    ("kdf-iterations", {}, "keyslots.0.kdf.iterations: below 1000"),
    ("priority-ignore", {}, "keyslots.0.priority: unexpected value"),
    ("unbound-aes128", {}, "keyslots.1.key_size: keyslots disagree on the volume key size"),
    ("no-keyslots", {}, "keyslots: none"),
    # digests
    ("digests-none", {}, "digests: none"),
    ("digest-sha1", {}, "digests.0: expected a pbkdf2 digest with an approved hash"),
    ("unbound", {}, "digests.1.segments: expected ['0']"),
    ("orphan-keyslot", {}, "digests: keyslots and digests do not match one to one"),
    # tokens
    ("first-boot-token", {}, "tokens: 1 token(s) present, none expected"),
    ("keyring-token", {}, "tokens: 1 token(s) present, none expected"),
    ("keyring-token", {"allow_first_boot_token": True}, "tokens: 1 token(s) present, none expected"),
    ("token-15-bound", {"allow_first_boot_token": True},
     "tokens.15: expected a 'chutes-first-boot' token bound to no keyslot"),
    ("token-15-bound", {}, "tokens: 1 token(s) present, none expected"),
    # config
    ("config-flag", {}, "config.flags: 'bogus-flag' not allowed"),
    ("requirement", {}, "config.requirements: {'mandatory': ['offline-reencrypt']} (e.g. reencryption) not allowed"),
]


DECISION_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for n, p, _ in DECISIONS]


@cache
def captured(name: str) -> bytes:
    return lzma.decompress((HEADERS / f"{name}.hdr.xz").read_bytes())


def _read_copy(head: bytes, offset: int, secondary: bool) -> tuple[int, int, dict[str, Any] | None] | None:
    """(hdr_size, seqid, metadata) of the header copy at ``offset`` (cryptsetup's hdr_read_disk: magic, version,
    hdr_offset, hdr_size, checksum with the header's own checksum_alg); None if cryptsetup cannot read it, metadata
    None if its JSON area is not a NUL-terminated JSON object (cryptsetup: an obsolete copy)."""
    binary = head[offset: offset + 4096]
    if len(binary) < 4096 or binary[:6] != (LUKS2_MAGIC_2 if secondary else LUKS2_MAGIC_1):
        return None
    version, hdr_size, seqid = struct.unpack_from(">HQQ", binary, 6)
    (hdr_offset,) = struct.unpack_from(">Q", binary, 256)
    if version != 2 or hdr_offset != offset or not 0x4000 <= hdr_size <= 0x400000 or (secondary and offset != hdr_size):
        return None
    area = head[offset + 4096: offset + hdr_size]
    if len(area) != hdr_size - 4096:
        return None
    try:
        digest = hashlib.new(binary[72:104].split(b"\0", 1)[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    digest.update(binary[:448] + bytes(64) + binary[512:] + area)
    if digest.digest() != binary[448: 448 + digest.digest_size]:
        return None
    text = area.split(b"\0", 1)[0]
    try:
        meta = json.loads(text) if text.startswith(b"{") and not area[len(text):].strip(b"\0") else None
    except ValueError:
        meta = None
    return hdr_size, seqid, meta if isinstance(meta, dict) else None


def cryptsetup_metadata(head: bytes) -> dict[str, Any] | None:
    """The metadata ``luksDump --dump-json-metadata`` would print for these bytes, by cryptsetup's choice of copy:
    the primary, the secondary after it (or at a known offset when the primary is unreadable), the newer of the two
    when both are good, the primary on a tie. cryptsetup's JSON validation (LUKS2_hdr_validate) is not repeated."""
    primary = _read_copy(head, 0, False)
    offsets = (primary[0],) if primary is not None else HDR2_OFFSETS
    secondary = next((c for c in (_read_copy(head, off, True) for off in offsets) if c is not None), None)
    good = [c for c in (primary, secondary) if c is not None and c[2] is not None]
    if not good:
        return None
    best = max(good, key=lambda c: c[1])  # max() keeps the first (the primary) on equal seqids
    return best[2]


def decide(name: str, **policy: Any) -> tuple[str, HeaderSummary | None]:
    """The agent's decision on a captured header: the binary header, then the metadata cryptsetup would give."""
    head = captured(name)
    meta = cryptsetup_metadata(head)
    try:
        if meta is None:  # cryptsetup loads nothing from these bytes: the binary check alone must refuse
            check_binary_header(head)
            return "cryptsetup loads nothing, yet the binary header passed", None
        summary = validate_metadata(meta, head, **policy)
    except LuksHeaderError as exc:
        return str(exc), None
    return ACCEPT, summary


def test_the_folder_holds_exactly_the_cases() -> None:
    on_disk = {p.name.removesuffix(".hdr.xz") for p in HEADERS.glob("*.hdr.xz")}
    assert on_disk == set(CASES) == {name for name, _, _ in DECISIONS}


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_is_the_recorded_one(name: str) -> None:
    blob = (HEADERS / f"{name}.hdr.xz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == CASES[name]["xz_sha256"]
    assert len(captured(name)) == CASES[name]["size"]
    assert hashlib.sha256(captured(name)).hexdigest() == CASES[name]["sha256"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_metadata_is_what_cryptsetup_printed(name: str) -> None:
    """The metadata read here from the bytes is exactly cryptsetup's ``luksDump --dump-json-metadata`` of them."""
    recorded = CASES[name]["luksdump"]
    mine = cryptsetup_metadata(captured(name))
    if recorded is not None:
        assert mine is not None and mine == recorded
        assert list(mine["keyslots"]) == list(recorded["keyslots"])  # the order the policy walks them in
    else:
        assert CASES[name]["luksdump_error"]
        assert name in UNREADABLE | CRYPTSETUP_REFUSES_JSON
        assert (mine is None) == (name in UNREADABLE)


@pytest.mark.parametrize(("name", "policy", "decision"), DECISIONS, ids=DECISION_IDS)
def test_decision(name: str, policy: dict[str, Any], decision: str) -> None:
    assert decide(name, **policy)[0] == decision


def test_production_summary() -> None:
    decision, s = decide("production")
    assert decision == ACCEPT and s is not None
    assert (s.version, s.uuid, s.label, s.cipher, s.sector_size, s.keyslots, s.key_size, s.first_boot_token) == (
        2, CASES["production"]["uuid"], "root", "aes-xts-plain64", 4096, ["0"], 64, False)
    canon = json.dumps(CASES["production"]["luksdump"], sort_keys=True, separators=(",", ":")).encode()
    assert s.json_sha256 == hashlib.sha256(canon).hexdigest()  # what boot-status.json would record
    assert CASES["production"]["luksdump"]["keyslots"]["0"]["kdf"]["type"] == "argon2id"


@pytest.mark.parametrize(("name", "fields"), [
    ("first-boot-token", {"first_boot_token": True, "label": "root", "keyslots": ["0"]}),
    ("test-image", {"label": "lbl", "key_size": 64}),
    ("sector-512", {"sector_size": 512}),
    ("aes-128-xts", {"key_size": 32}),
    ("two-keyslots", {"keyslots": ["0", "1"]}),
    ("metadata-64k", {"sector_size": 4096}),
    ("offset-2MiB", {"sector_size": 4096}),
])
def test_accepted_summaries(name: str, fields: dict[str, Any]) -> None:
    policy: dict[str, dict[str, Any]] = {"first-boot-token": {"allow_first_boot_token": True},
                                         "offset-2MiB": {"data_offset": 2097152}}
    decision, s = decide(name, **policy.get(name, {}))
    assert decision == ACCEPT and s is not None
    assert s.uuid == CASES[name]["uuid"] and s.cipher == "aes-xts-plain64"
    assert {k: getattr(s, k) for k in fields} == fields


def test_copy_choice_matters() -> None:
    """Both copies carry a valid checksum; only the newer one is what cryptsetup (and so the agent) uses."""
    def copies(name: str) -> list[str]:
        head = captured(name)
        size = struct.unpack_from(">Q", head, 8)[0]
        return [json.loads(head[off + 4096: off + size].split(b"\0", 1)[0])["segments"]["0"]["encryption"]
                for off in (0, size)]

    assert copies("secondary-stale-null") == copies("secondary-newer-null") == ["aes-xts-plain64", "cipher_null-ecb"]
    assert decide("secondary-stale-null")[0] == ACCEPT
    assert decide("secondary-newer-null")[0] == NULL_SEGMENT
    # the primary copy on its own is the production shape: the binary check passes, the metadata decides
    check_binary_header(captured("secondary-newer-null"))
