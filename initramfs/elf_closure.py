"""Shared-library closure of ELF files, resolved the way ld.so does, read with pyelftools.

Why not ``ldd``: ldd runs the binary's loader (it executes code from the file), cannot be pointed at a
foreign root, and says nothing about *why* a library was chosen. Here each ``DT_NEEDED`` entry is
looked up in the order of ld.so(8): ``DT_RPATH`` (only when the object has no ``DT_RUNPATH``, and
inherited from the loading chain), then ``DT_RUNPATH`` of the object itself, then the system library
directories (``/etc/ld.so.conf`` plus the built-in defaults). ``$ORIGIN``, ``$LIB`` and ``$PLATFORM``
are expanded. Candidates must be ELF files of the same class and machine as the requester.

Command line (used by the initramfs hook)::

    python elf_closure.py [--root DIR] FILE_OR_DIR...     # prints one resolved library path per line
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

DEFAULT_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
ELF_MAGIC = b"\x7fELF"


class ClosureError(RuntimeError):
    """A needed library could not be found (the file would fail to load at run time)."""


@dataclass(frozen=True)
class ElfInfo:
    """What the loader reads from one ELF file."""

    path: Path
    elfclass: int
    machine: str
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    interp: str | None


@dataclass
class Closure:
    """Result: every library needed, where it came from, and the interpreters named."""

    libraries: dict[Path, str] = field(default_factory=dict)  # resolved path -> requested soname
    interpreters: set[Path] = field(default_factory=set)
    missing: list[tuple[Path, str]] = field(default_factory=list)  # (requester, soname)


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def read_elf(path: Path) -> ElfInfo:
    """Parse the dynamic section and PT_INTERP of one ELF file."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        interp = None
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()
        for sec in elf.iter_sections():
            if not isinstance(sec, DynamicSection):
                continue
            for tag in sec.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    needed.append(tag.needed)
                elif tag.entry.d_tag == "DT_RPATH":
                    rpath.extend(p for p in tag.rpath.split(":") if p)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    runpath.extend(p for p in tag.runpath.split(":") if p)
        return ElfInfo(path, elf.elfclass, elf["e_machine"], tuple(needed), tuple(rpath), tuple(runpath), interp)


def _expand(entry: str, origin: Path) -> str:
    for token in ("$ORIGIN", "${ORIGIN}"):
        entry = entry.replace(token, str(origin))
    for token in ("$LIB", "${LIB}"):
        entry = entry.replace(token, "lib/x86_64-linux-gnu")
    for token in ("$PLATFORM", "${PLATFORM}"):
        entry = entry.replace(token, "x86_64")
    return entry


def system_dirs(root: Path = Path("/")) -> list[str]:
    """Directories from /etc/ld.so.conf (with includes) followed by the built-in defaults."""
    dirs: list[str] = []

    def parse(conf: Path, depth: int = 0) -> None:
        if depth > 8 or not conf.is_file():
            return
        for raw in conf.read_text(errors="replace").splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include "):
                pattern = line.split(None, 1)[1]
                if not pattern.startswith("/"):
                    pattern = str(conf.parent / pattern)
                for inc in sorted(glob.glob(str(root) + pattern if str(root) != "/" else pattern)):
                    parse(Path(inc), depth + 1)
            elif line.startswith("/") and line not in dirs:
                dirs.append(line)

    parse(root / "etc/ld.so.conf")
    return dirs + [d for d in DEFAULT_DIRS if d not in dirs]


class Resolver:
    """Resolves DT_NEEDED names like ld.so, caching parsed files."""

    def __init__(self, root: Path = Path("/"), extra_dirs: Iterable[str] = ()) -> None:
        self.root = root
        self.dirs = [*extra_dirs, *system_dirs(root)]
        self._cache: dict[Path, ElfInfo] = {}

    def info(self, path: Path) -> ElfInfo:
        if path not in self._cache:
            self._cache[path] = read_elf(path)
        return self._cache[path]

    def _host(self, p: str) -> Path:
        return Path(p) if str(self.root) == "/" else self.root / p.lstrip("/")

    def _compatible(self, candidate: Path, requester: ElfInfo) -> bool:
        if not candidate.is_file() or not is_elf(candidate):
            return False
        try:
            other = self.info(candidate)
        except (ELFError, OSError):
            return False
        return other.elfclass == requester.elfclass and other.machine == requester.machine

    def find(self, soname: str, requester: ElfInfo, inherited_rpath: tuple[str, ...]) -> Path | None:
        """One DT_NEEDED entry -> the file ld.so would load, or None."""
        if "/" in soname:
            cand = self._host(soname)
            return cand if self._compatible(cand, requester) else None
        origin = requester.path.parent
        search: list[str] = []
        if not requester.runpath:
            search += [_expand(p, origin) for p in requester.rpath]
            search += list(inherited_rpath)
        search += [_expand(p, origin) for p in requester.runpath]
        search += self.dirs
        for d in search:
            cand = self._host(d) / soname if d.startswith("/") else Path(d) / soname
            if self._compatible(cand, requester):
                return cand
        return None

    def closure(self, files: Iterable[Path]) -> Closure:
        """Breadth-first closure over DT_NEEDED for every given ELF file."""
        result = Closure()
        seen: set[Path] = set()
        todo: list[tuple[Path, tuple[str, ...]]] = [(Path(f), ()) for f in files]
        while todo:
            path, inherited = todo.pop(0)
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            info = self.info(path)
            if info.interp:
                result.interpreters.add(self._host(info.interp))
            # DT_RPATH of an object applies to its own dependencies and theirs (ld.so(8)).
            chain = inherited + (() if info.runpath else tuple(_expand(p, path.parent) for p in info.rpath))
            for soname in info.needed:
                found = self.find(soname, info, inherited)
                if found is None:
                    result.missing.append((path, soname))
                    continue
                result.libraries.setdefault(found, soname)
                todo.append((found, chain))
        return result


def iter_elf_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every ELF regular file among the arguments (directories walked, symlinks skipped)."""
    for p in paths:
        if p.is_dir():
            for dirpath, _dirs, names in os.walk(p):
                for n in sorted(names):
                    f = Path(dirpath) / n
                    if not f.is_symlink() and f.is_file() and is_elf(f):
                        yield f
        elif p.is_file() and is_elf(p):
            yield p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("paths", nargs="+", type=Path, help="ELF files or directories to walk")
    ap.add_argument("--root", type=Path, default=Path("/"), help="resolve system paths under this root")
    ap.add_argument(
        "--exclude-under",
        action="append",
        default=[],
        type=Path,
        help="do not print libraries below this directory (they are copied with their tree)",
    )
    ap.add_argument("--interp", action="store_true", help="also print the ELF interpreters (ld.so)")
    args = ap.parse_args(argv)
    res = Resolver(args.root).closure(iter_elf_files(args.paths))
    if res.missing:
        for req, soname in res.missing:
            print(f"elf_closure: {req}: needed library {soname} not found", file=sys.stderr)
        return 1
    out = sorted(res.libraries) + (sorted(res.interpreters) if args.interp else [])
    excl = [e.resolve() for e in args.exclude_under]
    for lib in out:
        if any(lib.resolve().is_relative_to(e) for e in excl):
            continue
        print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
