#!/usr/bin/env python3
"""Regenerate the captured LUKS2 headers in this folder (run by hand, as root; the tests never run it).

    sudo python3 tests/data/luks2-headers/make.py            # rewrites *.hdr.xz and cases.json here
    sudo python3 tests/data/luks2-headers/make.py --out DIR  # somewhere else (to compare)

Needs only ``cryptsetup`` and ``wipefs`` (util-linux) and the Python standard library: no loop device,
no device-mapper. Every case starts from a regular file formatted by real ``cryptsetup luksFormat``;
"real" cases then use only cryptsetup (or wipefs) itself, "crafted" cases also edit the JSON area or the
binary header of the header backup the way a malicious host would, with valid checksums (``_write_copy``).
For every case the script records, in cases.json, the exact commands, the edit, and what
``cryptsetup luksDump --dump-json-metadata`` makes of the result (the metadata the agent validates, or
cryptsetup's refusal). UUIDs are fixed per case (uuid5 of the name); salts and keyslot material are random,
so a rerun gives different bytes but the same decisions.

What is stored is the header area the policy reads: the first 2 x hdr_size bytes of the
``luksHeaderBackup`` output (primary binary header + JSON area, secondary binary header + JSON area), or
of the disk itself where luksHeaderBackup refuses; the keyslot area after it (random bytes, 16 MiB) is
left out. Compressed with the stdlib ``lzma`` (.xz).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shlex
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PASSPHRASE = b"chutes-test-passphrase"  # test data only: these headers protect nothing
SECOND_PASSPHRASE = b"chutes-test-passphrase-2"
MiB = 1024 * 1024
#: The production format (agent.boot.cryptsetup.Cryptsetup.format_luks2; cryptsetup 2.6 defaults).
FORMAT = ["luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64", "--key-size", "512"]
#: A real argon2id keyslot, cheap to make (production lets cryptsetup benchmark the cost).
FAST_ARGON = ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768"]
#: The test images' KDF (agent.sim.luks_image.make_luks_image).
FAST_PBKDF2 = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


@dataclass
class Ctx:
    """One case being made in a scratch directory: ``disk.img`` (the volume), ``hdr.img`` (its header backup)."""

    name: str
    work: Path
    commands: list[str] = field(default_factory=list)
    edits: list[str] = field(default_factory=list)
    backup: bool = True  # False: capture the disk bytes (luksHeaderBackup refuses the disk)
    capture: int | None = None  # bytes to keep; None: 2 x hdr_size of the header as formatted
    header_file: str = "disk.img"  # what luksHeaderBackup reads (a detached header: hdr-detached.img)

    @property
    def disk(self) -> Path:
        return self.work / "disk.img"

    @property
    def hdr(self) -> Path:
        return self.work / "hdr.img"

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"chutes-attest/tests/data/luks2-headers/{self.name}"))

    def sh(self, argv: list[str], stdin: bytes | None = None, *, shown: str | None = None) -> str:
        """Run a command in the scratch directory, recorded as run (paths relative to it)."""
        self.commands.append(shown or shlex.join(argv))
        proc = subprocess.run(argv, cwd=self.work, input=stdin, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {shlex.join(argv)}: rc={proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout.decode(errors="replace")

    def cs(self, *args: str, stdin: bytes | None = None) -> str:
        shown = shlex.join(["cryptsetup", *args])
        if stdin is not None:
            shown = f"printf %s {shlex.quote(stdin.decode())} | {shown}"
        return self.sh(["cryptsetup", *args], stdin, shown=shown)

    def truncate(self, path: str, size: int) -> None:
        self.sh(["truncate", "-s", str(size), path])

    def format(self, *extra: str, size: int = 24 * MiB, kdf: list[str] | None = None, label: str = "root",
               base: list[str] | None = None) -> None:
        """``truncate -s 24M disk.img`` + ``cryptsetup luksFormat`` (the passphrase on stdin)."""
        self.truncate("disk.img", size)
        args = [*(FORMAT if base is None else base), *(FAST_ARGON if kdf is None else kdf), "--uuid", self.uuid]
        if label:
            args += ["--label", label]
        self.cs(*args, *extra, "--key-file=-", "disk.img", stdin=PASSPHRASE)

    def backup_then(self, edit: Callable[[], None]) -> None:
        """Take the header backup now, then ``edit`` it (crafted cases edit the copy the agent validates)."""
        self.cs("luksHeaderBackup", self.header_file, "--header-backup-file", "hdr.img")
        edit()

    def edit_json(self, what: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Crafted: apply ``mutate`` to the JSON metadata of both header copies of hdr.img, new checksums."""
        self.edits.append(what)
        buf = bytearray(self.hdr.read_bytes())
        hdr_size = _hdr_size(buf, 0)
        meta = _json_area(buf, 0, hdr_size)
        mutate(meta)
        for off in (0, hdr_size):
            _write_copy(buf, off, hdr_size, meta=meta)
        self.hdr.write_bytes(bytes(buf))

    def edit_bytes(self, what: str, mutate: Callable[[bytearray, int], None]) -> None:
        """Crafted: arbitrary edit of hdr.img's bytes; ``mutate(buf, hdr_size)`` fixes checksums itself."""
        self.edits.append(what)
        buf = bytearray(self.hdr.read_bytes())
        mutate(buf, _hdr_size(buf, 0))
        self.hdr.write_bytes(bytes(buf))


# --- binary header helpers (LUKS2 on-disk format: magic 0, version 6, hdr_size 8, seqid 16, label 24,
# checksum_alg 72, salt 104, uuid 168, subsystem 208, hdr_offset 256, checksum 448..512; JSON area at 4096) ---

def _hdr_size(buf: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", buf, off + 8)[0])


def _json_area(buf: bytes | bytearray, off: int, hdr_size: int) -> dict[str, Any]:
    return dict(json.loads(bytes(buf[off + 4096: off + hdr_size]).split(b"\0", 1)[0]))


def _write_copy(buf: bytearray, off: int, hdr_size: int, *, meta: dict[str, Any] | None = None,
                seqid: int | None = None, alg: str | None = None, new_hdr_size: int | None = None) -> None:
    """Rewrite one header copy at ``off`` (JSON area, seqid, checksum_alg, hdr_size) and re-checksum it.

    The JSON is written the way cryptsetup writes it (json-c PLAIN: no whitespace, keys in order, NUL padded);
    the checksum is ``alg`` over binary header (checksum field zeroed) + JSON area, as in LUKS2_disk_hdr_write.
    """
    size = new_hdr_size or hdr_size
    if meta is not None:
        text = json.dumps(meta, separators=(",", ":")).encode()
        area = hdr_size - 4096
        if len(text) >= area:
            raise ValueError("edited metadata does not fit the JSON area")
        buf[off + 4096: off + hdr_size] = text + bytes(area - len(text))
    if seqid is not None:
        struct.pack_into(">Q", buf, off + 16, seqid)
    if alg is not None:
        buf[off + 72: off + 104] = alg.encode().ljust(32, b"\0")
    if new_hdr_size is not None:
        struct.pack_into(">Q", buf, off + 8, new_hdr_size)
    name = bytes(buf[off + 72: off + 104]).rstrip(b"\0").decode()
    buf[off + 448: off + 512] = bytes(64)
    digest = hashlib.new(name, bytes(buf[off: off + size])).digest()
    buf[off + 448: off + 448 + len(digest)] = digest


# --- the cases --------------------------------------------------------------------------------------------

CASES: dict[str, tuple[str, Callable[[Ctx], None]]] = {}


def case(name: str, what: str) -> Callable[[Callable[[Ctx], None]], Callable[[Ctx], None]]:
    def register(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
        CASES[name] = (what, fn)
        return fn
    return register


def _first_boot_token(ctx: Ctx, keyslots: list[str]) -> None:
    token = json.dumps({"type": "chutes-first-boot", "keyslots": keyslots, "version": "1.4.0"},
                       separators=(",", ":")).encode()
    ctx.cs("token", "import", "--token-id", "15", "disk.img", stdin=token)


@case("production", "the production format: aes-xts-plain64, 512-bit key, argon2id benchmarked by cryptsetup")
def _production(ctx: Ctx) -> None:
    ctx.format(kdf=["--pbkdf", "argon2id"])


@case("first-boot-token", "a 1.4.0 image before its first boot: production format + token 15 (luks_encrypt.yml)")
def _first_boot(ctx: Ctx) -> None:
    ctx.format()
    _first_boot_token(ctx, [])


@case("test-image", "the test images' format (agent.sim.luks_image.make_luks_image): pbkdf2, 1000 iterations")
def _test_image(ctx: Ctx) -> None:
    ctx.format(kdf=FAST_PBKDF2, label="lbl")


@case("sector-512", "512-byte encryption sectors (--sector-size 512)")
def _sector_512(ctx: Ctx) -> None:
    ctx.format("--sector-size", "512")


@case("aes-128-xts", "aes-xts-plain64 with a 256-bit key (AES-128 in XTS)")
def _aes128(ctx: Ctx) -> None:
    ctx.format(base=[*FORMAT[:-1], "256"])


@case("two-keyslots", "a second keyslot for the same volume key (the rotation's luksAddKey)")
def _two_keyslots(ctx: Ctx) -> None:
    ctx.format()
    (ctx.work / "key").write_bytes(PASSPHRASE)
    (ctx.work / "key2").write_bytes(SECOND_PASSPHRASE)
    ctx.cs("luksAddKey", "--batch-mode", *FAST_PBKDF2, "--key-file", "key", "disk.img", "key2")


@case("priority-prefer", "keyslot priority 'prefer' (cryptsetup config --priority prefer)")
def _priority_prefer(ctx: Ctx) -> None:
    ctx.format()
    ctx.cs("config", "--priority", "prefer", "--key-slot", "0", "disk.img")


@case("metadata-64k", "a 64 KiB metadata area, keyslots area shrunk so the data still starts at 16 MiB")
def _metadata_64k(ctx: Ctx) -> None:
    ctx.format("--luks2-metadata-size", "65536", "--luks2-keyslots-size", str(16 * MiB - 2 * 65536))


@case("offset-2MiB", "data offset 2 MiB (--offset 4096 sectors): right only where boot.luks_data_offset says so")
def _offset_2m(ctx: Ctx) -> None:
    ctx.format("--offset", "4096")


@case("benign-flags", "crafted: config.flags allow-discards + no-read-workqueue (performance only)")
def _benign_flags(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_json("config.flags = ['allow-discards', 'no-read-workqueue']",
                                          lambda m: m["config"].update(flags=["allow-discards", "no-read-workqueue"])))


def _break_secondary_checksum(buf: bytearray, hdr_size: int) -> None:
    buf[hdr_size + 4096 + 8000] ^= 0xFF  # inside the NUL padding of the secondary JSON area; no new checksum


@case("secondary-corrupt", "crafted: the secondary copy's checksum is broken; cryptsetup uses the primary")
def _secondary_corrupt(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("flip byte hdr_size+4096+8000 (secondary JSON padding), no re-checksum",
                                           _break_secondary_checksum))


def _secondary_with(mutate: Callable[[dict[str, Any]], None], seqid_delta: int) -> Callable[[bytearray, int], None]:
    def edit(buf: bytearray, hdr_size: int) -> None:
        meta = _json_area(buf, hdr_size, hdr_size)
        mutate(meta)
        seqid = int(struct.unpack_from(">Q", buf, hdr_size + 16)[0]) + seqid_delta
        _write_copy(buf, hdr_size, hdr_size, meta=meta, seqid=seqid)
    return edit


def _null_segment(meta: dict[str, Any]) -> None:
    meta["segments"]["0"]["encryption"] = "cipher_null-ecb"


@case("secondary-stale-null", "crafted: the secondary copy (seqid - 1, valid checksum) has a cipher_null segment; "
                              "cryptsetup uses the newer primary")
def _secondary_stale(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("secondary copy only: segments.0.encryption = 'cipher_null-ecb', "
                                           "seqid - 1, re-checksummed", _secondary_with(_null_segment, -1)))


@case("secondary-newer-null", "crafted: the secondary copy (seqid + 1, valid checksum) has a cipher_null segment; "
                              "cryptsetup uses it")
def _secondary_newer(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("secondary copy only: segments.0.encryption = 'cipher_null-ecb', "
                                           "seqid + 1, re-checksummed", _secondary_with(_null_segment, +1)))


# --- binary header refusals ---

@case("short", "crafted: only the first 1024 bytes of a production-format header")
def _short(ctx: Ctx) -> None:
    ctx.format()
    ctx.edits.append("truncated to its first 1024 bytes")
    ctx.capture = 1024


@case("wipefs", "real: wipefs -a on a LUKS2 disk (both magics erased); the disk's first 32 KiB captured")
def _wipefs(ctx: Ctx) -> None:
    ctx.format()
    ctx.sh(["wipefs", "-a", "disk.img"])
    ctx.backup = False
    ctx.capture = 32768


@case("luks1", "real: cryptsetup luksFormat --type luks1; the first 4096 bytes (binary header) captured")
def _luks1(ctx: Ctx) -> None:
    ctx.format(base=["luksFormat", "--batch-mode", "--type", "luks1", "--cipher", "aes-xts-plain64",
                     "--key-size", "512"], kdf=["--pbkdf-force-iterations", "1000"], label="")
    ctx.capture = 4096


def _primary_hdr_size(buf: bytearray, hdr_size: int) -> None:
    _write_copy(buf, 0, hdr_size, new_hdr_size=12288)


@case("hdr-size", "crafted: the primary's hdr_size is 12288 (re-checksummed over 12288 bytes); cryptsetup "
                  "ignores that copy and loads the secondary")
def _hdr_size_case(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("primary hdr_size = 12288, re-checksummed", _primary_hdr_size))
    ctx.capture = 2 * 16384  # both copies as formatted


def _sha1_checksums(buf: bytearray, hdr_size: int) -> None:
    for off in (0, hdr_size):
        _write_copy(buf, off, hdr_size, alg="sha1")


@case("checksum-sha1", "crafted: both copies' checksum_alg 'sha1' with valid SHA-1 checksums (cryptsetup accepts)")
def _checksum_sha1(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("checksum_alg = 'sha1' in both copies, re-checksummed", _sha1_checksums))


def _break_primary_checksum(buf: bytearray, hdr_size: int) -> None:
    buf[4096 + 8000] ^= 0xFF


@case("primary-checksum", "crafted: the primary copy's checksum is broken; cryptsetup falls back to the secondary")
def _primary_checksum(ctx: Ctx) -> None:
    ctx.format()
    ctx.backup_then(lambda: ctx.edit_bytes("flip byte 4096+8000 (primary JSON padding), no re-checksum",
                                           _break_primary_checksum))


# --- segments ---

def _json_case(name: str, what: str, edit: str, mutate: Callable[[dict[str, Any]], None],
               kdf: list[str] | None = None) -> None:
    def build(ctx: Ctx) -> None:
        ctx.format(kdf=kdf)
        ctx.backup_then(lambda: ctx.edit_json(edit, mutate))
    CASES[name] = (what, build)


_json_case("cipher-null", "crafted: the data segment 'encrypted' with cipher_null (GHSA-jxq2-hpw3-m5wf)",
           "segments.0.encryption = 'cipher_null-ecb'", _null_segment)


@case("aes-cbc-essiv", "real: --cipher aes-cbc-essiv:sha256 --key-size 256 (wrong mode)")
def _cbc(ctx: Ctx) -> None:
    ctx.format(base=[*FORMAT[:5], "aes-cbc-essiv:sha256", "--key-size", "256"])


def _two_segments(meta: dict[str, Any]) -> None:
    meta["segments"]["0"]["size"] = "2097152"
    meta["segments"]["1"] = dict(meta["segments"]["0"], offset="18874368", size="dynamic", encryption="cipher_null-ecb")
    meta["digests"]["0"]["segments"] = ["0", "1"]


_json_case("two-segments", "crafted: 2 MiB of aes-xts, then a second, cipher_null segment "
           "(tests/boot/test_failure_matrix.py's shape)",
           "segments.0.size = '2097152'; segments.1 = segments.0 + offset 18874368, size dynamic, cipher_null-ecb; "
           "digests.0.segments = ['0', '1']", _two_segments)


@case("reencrypt", "real: cryptsetup reencrypt --init-only (reencryption initialised, not run)")
def _reencrypt(ctx: Ctx) -> None:
    ctx.format()
    (ctx.work / "key").write_bytes(PASSPHRASE)
    ctx.cs("reencrypt", "--init-only", "--batch-mode", *FAST_PBKDF2, "--key-file", "key", "disk.img")


_json_case("linear-segment", "crafted: segment 0 of type linear (plaintext)", "segments.0.type = 'linear' "
           "(encryption, iv_tweak, sector_size removed)",
           lambda m: m["segments"].update({"0": {"type": "linear", "offset": m["segments"]["0"]["offset"],
                                                 "size": "dynamic"}}))


@case("sector-1024", "real: --sector-size 1024")
def _sector_1024(ctx: Ctx) -> None:
    ctx.format("--sector-size", "1024")


@case("detached-offset-0", "real: a detached header (--header) for data at offset 0 (--offset 0)")
def _detached(ctx: Ctx) -> None:
    ctx.truncate("disk.img", 8 * MiB)
    ctx.truncate("hdr-detached.img", 16 * MiB)
    ctx.cs(*FORMAT, *FAST_ARGON, "--uuid", ctx.uuid, "--label", "root", "--header", "hdr-detached.img",
           "--offset", "0", "--key-file=-", "disk.img", stdin=PASSPHRASE)
    ctx.header_file = "hdr-detached.img"


@case("offset-20MiB", "real: data offset 20 MiB (--offset 40960 sectors)")
def _offset_20m(ctx: Ctx) -> None:
    ctx.format("--offset", "40960")


_json_case("fixed-size", "crafted: segment 0 of fixed size 4 MiB instead of 'dynamic'", "segments.0.size = '4194304'",
           lambda m: m["segments"]["0"].update(size="4194304"))
_json_case("iv-tweak", "crafted: segment 0 with iv_tweak 8192 (shifts the IVs: another window of the volume)",
           "segments.0.iv_tweak = '8192'", lambda m: m["segments"]["0"].update(iv_tweak="8192"))
_json_case("segment-flags", "crafted: segment 0 with a flag (cryptsetup ignores unknown ones)",
           "segments.0.flags = ['bogus-flag']", lambda m: m["segments"]["0"].update(flags=["bogus-flag"]))
_json_case("integrity", "crafted: segment 0 with an hmac(sha256) integrity section (authenticated encryption)",
           "segments.0.integrity = {type: 'hmac(sha256)', journal_encryption: 'none', journal_integrity: 'none'}",
           lambda m: m["segments"]["0"].update(integrity={"type": "hmac(sha256)", "journal_encryption": "none",
                                                          "journal_integrity": "none"}))

# --- keyslots ---

_json_case("keyslot-key-48", "crafted: keyslot 0 holds a 48-byte key (AES-192 XTS; luksFormat --key-size 384 "
           "needs device-mapper to test the cipher)", "keyslots.0.key_size = 48",
           lambda m: m["keyslots"]["0"].update(key_size=48))
_json_case("keyslot-cipher-null", "crafted: keyslot 0's area encrypted with cipher_null",
           "keyslots.0.area.encryption = 'cipher_null-ecb'",
           lambda m: m["keyslots"]["0"]["area"].update(encryption="cipher_null-ecb"))


@case("keyslot-cipher-cbc", "real: --keyslot-cipher aes-cbc-essiv:sha256 --keyslot-key-size 256")
def _keyslot_cbc(ctx: Ctx) -> None:
    ctx.format("--keyslot-cipher", "aes-cbc-essiv:sha256", "--keyslot-key-size", "256")


_json_case("keyslot-area-key-48", "crafted: keyslot 0's area key is 48 bytes", "keyslots.0.area.key_size = 48",
           lambda m: m["keyslots"]["0"]["area"].update(key_size=48))


@case("hash-sha1", "real: --hash sha1 (anti-forensic splitter and digest hash SHA-1)")
def _hash_sha1(ctx: Ctx) -> None:
    ctx.format("--hash", "sha1")


_json_case("af-stripes", "crafted: keyslot 0's anti-forensic splitter with 1 stripe", "keyslots.0.af.stripes = 1",
           lambda m: m["keyslots"]["0"]["af"].update(stripes=1))
_json_case("kdf-type-none", "crafted: keyslot 0's kdf of type 'none' (cryptsetup 2.6.1 still loads it)",
           "keyslots.0.kdf.type = 'none'", lambda m: m["keyslots"]["0"]["kdf"].update(type="none"))
_json_case("kdf-missing", "crafted: keyslot 0 without a kdf section (cryptsetup refuses to load it)",
           "del keyslots.0.kdf", lambda m: m["keyslots"]["0"].pop("kdf"))
_json_case("keyslot-area-checksum", "crafted: keyslot 0's area of type 'checksum' (cryptsetup refuses to load it)",
           "keyslots.0.area.type = 'checksum'", lambda m: m["keyslots"]["0"]["area"].update(type="checksum"))
_json_case("keyslot-type-reencrypt", "crafted: keyslot 0 of type 'reencrypt' (cryptsetup refuses to load it)",
           "keyslots.0.type = 'reencrypt'", lambda m: m["keyslots"]["0"].update(type="reencrypt"))
_json_case("kdf-hash-sha1", "crafted: keyslot 0's pbkdf2 with hash sha1 (test-image format)",
           "keyslots.0.kdf.hash = 'sha1'", lambda m: m["keyslots"]["0"]["kdf"].update(hash="sha1"), kdf=FAST_PBKDF2)
_json_case("kdf-iterations", "crafted: keyslot 0's pbkdf2 with 999 iterations (cryptsetup's own minimum is 1000)",
           "keyslots.0.kdf.iterations = 999", lambda m: m["keyslots"]["0"]["kdf"].update(iterations=999),
           kdf=FAST_PBKDF2)


@case("priority-ignore", "real: cryptsetup config --priority ignore (keyslot priority 0)")
def _priority_ignore(ctx: Ctx) -> None:
    ctx.format()
    ctx.cs("config", "--priority", "ignore", "--key-slot", "0", "disk.img")


@case("unbound-aes128", "real: luksAddKey --unbound --key-size 256 (a 32-byte key not bound to the segment)")
def _unbound_128(ctx: Ctx) -> None:
    ctx.format()
    (ctx.work / "key2").write_bytes(SECOND_PASSPHRASE)
    ctx.cs("luksAddKey", "--batch-mode", "--unbound", "--key-size", "256", *FAST_PBKDF2, "disk.img", "key2")


@case("no-keyslots", "real: luksKillSlot of the only keyslot")
def _no_keyslots(ctx: Ctx) -> None:
    ctx.format()
    ctx.cs("luksKillSlot", "--batch-mode", "disk.img", "0")


# --- digests ---

@case("unbound", "real: luksAddKey --unbound --key-size 512 (its digest covers no segment)")
def _unbound(ctx: Ctx) -> None:
    ctx.format()
    (ctx.work / "key2").write_bytes(SECOND_PASSPHRASE)
    ctx.cs("luksAddKey", "--batch-mode", "--unbound", "--key-size", "512", *FAST_PBKDF2, "disk.img", "key2")


_json_case("digest-sha1", "crafted: digest 0 with hash sha1", "digests.0.hash = 'sha1'",
           lambda m: m["digests"]["0"].update(hash="sha1"))


def _orphan_keyslot(meta: dict[str, Any]) -> None:
    meta["keyslots"]["1"] = json.loads(json.dumps(meta["keyslots"]["0"]))
    meta["keyslots"]["1"]["area"]["offset"] = str(int(meta["keyslots"]["0"]["area"]["offset"])
                                                  + int(meta["keyslots"]["0"]["area"]["size"]))


_json_case("digests-none", "crafted: no digests (cryptsetup refuses to load it)", "digests = {}",
           lambda m: m.update(digests={}))
_json_case("orphan-keyslot", "crafted: keyslot 1 (a copy of keyslot 0 in the next area) no digest covers "
           "(cryptsetup refuses to load it)",
           "keyslots.1 = keyslots.0 with area.offset moved past keyslot 0's area", _orphan_keyslot)

# --- tokens ---


@case("keyring-token", "real: cryptsetup token add --key-description (a luks2-keyring token on keyslot 0)")
def _keyring_token(ctx: Ctx) -> None:
    ctx.format()
    ctx.cs("token", "add", "--key-description", "chutes-test", "--key-slot", "0", "disk.img")


@case("token-15-bound", "real: token 15 of type chutes-first-boot, but bound to keyslot 0 (token import)")
def _token_15_bound(ctx: Ctx) -> None:
    ctx.format()
    _first_boot_token(ctx, ["0"])


# --- config ---

_json_case("config-flag", "crafted: config.flags holds an unknown activation flag", "config.flags = ['bogus-flag']",
           lambda m: m["config"].update(flags=["bogus-flag"]))
_json_case("requirement", "crafted: the offline-reencrypt requirement (cryptsetup 2.0 reencryption) on a plain header",
           "config.requirements = {mandatory: ['offline-reencrypt']}",
           lambda m: m["config"].update(requirements={"mandatory": ["offline-reencrypt"]}))


# --- making one case ---------------------------------------------------------------------------------------

def luks_dump(data: bytes, work: Path) -> tuple[dict[str, Any] | None, str]:
    """``cryptsetup luksDump --dump-json-metadata`` of ``data`` in a scratch file (cryptsetup may repair it)."""
    copy = work / "dump-copy.img"
    copy.write_bytes(data)
    proc = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(copy)], capture_output=True,
                          check=False)
    copy.unlink()
    if proc.returncode != 0:
        return None, proc.stderr.decode(errors="replace").strip().replace(str(copy), "hdr.img")
    return json.loads(proc.stdout), ""


def make(name: str, out: Path) -> dict[str, Any]:
    what, build = CASES[name]
    with tempfile.TemporaryDirectory(prefix=f"luks2-{name}-") as tmp:
        ctx = Ctx(name, Path(tmp))
        build(ctx)
        if ctx.backup and not ctx.hdr.exists():
            ctx.cs("luksHeaderBackup", ctx.header_file, "--header-backup-file", "hdr.img")
        source = ctx.hdr if ctx.backup else ctx.disk
        data = source.read_bytes()
        if ctx.capture is None and data[:6] != b"LUKS\xba\xbe":
            raise RuntimeError(f"{name}: no LUKS2 header to size the capture")
        size = ctx.capture or 2 * _hdr_size(data, 0)
        captured = data[:size]
        # what cryptsetup makes of the stored bytes: the capture, zero-padded to the size of the file it came from
        meta, error = luks_dump(captured + bytes(len(data) - size), ctx.work)
        blob = lzma.compress(captured, preset=9 | lzma.PRESET_EXTREME)
        (out / f"{name}.hdr.xz").write_bytes(blob)
        return {
            "what": what,
            "made": "crafted" if ctx.edits else "real",
            "commands": ctx.commands,
            "edits": ctx.edits,
            "captured": (f"first {size} bytes of " + ("hdr.img (luksHeaderBackup)" if ctx.backup else "disk.img")),
            "size": size,
            "sha256": hashlib.sha256(captured).hexdigest(),
            "xz_sha256": hashlib.sha256(blob).hexdigest(),
            "uuid": ctx.uuid,
            "luksdump": meta,
            "luksdump_error": error,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("names", nargs="*", help="only these cases (default: all)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("warning: not root; cryptsetup may refuse to lock or format files", file=sys.stderr)
    version = subprocess.run(["cryptsetup", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    index = args.out / "cases.json"
    cases: dict[str, Any] = json.loads(index.read_text())["cases"] if index.exists() and args.names else {}
    for name in args.names or list(CASES):
        cases[name] = make(name, args.out)
        print(f"{name}: {cases[name]['made']}, luksDump {'ok' if cases[name]['luksdump'] else 'refuses'}")
    for stale in set(cases) - set(CASES):
        del cases[stale]
    ordered = {n: dict(cases[n], luksdump=f"@luksdump:{n}@") for n in CASES if n in cases}
    doc = {"generator": "tests/data/luks2-headers/make.py", "cryptsetup": version,
           "passphrase": PASSPHRASE.decode(), "cases": ordered}
    text = json.dumps(doc, indent=1)
    for n in ordered:  # cryptsetup's metadata on one line per case (compact, in cryptsetup's key order)
        text = text.replace(f'"@luksdump:{n}@"', json.dumps(cases[n]["luksdump"], separators=(",", ":")))
    index.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
