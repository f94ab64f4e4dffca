"""RTMR3 rootfs measurement chain (≥1.3 images; chutes-vm-generations.md §6).

What is measured, in which order, and how — the rules every party (initramfs, image build, predictor)
must agree on, or the registered RTMR3 never matches:

* **Path list** (``/etc/tdx-measure.conf``): one absolute path per line; a line is cut at the first
  ``#`` and trimmed of whitespace (spaces, tabs, CR); empty lines are skipped. ``..``/``.`` components
  and NUL are refused. An empty list is an error.
* **Files**: every *regular* file at or below ``<root><path>``. Symlinks and special files (FIFOs,
  sockets, devices) inside a measured directory are neither followed nor measured (``find -P -type f``).
  A configured entry that is itself a symlink is an error, as is one that is neither a regular file nor
  a directory: either would silently change coverage. Symlinks in the *leading* components of an entry
  (``/lib`` → ``usr/lib`` on merged-/usr roots) are resolved as in a chroot of ``root`` (an absolute
  target stays inside ``root``), never against the filesystem the measurer runs in.
* **Missing entry**: fail closed (an error naming it). The upstream shell walker lets a missing path
  contribute nothing; we refuse, so a deleted policy directory cannot shrink coverage unnoticed.
* **Order**: root-relative path with a leading ``/`` (the configured spelling, not the resolved one),
  sorted by raw bytes (``LC_ALL=C sort -u``); a file reached through overlapping entries counts once.
  A file name containing a newline is refused (no manifest line can name it).
* **Digest**: d = SHA-384(content); RTMR3 ← SHA-384(RTMR3 ‖ d) per file, from 48 zero bytes.

Manifest (``/etc/tdx-rtmr3-expected-hashes``), checked in full *before anything is extended*: one
``<96 hex> <path>`` line per file, ``sha384sum`` style (two spaces, or `` *``, or the single space the
upstream ``tee-measure hash`` writes); a leading ``\\`` means GNU escaping in the name (``\\\\``, ``\\n``).
Blank lines and ``#`` comments are skipped. The manifest must name exactly the measured set: a file
present but not listed, listed but not present, a digest mismatch, a malformed or duplicate line —
each fails closed with ``RTMR3-MEASURE-FAILED: ...`` naming the file.

Extension: the register must read zero first (the chain starts from zero; anything else means someone
extended before us), then each digest is written as 48 raw bytes in one ``pwrite`` at offset 0, in
sorted order, and the register is read back through a fresh open and compared to the locally computed
chain. One read-back at the end (not per file): on hardware every read re-runs TDG.MR.REPORT, and any
deviation along the way changes the final value. No event-log entry is written (reference §6).

Hashing: files of 64 KiB and more on a thread pool (hashlib releases the GIL on large updates; reads
are 1 MiB), smaller ones meanwhile on the calling thread (per-file Python work holds the GIL, so more
threads would only contend); the digests are then checked and chained strictly in sorted order.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.errors import VerificationError
from agent.evidence.base import EvidenceError
from agent.log import get_logger

log = get_logger(__name__)

MARKER = "RTMR3-MEASURE-FAILED:"
DIGEST_LEN = 48
ZERO = bytes(DIGEST_LEN)
CHUNK = 1 << 20
#: Files at least this large are hashed on the pool; smaller ones by the calling thread (see hash_all).
POOL_MIN_BYTES = 64 << 10
MAX_LIST_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
_MAX_SYMLINK_HOPS = 40


class RootfsMeasureError(EvidenceError, VerificationError):
    """The rootfs chain could not be measured or verified; ``str()`` starts with ``RTMR3-MEASURE-FAILED:``."""

    reason = "rtmr3_measure_failed"

    def __init__(self, detail: str, path: bytes | None = None) -> None:
        self.detail = detail
        self.path = path  # root-relative file name, when one file is to blame
        where = f"{show_path(path)}: " if path is not None else ""
        super().__init__(f"{MARKER} {where}{detail}")


@dataclass(frozen=True)
class MeasuredFile:
    """One planned file: its root-relative name (chain key) and where to open it."""

    rel: bytes
    full: bytes
    size: int


@dataclass
class RootfsMeasurement:
    """Result of :func:`measure_rootfs` / :func:`predict_entries`."""

    rtmr3: bytes
    files: int
    total_bytes: int
    seconds: float
    #: (root-relative path, SHA-384) in chain order.
    entries: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)


def show_path(rel: bytes) -> str:
    """A file name safe for one console line (control characters and invalid UTF-8 escaped)."""
    text = rel.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


# -- path list ------------------------------------------------------------------------------------


def parse_measure_conf(text: bytes, origin: str = "measure conf") -> list[bytes]:
    """The configured absolute paths, in file order (see module doc for the rules)."""
    paths: list[bytes] = []
    for lineno, raw in enumerate(text.split(b"\n"), 1):
        line = raw.split(b"#", 1)[0].strip(b" \t\r\v\f")
        if not line:
            continue
        paths.append(_check_entry(line, f"{origin}:{lineno}"))
    if not paths:
        raise RootfsMeasureError(f"{origin}: no paths configured")
    return paths


def _check_entry(path: bytes, where: str) -> bytes:
    if not path.startswith(b"/") or b"\0" in path:
        raise RootfsMeasureError(f"{where}: expected an absolute path, got {show_path(path)!r}")
    parts = [p for p in path.split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise RootfsMeasureError(f"{where}: '.' and '..' are not allowed in {show_path(path)!r}")
    return b"/" + b"/".join(parts)


def read_measure_conf(path: str) -> list[bytes]:
    return parse_measure_conf(_read_bounded(path, MAX_LIST_BYTES, "measure conf"), path)


def _read_bounded(path: str, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise RootfsMeasureError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise RootfsMeasureError(f"{what} {path} is larger than {limit} bytes")
    return data


# -- plan -----------------------------------------------------------------------------------------


def _resolve_parent(root: bytes, rel: bytes) -> bytes:
    """``root`` + ``rel``'s leading components with symlinks resolved as in ``chroot(root)``.

    The last component is kept as is (its own type is checked by the caller, with lstat).
    """
    parts = [p for p in rel.split(b"/") if p]
    last = parts.pop() if parts else b""
    resolved: list[bytes] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == b".":
            continue
        if name == b"..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + b"/" + b"/".join([*resolved, name])
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(name)  # the caller's lstat reports it missing
            resolved.extend(parts)
            break
        except OSError as exc:
            raise RootfsMeasureError(f"cannot stat: {exc.strerror}", b"/" + b"/".join([*resolved, name])) from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise RootfsMeasureError("too many levels of symbolic links", rel)
            target = os.readlink(candidate)
            if target.startswith(b"/"):
                resolved = []
            parts = [p for p in target.split(b"/") if p] + parts
            continue
        resolved.append(name)
    return root + b"/" + b"/".join([*resolved, last]) if last else root + b"/" + b"/".join(resolved)


def _walk(full_dir: bytes, rel_dir: bytes, out: dict[bytes, MeasuredFile]) -> None:
    try:
        entries = list(os.scandir(full_dir))
    except OSError as exc:
        raise RootfsMeasureError(f"cannot list directory: {exc.strerror}", rel_dir) from None
    for entry in entries:
        rel = rel_dir.rstrip(b"/") + b"/" + entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                _walk(entry.path, rel, out)
            elif entry.is_file(follow_symlinks=False):
                _add(out, rel, entry.path, entry.stat(follow_symlinks=False).st_size)
        except OSError as exc:
            raise RootfsMeasureError(f"cannot stat: {exc.strerror}", rel) from None
        # symlinks, FIFOs, sockets, devices: neither followed nor measured


def _add(out: dict[bytes, MeasuredFile], rel: bytes, full: bytes, size: int) -> None:
    if b"\n" in rel:
        raise RootfsMeasureError("file name contains a newline (no manifest line can name it)", rel)
    out.setdefault(rel, MeasuredFile(rel, full, size))


def plan(root: str | bytes, paths: Iterable[str | bytes]) -> list[MeasuredFile]:
    """Every measured file under ``root`` for the configured ``paths``, in chain order."""
    root_b = os.fsencode(root).rstrip(b"/")
    if not os.path.isdir(root_b or b"/"):
        raise RootfsMeasureError(f"root {show_path(root_b or b'/')} is not a directory")
    found: dict[bytes, MeasuredFile] = {}
    for raw in paths:
        entry = _check_entry(os.fsencode(raw), "measured path")
        full = _resolve_parent(root_b, entry)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            raise RootfsMeasureError("configured measured path does not exist", entry) from None
        except OSError as exc:
            raise RootfsMeasureError(f"cannot stat: {exc.strerror}", entry) from None
        if stat.S_ISLNK(st.st_mode):
            raise RootfsMeasureError("configured measured path is a symlink (would change coverage)", entry)
        if stat.S_ISDIR(st.st_mode):
            _walk(full, entry, found)
        elif stat.S_ISREG(st.st_mode):
            _add(found, entry, full, st.st_size)
        else:
            raise RootfsMeasureError("configured measured path is neither a regular file nor a directory", entry)
    if not found:
        raise RootfsMeasureError("no regular files found under the measured paths")
    return [found[k] for k in sorted(found)]


# -- hashing --------------------------------------------------------------------------------------


def hash_file(f: MeasuredFile, buf: bytearray | None = None) -> tuple[bytes, int]:
    """(SHA-384 of the content, bytes read); refuses anything that is no longer a regular file."""
    try:
        fd = os.open(f.full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise RootfsMeasureError(f"cannot open: {exc.strerror}", f.rel) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RootfsMeasureError("no longer a regular file", f.rel)
        if st.st_size < CHUNK:  # one read of size+1 normally returns everything and shows EOF
            h = hashlib.sha384()
            n = 0
            want = st.st_size + 1
            while chunk := os.read(fd, want):
                h.update(chunk)
                n += len(chunk)
                if len(chunk) < want and n >= st.st_size:
                    break
                want = CHUNK
            return h.digest(), n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        h = hashlib.sha384()
        n = 0
        buf = buf if buf is not None else bytearray(CHUNK)
        view = memoryview(buf)
        while got := os.readv(fd, [buf]):
            h.update(view[:got])  # releases the GIL: other files hash meanwhile
            n += got
        return h.digest(), n
    except OSError as exc:
        raise RootfsMeasureError(f"cannot read: {exc.strerror}", f.rel) from None
    finally:
        os.close(fd)


def _hash_one(f: MeasuredFile) -> tuple[bytes, int]:
    return hash_file(f, bytearray(CHUNK))


def default_workers() -> int:
    """Pool threads for the larger files: one per CPU, at least 2 (I/O overlaps), at most 16."""
    return max(2, min(16, os.cpu_count() or 1))


def hash_all(files: Sequence[MeasuredFile], workers: int | None = None) -> list[tuple[bytes, int]]:
    """(digest, bytes read) for every file, in the order of ``files``.

    Files of at least ``POOL_MIN_BYTES`` go to a thread pool, where hashing dominates and runs without
    the GIL; smaller ones are hashed by the calling thread meanwhile, because for them per-file Python
    work dominates and several threads contending for the GIL are slower than one (measured: 4 threads
    took twice as long as 1 over 23k files of ~2 KiB on 2 CPUs).
    """
    results: list[tuple[bytes, int] | None] = [None] * len(files)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="rtmr3-hash")
    try:
        pooled = [(i, pool.submit(_hash_one, f)) for i, f in enumerate(files) if f.size >= POOL_MIN_BYTES]
        buf = bytearray(CHUNK)
        for i, f in enumerate(files):
            if f.size < POOL_MIN_BYTES:
                results[i] = hash_file(f, buf)
        for i, fut in pooled:
            results[i] = fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


def extend_value(value: bytes, digest: bytes) -> bytes:
    """RTMR extension: SHA-384(old ‖ digest)."""
    return hashlib.sha384(value + digest).digest()


def chain(digests: Iterable[bytes], start: bytes = ZERO) -> bytes:
    value = start
    for d in digests:
        value = extend_value(value, d)
    return value


# -- manifest -------------------------------------------------------------------------------------


def _unescape(name: bytes, where: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(name):
        c = name[i : i + 1]
        if c == b"\\":
            nxt = name[i + 1 : i + 2]
            if nxt not in (b"\\", b"n", b"r"):
                raise RootfsMeasureError(f"{where}: bad escape in the file name")
            out += {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}[nxt]
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def parse_manifest(text: bytes, origin: str = "manifest") -> dict[bytes, bytes]:
    """Root-relative path -> expected SHA-384 (see module doc for the accepted line forms)."""
    expected: dict[bytes, bytes] = {}
    for lineno, line in enumerate(text.split(b"\n"), 1):
        where = f"{origin}:{lineno}"
        if not line.strip() or line.startswith(b"#"):
            continue
        escaped = line.startswith(b"\\")
        if escaped:
            line = line[1:]
        hexpart, rest = line[:96], line[96:]
        try:
            digest = bytes.fromhex(hexpart.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != DIGEST_LEN or not rest.startswith(b" "):
            raise RootfsMeasureError(f"{where}: expected '<96 hex digits> <path>'")
        name = rest[2:] if rest[1:2] in (b" ", b"*") else rest[1:]
        if escaped:
            name = _unescape(name, where)
        if not name.startswith(b"/"):
            raise RootfsMeasureError(f"{where}: expected a root-relative path starting with '/'")
        if name in expected:
            raise RootfsMeasureError(f"{where}: listed twice", name)
        expected[name] = digest
    if not expected:
        raise RootfsMeasureError(f"{origin}: no entries")
    return expected


def read_manifest(path: str) -> dict[bytes, bytes]:
    return parse_manifest(_read_bounded(path, MAX_MANIFEST_BYTES, "expected-hash manifest"), path)


def format_manifest(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``sha384sum``-style lines (GNU escaping for ``\\``/newline names) that :func:`parse_manifest` reads."""
    out = bytearray()
    for rel, digest in entries:
        if b"\\" in rel or b"\n" in rel or b"\r" in rel:
            esc = rel.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
            out += b"\\" + digest.hex().encode() + b"  " + esc + b"\n"
        else:
            out += digest.hex().encode() + b"  " + rel + b"\n"
    return bytes(out)


def check_manifest_coverage(files: Sequence[MeasuredFile], expected: dict[bytes, bytes]) -> None:
    """The manifest names exactly the planned files (before any file is read)."""
    planned = {f.rel for f in files}
    for f in files:
        if f.rel not in expected:
            raise RootfsMeasureError("present under a measured path but not in the expected-hash manifest", f.rel)
    for rel in sorted(expected):
        if rel not in planned:
            raise RootfsMeasureError("in the expected-hash manifest but not present (or not a regular file)", rel)


# -- predict / measure ------------------------------------------------------------------------------


def predict_entries(
    root: str | bytes, paths: Iterable[str | bytes], *, manifest: dict[bytes, bytes] | None = None,
    workers: int | None = None,
) -> RootfsMeasurement:
    """The final RTMR3 from zero for ``root`` without a TD, with every file's digest (chain order)."""
    started = time.monotonic()
    files = plan(root, paths)
    if manifest is not None:
        check_manifest_coverage(files, manifest)
    value = ZERO
    total = 0
    entries: list[tuple[bytes, bytes]] = []
    for f, (digest, n) in zip(files, hash_all(files, workers), strict=True):
        if manifest is not None and manifest[f.rel] != digest:  # the first mismatch in chain order
            raise RootfsMeasureError(
                f"SHA-384 {digest.hex()[:16]}… does not match the manifest's {manifest[f.rel].hex()[:16]}…", f.rel)
        value = extend_value(value, digest)
        total += n
        entries.append((f.rel, digest))
    return RootfsMeasurement(value, len(entries), total, time.monotonic() - started, entries)


def predict(root: str | bytes, paths: Iterable[str | bytes]) -> bytes:
    """The final RTMR3 value (48 bytes) the boot chain would produce for ``root``."""
    return predict_entries(root, paths).rtmr3


def _read_register(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RootfsMeasureError(f"cannot open {path}: {exc.strerror}") from None
    try:
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > DIGEST_LEN:
                break
    except OSError as exc:
        raise RootfsMeasureError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != DIGEST_LEN:
        raise RootfsMeasureError(f"{path}: expected {DIGEST_LEN} bytes, read {len(data)}")
    return data


def write_digests(sysfs_path: str, digests: Sequence[bytes]) -> None:
    """Write each digest as 48 bytes in one ``pwrite`` at offset 0, in order, through one open file."""
    try:
        fd = os.open(sysfs_path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RootfsMeasureError(f"cannot open {sysfs_path} for writing: {exc.strerror}") from None
    try:
        for i, d in enumerate(digests):
            try:
                n = os.pwrite(fd, d, 0)
            except OSError as exc:
                raise RootfsMeasureError(f"extending {sysfs_path} failed at file {i + 1}: {exc.strerror}") from None
            if n != DIGEST_LEN:
                raise RootfsMeasureError(f"extending {sysfs_path}: short write ({n} of {DIGEST_LEN} bytes)")
    finally:
        os.close(fd)


def extend_register(sysfs_path: str, digests: Sequence[bytes], expected: bytes) -> None:
    """Extend the register with ``digests`` in order, then read it back once and compare to ``expected``."""
    write_digests(sysfs_path, digests)
    after = _read_register(sysfs_path)
    if after != expected:
        raise RootfsMeasureError(
            f"{sysfs_path} reads {after.hex()[:16]}… after the chain, expected {expected.hex()[:16]}…")


def measure_rootfs(
    root: str, measure_conf: str, manifest: str, sysfs_path: str, *, workers: int | None = None,
) -> RootfsMeasurement:
    """Boot step: check every measured file against the manifest, then extend RTMR3 in order.

    Synchronous (run it in a thread from async code). Raises :class:`RootfsMeasureError` on any
    failure; the register is untouched unless every file matched.
    """
    started = time.monotonic()
    paths = read_measure_conf(measure_conf)
    expected = read_manifest(manifest)
    before = _read_register(sysfs_path)
    if before != ZERO:
        raise RootfsMeasureError(f"{sysfs_path} is already extended ({before.hex()[:16]}…); the chain starts from zero")
    result = predict_entries(root, paths, manifest=expected, workers=workers)
    hashed_s = time.monotonic() - started
    extend_register(sysfs_path, [d for _, d in result.entries], result.rtmr3)
    result.seconds = time.monotonic() - started
    log.info("rtmr3.rootfs_measured", files=result.files, bytes=result.total_bytes, rtmr3=result.rtmr3.hex(),
             hash_ms=round(hashed_s * 1000, 1), total_ms=round(result.seconds * 1000, 1))
    return result
