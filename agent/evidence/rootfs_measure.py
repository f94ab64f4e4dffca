"""The rootfs measurement exactly as Chutes' image pipeline computes it (chutes-vm-generations.md §12).

Two schemes (``boot.rtmr3_scheme``), because the registered RTMR3 is whatever Chutes' own walker
produced for the image, byte for byte:

* **"1.4"** (released 1.4.0 images, sek8s ``rtmr3-measure``): every collected file is one RTMR3
  extension with SHA-384(content), in byte-wise order of the root-relative paths, **duplicates kept**
  (a file reached by two overlapping entries is extended twice).
* **"next"** (chutes-cvm ``tee-measure`` / ``rootfs-measure``): ``LC_ALL=C sort -u``; the *list text*
  is ``<sha384 hex> <path>\\n`` per file; RTMR3 is extended **once** with SHA-384(list text).

Shared rules (§12.1):

* **Path list**: one path per line; everything from the first ``#`` is dropped, then the line is
  trimmed (1.4: spaces only; next: spaces, tabs, CR); empty lines are skipped.
* **A path that does not exist contributes nothing** (production lists name such paths on purpose,
  so that their reappearance changes RTMR3).
* **A directory** contributes every regular file under it, as GNU ``find DIR -type f`` prints it
  (symlinks inside are neither followed nor measured; the spelling is the entry's own: ``/etc/`` and
  ``/etc`` give ``/etc/x``, ``/etc//`` gives ``/etc//x``).
* **A file entry**: on 1.4 ``[ -f ]`` decides, so an entry that is a symlink to a file is measured
  under the entry's own path with the target's content, and one to a directory contributes nothing
  (``find -P`` does not follow a symlinked starting point) unless it is spelled with a trailing ``/``;
  on next an entry that is itself a symlink is an error.
* Only the content is hashed, never the name.

Stricter than Chutes' shell, where neither the value nor whether a Chutes-built image boots changes:
an entry that is not absolute, holds a ``..``/``.`` component or NUL, an empty list, an entry that
exists but is neither a file, a directory nor a symlink (a FIFO or device planted at a listed path),
a file name with a newline (no list or manifest line can name it), and a manifest that names a file
twice with two different hashes: each fails closed. Symlinks in the *leading* components of an entry
(``/lib`` → ``usr/lib``) and the targets of symlinked 1.4 entries are resolved as in ``chroot(root)``
(an absolute target stays inside the root; the shell would resolve it in the initramfs).

Manifest (§12.3): ``<absolute path><space><sha384 hex>`` lines, path first, the hash the last 96
characters (a path may contain spaces), ``#`` comment lines, a path may be listed twice. Only files the
manifest names are compared, each before anything is extended; a mismatch fails closed naming the file.
A measured file the manifest does not name is measured without a check, and a listed file that is not
measured is ignored, as Chutes does (both are counted in the result and logged: either changes RTMR3,
which the validator checks).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.errors import VerificationError
from agent.evidence.base import EvidenceError
from agent.evidence.file_hashing import FileHashError, HashJob, default_workers, hash_files
from agent.evidence.mr_register import DIGEST_LEN, ZERO, MeasurementRegister, RegisterError, chain, extend_value
from agent.log import get_logger

log = get_logger(__name__)

SCHEMES = ("1.4", "next")
#: The console/kmsg marker of a failed measurement, per scheme (§12.2).
MARKERS = {"1.4": "RTMR3-MEASURE-FAILED:", "next": "ROOTFS-MEASURE-FAILED:"}
MARKER = MARKERS["1.4"]
MAX_LIST_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
_MAX_SYMLINK_HOPS = 40
_TRIM = {"1.4": b" ", "next": b" \t\r"}

__all__ = [
    "DIGEST_LEN",
    "MARKER",
    "MARKERS",
    "SCHEMES",
    "SNP_MISMATCH",
    "ZERO",
    "MeasuredFile",
    "RootfsMeasureError",
    "RootfsMeasurement",
    "SnpRootfsCheck",
    "chain",
    "default_workers",
    "extend_value",
    "format_manifest",
    "list_digest",
    "list_text",
    "manifest_list_text",
    "measure_rootfs",
    "parse_manifest",
    "parse_measure_conf",
    "plan",
    "predict_entries",
    "read_manifest",
    "read_measure_conf",
    "verify_rootfs_snp",
]


class RootfsMeasureError(EvidenceError, VerificationError):
    """The rootfs could not be measured or verified; ``str()`` starts with the scheme's marker."""

    reason = "rtmr3_measure_failed"

    def __init__(self, detail: str, path: bytes | None = None, *, scheme: str = "1.4") -> None:
        self.detail = detail
        self.path = path  # root-relative file name, when one file is to blame
        self.scheme = scheme
        super().__init__(detail)

    @property
    def marker(self) -> str:
        return MARKERS[self.scheme]

    @property
    def message(self) -> str:
        """The reason without the marker (what follows it on the console line)."""
        return f"{show_path(self.path)}: {self.detail}" if self.path is not None else self.detail

    def __str__(self) -> str:
        return f"{self.marker} {self.message}"


@dataclass(frozen=True)
class MeasuredFile:
    """One collected file: its root-relative name (order key, list text) and where to open it."""

    rel: bytes
    full: bytes
    size: int


@dataclass
class RootfsMeasurement:
    """Result of :func:`predict_entries` / :func:`measure_rootfs`."""

    scheme: str
    rtmr3: bytes
    files: int
    total_bytes: int
    seconds: float
    #: (root-relative path, SHA-384) in extension order (1.4: duplicates kept; next: unique).
    entries: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)
    #: Configured entries that do not exist (they contribute nothing).
    absent: list[bytes] = field(default_factory=list)
    #: Measured files the manifest does not name / named files that were not measured.
    unchecked: int = 0
    not_measured: int = 0
    #: Per configured entry, in list order: (entry, the files it reached) — what the manifest writer walks.
    by_entry: list[tuple[bytes, list[bytes]]] = field(default_factory=list, repr=False)

    def extensions(self) -> list[bytes]:
        """The digests written to RTMR3, in order: one per file (1.4), or one over the list text (next)."""
        if self.scheme == "next":
            return [hashlib.sha384(list_text(self.entries)).digest()]
        return [d for _, d in self.entries]


def show_path(rel: bytes) -> str:
    """A file name safe for one console line (control characters and invalid UTF-8 escaped)."""
    text = rel.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown measurement scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    return scheme


# -- path list ------------------------------------------------------------------------------------


def parse_measure_conf(text: bytes, origin: str = "measure conf", scheme: str = "1.4") -> list[bytes]:
    """The configured paths, in file order, spelled as written (see module doc for the rules)."""
    trim = _TRIM[_scheme(scheme)]
    paths: list[bytes] = []
    for lineno, raw in enumerate(text.split(b"\n"), 1):
        line = raw.split(b"#", 1)[0].strip(trim)
        if not line:
            continue
        paths.append(_check_entry(line, f"{origin}:{lineno}", scheme))
    if not paths:
        raise RootfsMeasureError(f"{origin}: no paths configured", scheme=scheme)
    return paths


def _check_entry(path: bytes, where: str, scheme: str) -> bytes:
    if not path.startswith(b"/") or b"\0" in path or b"\n" in path:
        raise RootfsMeasureError(f"{where}: expected an absolute path, got {show_path(path)!r}", scheme=scheme)
    if any(p in (b".", b"..") for p in path.split(b"/")):
        raise RootfsMeasureError(f"{where}: '.' and '..' are not allowed in {show_path(path)!r}", scheme=scheme)
    return path


def read_measure_conf(path: str, scheme: str = "1.4") -> list[bytes]:
    return parse_measure_conf(_read_bounded(path, MAX_LIST_BYTES, "measured-path list", scheme), path, scheme)


def _read_bounded(path: str, limit: int, what: str, scheme: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise RootfsMeasureError(f"cannot read {what} {path}: {exc.strerror}", scheme=scheme) from None
    if len(data) > limit:
        raise RootfsMeasureError(f"{what} {path} is larger than {limit} bytes", scheme=scheme)
    return data


# -- collecting the files ---------------------------------------------------------------------------


def _resolve(root: bytes, rel: bytes, *, follow_last: bool, scheme: str) -> bytes | None:
    """``root`` + ``rel`` with symlinks resolved as in ``chroot(root)``; None when a component is missing.

    With ``follow_last`` False the last component is kept as is (its own type is checked with lstat).
    """
    parts = [p for p in rel.split(b"/") if p]
    last = b"" if follow_last or not parts else parts.pop()
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
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise RootfsMeasureError(f"cannot stat: {exc.strerror}", b"/" + b"/".join([*resolved, name]),
                                     scheme=scheme) from None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise RootfsMeasureError("too many levels of symbolic links", rel, scheme=scheme)
            target = os.readlink(candidate)
            if target.startswith(b"/"):
                resolved = []
            parts = [p for p in target.split(b"/") if p] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            return None  # a file where a directory is needed: [ -d ] / [ -f ] see nothing
        resolved.append(name)
    tail = [*resolved, last] if last else resolved
    return root + b"/" + b"/".join(tail)


def _child(rel_dir: bytes, name: bytes) -> bytes:
    """How GNU find prints a child of a starting point: one ``/`` added unless it already ends with one."""
    return rel_dir + name if rel_dir.endswith(b"/") else rel_dir + b"/" + name


def _walk(full_dir: bytes, rel_dir: bytes, out: list[MeasuredFile], scheme: str) -> None:
    """Every regular file under ``full_dir`` (``find -P DIR -type f``), iteratively: depth costs no stack."""
    pending = [(full_dir, rel_dir)]
    while pending:
        full, rel = pending.pop()
        try:
            with os.scandir(full) as it:
                entries = list(it)
        except OSError as exc:
            raise RootfsMeasureError(f"cannot list directory: {exc.strerror}", rel, scheme=scheme) from None
        for entry in entries:
            child = _child(rel, entry.name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, child))
                elif entry.is_file(follow_symlinks=False):
                    _add(out, child, entry.path, entry.stat(follow_symlinks=False).st_size, scheme)
            except OSError as exc:
                raise RootfsMeasureError(f"cannot stat: {exc.strerror}", child, scheme=scheme) from None
            # symlinks, FIFOs, sockets, devices: neither followed nor measured


def _add(out: list[MeasuredFile], rel: bytes, full: bytes, size: int, scheme: str) -> None:
    if b"\n" in rel:
        raise RootfsMeasureError("file name contains a newline (no list or manifest line can name it)", rel,
                                 scheme=scheme)
    out.append(MeasuredFile(rel, full, size))


def _collect_entry(root: bytes, entry: bytes, scheme: str) -> list[MeasuredFile] | None:
    """The files one configured entry reaches; None when it does not exist."""
    full = _resolve(root, entry, follow_last=False, scheme=scheme)
    if full is None:
        return None
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise RootfsMeasureError(f"cannot stat: {exc.strerror}", entry, scheme=scheme) from None
    found: list[MeasuredFile] = []
    if stat.S_ISLNK(st.st_mode):
        if scheme == "next":
            raise RootfsMeasureError("configured measured path is a symlink (next: an error, §12.1)", entry,
                                     scheme=scheme)
        target = _resolve(root, entry, follow_last=True, scheme=scheme)
        if target is None:
            return None  # dangling: [ -d ] and [ -f ] are both false
        try:
            tst = os.stat(target)
        except OSError:
            return None
        if stat.S_ISREG(tst.st_mode):
            _add(found, entry, target, tst.st_size, scheme)
        elif stat.S_ISDIR(tst.st_mode) and entry.endswith(b"/"):
            _walk(target, entry, found, scheme)
        return found  # a symlinked directory without a trailing "/": find -P prints nothing
    if stat.S_ISDIR(st.st_mode):
        _walk(full, entry, found, scheme)
    elif stat.S_ISREG(st.st_mode):
        if not entry.endswith(b"/"):
            _add(found, entry, full, st.st_size, scheme)
    else:
        raise RootfsMeasureError("configured measured path is neither a regular file nor a directory", entry,
                                 scheme=scheme)
    return found


def plan(root: str | bytes, paths: Iterable[str | bytes], scheme: str = "1.4",
         ) -> tuple[list[MeasuredFile], list[tuple[bytes, list[MeasuredFile]]], list[bytes]]:
    """(files in extension order, per-entry files in list order, absent entries) for ``root``."""
    _scheme(scheme)
    root_b = os.fsencode(root).rstrip(b"/")
    if not os.path.isdir(root_b or b"/"):
        raise RootfsMeasureError(f"root {show_path(root_b or b'/')} is not a directory", scheme=scheme)
    by_entry: list[tuple[bytes, list[MeasuredFile]]] = []
    absent: list[bytes] = []
    for raw in paths:
        entry = _check_entry(os.fsencode(raw), "measured path", scheme)
        files = _collect_entry(root_b, entry, scheme)
        if files is None:
            absent.append(entry)
            continue
        by_entry.append((entry, files))
    collected = [f for _, files in by_entry for f in files]
    if scheme == "next":
        unique: dict[bytes, MeasuredFile] = {}
        for f in collected:
            unique.setdefault(f.rel, f)
        ordered = [unique[k] for k in sorted(unique)]
    else:
        ordered = sorted(collected, key=lambda f: f.rel)  # stable; duplicates kept (§12.2)
    return ordered, by_entry, absent


# -- list text and manifest -----------------------------------------------------------------------


def list_text(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``<sha384 hex> <path>\\n`` per file: the text next's RTMR3 extension hashes (§12.2)."""
    return b"".join(d.hex().encode() + b" " + rel + b"\n" for rel, d in entries)


def parse_manifest(text: bytes, origin: str = "manifest", scheme: str = "1.4") -> dict[bytes, bytes]:
    """Root-relative path -> expected SHA-384, from Chutes' path-first lines (§12.3)."""
    expected: dict[bytes, bytes] = {}
    for lineno, raw in enumerate(text.split(b"\n"), 1):
        where = f"{origin}:{lineno}"
        line = raw.strip(b" \t\r")  # `read -r line` trims IFS whitespace
        if not line or line.startswith(b"#"):
            continue
        name, sep, hexpart = line[:-96], line[-97:-96], line[-96:]
        try:
            digest = bytes.fromhex(hexpart.decode("ascii")) if len(hexpart) == 96 else b""
        except (UnicodeDecodeError, ValueError):
            digest = b""
        if len(digest) != DIGEST_LEN or sep not in (b" ", b"\t"):
            raise RootfsMeasureError(f"{where}: expected '<absolute path> <96 hex digits>'", scheme=scheme)
        name = name.rstrip(b" \t")
        if not name.startswith(b"/"):
            raise RootfsMeasureError(f"{where}: expected an absolute path before the hash", scheme=scheme)
        if expected.get(name, digest) != digest:
            raise RootfsMeasureError(f"{where}: listed twice with different hashes", name, scheme=scheme)
        expected[name] = digest
    if not expected:
        raise RootfsMeasureError(f"{origin}: no entries", scheme=scheme)
    return expected


def read_manifest(path: str, scheme: str = "1.4") -> dict[bytes, bytes]:
    return parse_manifest(_read_bounded(path, MAX_MANIFEST_BYTES, "manifest", scheme), path, scheme)


def format_manifest(result: RootfsMeasurement) -> bytes:
    """The manifest Chutes' generator writes for this tree: path first, one line per file.

    1.4 walks the list line by line (a file reached twice is listed twice); next lists each file once,
    in list order.
    """
    if result.scheme == "next":
        rows = result.entries
    else:
        digest = dict(result.entries)
        rows = [(rel, digest[rel]) for _, rels in result.by_entry for rel in rels]
    return b"".join(rel + b" " + d.hex().encode() + b"\n" for rel, d in rows)


# -- predict / measure ------------------------------------------------------------------------------


def predict_entries(
    root: str | bytes, paths: Iterable[str | bytes], *, scheme: str = "1.4",
    manifest: dict[bytes, bytes] | None = None, workers: int | None = None,
) -> RootfsMeasurement:
    """The final RTMR3 from zero for ``root`` without a TD, with every file's digest in order.

    With ``manifest``, every file it names is compared first; the first mismatch (in order) fails.
    """
    started = time.monotonic()
    files, by_entry, absent = plan(root, paths, scheme)
    if not files:
        log.warning("rootfs.nothing_measured", scheme=scheme, absent=len(absent))
    unique: dict[bytes, int] = {}
    jobs: list[HashJob] = []
    for f in files:
        if f.full not in unique:
            unique[f.full] = len(jobs)
            jobs.append(HashJob(f.full, f.size))
    try:
        hashed = hash_files(jobs, workers)
    except FileHashError as exc:
        rel = next(f.rel for f in files if unique[f.full] == exc.index)
        raise RootfsMeasureError(exc.detail, rel, scheme=scheme) from None
    entries = [(f.rel, hashed[unique[f.full]][0]) for f in files]
    unchecked = 0
    if manifest is not None:
        for rel, digest in entries:
            want = manifest.get(rel)
            if want is None:
                unchecked += 1
            elif want != digest:
                raise RootfsMeasureError(
                    f"SHA-384 {digest.hex()[:16]}… does not match the manifest's {want.hex()[:16]}…", rel,
                    scheme=scheme)
    measured = {rel for rel, _ in entries}
    not_measured = sum(1 for rel in manifest if rel not in measured) if manifest is not None else 0
    result = RootfsMeasurement(
        scheme, ZERO, len(entries), sum(n for _, n in hashed), 0.0, entries, absent, unchecked, not_measured,
        [(entry, [f.rel for f in fs]) for entry, fs in by_entry])
    result.rtmr3 = chain(result.extensions())
    result.seconds = time.monotonic() - started
    return result


def predict(root: str | bytes, paths: Iterable[str | bytes], scheme: str = "1.4") -> bytes:
    """The final RTMR3 value (48 bytes) the boot would produce for ``root``."""
    return predict_entries(root, paths, scheme=scheme).rtmr3


def extend_register(register: MeasurementRegister, digests: Sequence[bytes], expected: bytes,
                    scheme: str = "1.4") -> None:
    """Extend ``register`` with ``digests`` in order, then read it back once and compare to ``expected``.

    One read-back at the end, not per file: on hardware every read re-runs TDG.MR.REPORT, and any
    deviation along the way changes the final value.
    """
    try:
        register.extend(digests)
        after = register.read()
    except RegisterError as exc:
        raise RootfsMeasureError(str(exc), scheme=scheme) from None
    if after != expected:
        raise RootfsMeasureError(
            f"{register.path} reads {after.hex()[:16]}… after the measurement, expected {expected.hex()[:16]}…",
            scheme=scheme)


def measure_rootfs(
    root: str, measure_conf: str, manifest: str, register: MeasurementRegister, *, scheme: str = "1.4",
    workers: int | None = None,
) -> RootfsMeasurement:
    """Boot step: check the named files against the manifest, then extend RTMR3 as the scheme says.

    Synchronous (run it in a thread from async code). Raises :class:`RootfsMeasureError` on any
    failure; the register is untouched unless every named file matched.
    """
    started = time.monotonic()
    paths = read_measure_conf(measure_conf, scheme)
    expected = read_manifest(manifest, scheme)
    try:
        before = register.read()
    except RegisterError as exc:
        raise RootfsMeasureError(str(exc), scheme=scheme) from None
    if before != ZERO:
        raise RootfsMeasureError(f"{register.path} is already extended ({before.hex()[:16]}…); "
                                 "the measurement starts from zero", scheme=scheme)
    result = predict_entries(root, paths, scheme=scheme, manifest=expected, workers=workers)
    hashed_s = time.monotonic() - started
    extensions = result.extensions()
    extend_register(register, extensions, result.rtmr3, scheme)
    result.seconds = time.monotonic() - started
    log.info("rootfs.measured", scheme=scheme, files=result.files, bytes=result.total_bytes,
             extensions=len(extensions), absent=[show_path(p) for p in result.absent][:20],
             unchecked=result.unchecked, listed_not_measured=result.not_measured, rtmr3=result.rtmr3.hex(),
             hash_ms=round(hashed_s * 1000, 1), total_ms=round(result.seconds * 1000, 1))
    return result


# -- SEV-SNP: no RTMR3, the list digest is compared with the manifest's (sev-snp.md §5.2) ---------------

#: What Chutes' rootfs-measure prints on SNP when the digests differ (after ``ROOTFS-MEASURE-FAILED:``).
SNP_MISMATCH = "SEV-SNP: root filesystem does not match the canonical manifest"


@dataclass
class SnpRootfsCheck:
    """Result of :func:`verify_rootfs_snp`: the measurement and the two SHA-384 values (equal on success)."""

    result: RootfsMeasurement
    digest: bytes
    manifest_digest: bytes
    manifest_files: int


def list_digest(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """SHA-384 of the list text (§12.2): next's single RTMR3 extension on TDX, the whole root check on SNP."""
    return hashlib.sha384(list_text(entries)).digest()


def manifest_list_text(manifest: dict[bytes, bytes]) -> bytes:
    """The list text rebuilt from a path-first manifest (fields swapped back), in the list's byte-wise path order."""
    return list_text(sorted(manifest.items()))


def _snp_difference(entries: list[tuple[bytes, bytes]], manifest: dict[bytes, bytes]) -> str:
    """Why two list digests differ, for the console line: counts and the first file of each kind."""
    measured = dict(entries)
    changed = [rel for rel, d in entries if rel in manifest and manifest[rel] != d]
    extra = [rel for rel, _ in entries if rel not in manifest]
    missing = sorted(rel for rel in manifest if rel not in measured)
    parts = []
    for what, rels in (("changed", changed), ("not in the manifest", extra), ("listed but absent", missing)):
        if rels:
            parts.append(f"{len(rels)} {what}, first {show_path(rels[0])}")
    return "; ".join(parts) or "same files and hashes, different list text"


def verify_rootfs_snp(root: str, measure_conf: str, manifest: str, *, workers: int | None = None) -> SnpRootfsCheck:
    """Boot step on SEV-SNP: the root's list digest must equal the one rebuilt from the baked manifest.

    The "next" rules (§12.1/§12.2: ``sort -u``, list text ``<sha384> <path>``) on both sides, as Chutes'
    ``rootfs-measure`` does on SNP. Any difference — a changed file, a measured file the manifest does not
    name, a named file that is gone — fails closed with :data:`SNP_MISMATCH` and the first file to blame.
    A missing or malformed list or manifest fails too. Nothing is extended (there is no RTMR3).
    """
    scheme = "next"
    paths = read_measure_conf(measure_conf, scheme)
    expected = read_manifest(manifest, scheme)
    result = predict_entries(root, paths, scheme=scheme, workers=workers)
    digest = list_digest(result.entries)
    want = hashlib.sha384(manifest_list_text(expected)).digest()
    measured = {rel for rel, _ in result.entries}
    result.unchecked = sum(1 for rel in measured if rel not in expected)
    result.not_measured = sum(1 for rel in expected if rel not in measured)
    if digest != want:
        raise RootfsMeasureError(
            f"{SNP_MISMATCH} (list digest {digest.hex()[:16]}…, manifest {want.hex()[:16]}…: "
            f"{_snp_difference(result.entries, expected)})", scheme=scheme)
    log.info("rootfs.snp_verified", files=result.files, bytes=result.total_bytes, digest=digest.hex(),
             absent=[show_path(p) for p in result.absent][:20], total_ms=round(result.seconds * 1000, 1))
    return SnpRootfsCheck(result, digest, want, len(expected))
