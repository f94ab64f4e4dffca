"""Stage a trimmed Python runtime + the agent into an initramfs tree (called by hooks/chutes-attest).

Layout inside the image (PREFIX defaults to /usr/lib/chutes-attest)::

    PREFIX/bin/python3.X          the interpreter (pyenv's or Debian's; its real file, not a venv link)
    PREFIX/lib/python3.X/         the stdlib, trimmed; lib-dynload/ trimmed too
    PREFIX/site/                  agent (+ C extension) and its runtime dependencies only
    PREFIX/launcher.py            puts PREFIX/site on sys.path, runs agent.cli.main
    /usr/bin/chutes-attest        sh wrapper: python -I -S launcher.py "$@"

The interpreter finds its prefix from its own location (landmark ``lib/python3.X/os.py``), so no
PYTHONHOME is needed; ``-I -S`` keeps the environment and any site-packages out. Every ``.py`` is
byte-compiled with the *target* interpreter in ``unchecked-hash`` mode, because mkinitramfs may clamp
mtimes (SOURCE_DATE_EPOCH) and a pyc that is re-validated would be rebuilt in RAM at every boot.

Reproducible: the same inputs give the same bytes whatever the staging directory, the working directory
or the clock. Bytecode records the in-image path (``compileall -d``), never DESTDIR; it is compiled with
``PYTHONHASHSEED=0`` (set and frozenset constants are marshalled in hash order); every staged file and
directory gets the mtime ``$SOURCE_DATE_EPOCH`` (0 when unset); directories are walked in sorted order.

Shared libraries are not copied here: their paths (the pyelftools closure of every ELF file staged)
are printed on stdout, one per line, for the hook to hand to initramfs-tools' ``copy_file``, which
knows the image's usr-merge layout.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elf_closure import Resolver, iter_elf_files

#: stdlib top-level entries never needed by the agent.
STDLIB_EXCLUDE = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "pydoc.py",
    "distutils",
    "venv",
    "site-packages",
    "dist-packages",
    "sqlite3",
    "curses",
    "dbm",
    "msilib",
    "__phello__",
    "unittest",
    "xmlrpc",
    "wsgiref",
    "tabnanny.py",
    "doctest.py",
    "mailbox.py",
    "imaplib.py",
    "nntplib.py",
    "poplib.py",
    "smtplib.py",
    "ftplib.py",
    "telnetlib.py",
    "cgi.py",
    "cgitb.py",
    "pdb.py",
    "profile.py",
    "cProfile.py",
    "trace.py",
    "tracemalloc.py",
    "this.py",
    "antigravity.py",
    "sndhdr.py",
    "imghdr.py",
    "aifc.py",
    "sunau.py",
    "wave.py",
    "chunk.py",
    "audioop",
    "lib-dynload",
}
STDLIB_EXCLUDE_PREFIX = ("config-",)  # config-3.11-x86_64-linux-gnu (static lib, Makefile)
#: lib-dynload modules (by name before the first dot) not needed.
DYNLOAD_EXCLUDE = {
    "_tkinter",
    "_curses",
    "_curses_panel",
    "readline",
    "_sqlite3",
    "_dbm",
    "_gdbm",
    "nis",
    "_crypt",
    "_testcapi",
    "_testbuffer",
    "_testimportmultiple",
    "_testmultiphase",
    "_testinternalcapi",
    "_testclinic",
    "_xxtestfuzz",
    "_ctypes_test",
    "xxlimited",
    "xxlimited_35",
    "xxsubtype",
    "audioop",
    "_lsprof",
    "ossaudiodev",
    "spwd",
    "_codecs_jp",
    "_codecs_kr",
    "_codecs_tw",
    "_codecs_hk",
    "_codecs_cn",
    "_codecs_iso2022",
    "_multibytecodec",
    "_xxsubinterpreters",
    "_uuid",
}
#: runtime requirements of the agent that the boot path never imports (GPU and ELF tooling).
DIST_EXCLUDE = {"nvidia-ml-py", "pyelftools", "packaging"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".c", ".h", ".pyx", ".pxd", ".pyi", ".cpp", ".md", ".rst")
#: RECORD entries in a dist we never want (tests inside packages, build helpers).
SKIP_PARTS = {"__pycache__", "tests", "test", "testing"}

LAUNCHER = """\
import sys
sys.path.insert(0, {site!r})
from agent.cli import main
sys.exit(main())
"""
WRAPPER = """\
#!/bin/sh
# chutes-attest inside the initramfs: isolated interpreter, agent + deps only.
exec {python} -I -S {launcher} "$@"
"""


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def target_info(python: str) -> dict[str, str]:
    """Ask the target interpreter where its stdlib lives (pyenv and Debian differ)."""
    code = (
        "import sys, sysconfig, json, os, _ssl;"
        "print(json.dumps({'stdlib': sysconfig.get_paths()['stdlib'],"
        "'dynload': os.path.dirname(_ssl.__file__),"
        "'ver': '%d.%d' % sys.version_info[:2], 'exe': os.path.realpath(sys.executable)}))"
    )
    out = subprocess.run([python, "-I", "-S", "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def copy_tree(src: Path, dst: Path, skip) -> None:
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        dirs[:] = sorted(d for d in dirs if not skip(rel / d, True))
        for f in sorted(files):
            if skip(rel / f, False):
                continue
            out = dst / rel / f
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(dirpath) / f, out, follow_symlinks=True)


def stage_stdlib(info: dict[str, str], lib: Path) -> None:
    stdlib = Path(info["stdlib"])

    def skip(rel: Path, is_dir: bool) -> bool:
        top = rel.parts[0]
        if len(rel.parts) == 1 and (top in STDLIB_EXCLUDE or top.startswith(STDLIB_EXCLUDE_PREFIX)):
            return True
        if "__pycache__" in rel.parts or rel.name in ("test", "tests", "idle_test"):
            return True
        return not is_dir and rel.name.endswith((".pyc", ".exe", ".a", ".whl"))

    copy_tree(stdlib, lib, skip)
    dyn_dst = lib / "lib-dynload"
    dyn_dst.mkdir(parents=True, exist_ok=True)
    for so in sorted(Path(info["dynload"]).glob("*.so")):
        if so.name.split(".", 1)[0] not in DYNLOAD_EXCLUDE:
            shutil.copy2(so, dyn_dst / so.name)


def runtime_dists(site: Path, root_dist: str) -> list[md.Distribution]:
    """The root distribution's requirements (no extras), transitively, minus DIST_EXCLUDE."""
    from packaging.requirements import Requirement

    dists = {norm(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    out: dict[str, md.Distribution] = {}
    todo = [norm(root_dist)]
    while todo:
        name = todo.pop()
        if name in out or name in DIST_EXCLUDE:
            continue
        if name not in dists:
            raise SystemExit(f"stage_runtime: distribution {name!r} not installed in {site}")
        out[name] = dists[name]
        for req_text in dists[name].requires or []:
            req = Requirement(req_text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(norm(req.name))
    out.pop(norm(root_dist))
    return list(out.values())


def stage_dist(dist: md.Distribution, site: Path, dst: Path) -> None:
    for f in dist.files or []:
        rel = Path(str(f))
        if rel.parts[0] == ".." or SKIP_PARTS.intersection(rel.parts[:-1]) or rel.name.endswith(SKIP_SUFFIXES):
            continue
        if rel.parts[0].endswith(".dist-info") and rel.name not in ("METADATA",):
            continue
        src = site / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def stage_agent(agent_dir: Path, dst: Path, with_sim: bool) -> None:
    def skip(rel: Path, is_dir: bool) -> bool:
        if "__pycache__" in rel.parts or (not with_sim and rel.parts[0] == "sim"):
            return True
        return not is_dir and not rel.name.endswith((".py", ".so", ".pem", ".typed", ".json"))

    copy_tree(agent_dir, dst / "agent", skip)


def compile_all(python: str, dirs: dict[Path, str], keep_sources: bool) -> None:
    """Byte-compile with the target interpreter, each staged dir recorded under its in-image path.
    Without sources: legacy ``foo.pyc`` next to where ``foo.py`` was (importable sourceless), the ``.py``
    removed; tracebacks keep file and line numbers."""
    legacy = [] if keep_sources else ["-b"]
    # not -I/-E: those would ignore PYTHONHASHSEED; -S -s and a scrubbed environment keep sites out instead
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C"}
    for staged, in_image in dirs.items():
        subprocess.run(
            [python, "-S", "-s", "-m", "compileall", "-q", "-j", "1", *legacy,
             "--invalidation-mode", "unchecked-hash", "-d", in_image, str(staged)],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
    if not keep_sources:
        for d in dirs:
            for py in sorted(d.rglob("*.py")):
                if py.with_suffix(".pyc").exists():
                    py.unlink()


def source_date_epoch() -> int:
    """``$SOURCE_DATE_EPOCH`` (reproducible-builds.org), 0 when unset."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    if not raw.isdigit():
        raise SystemExit(f"stage_runtime: SOURCE_DATE_EPOCH={raw!r} is not a number of seconds")
    return int(raw)


def fix_mtimes(paths: list[Path], epoch: int) -> None:
    """Every file and directory below ``paths`` (and the paths themselves) gets mtime ``epoch``."""
    for top in paths:
        for dirpath, _dirs, names in os.walk(top):
            for n in names:
                os.utime(Path(dirpath) / n, (epoch, epoch), follow_symlinks=False)
            os.utime(dirpath, (epoch, epoch))


def strip_elves(root: Path) -> None:
    """Drop debug info from the staged copies (pyenv builds keep it; it is most of lib-dynload)."""
    strip = shutil.which("strip")
    files = [str(f) for f in iter_elf_files([root])]
    if strip and files:
        subprocess.run([strip, "--strip-unneeded", *files], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="stage the agent runtime into DESTDIR")
    ap.add_argument("--dest", required=True, type=Path, help="initramfs staging root (DESTDIR)")
    ap.add_argument("--python", default="", help="interpreter to copy (default: this venv's base python)")
    ap.add_argument("--site", type=Path, help="site-packages with the runtime deps (default: this one)")
    ap.add_argument("--agent-dir", type=Path, help="the agent package directory (default: import agent)")
    ap.add_argument("--prefix", default="/usr/lib/chutes-attest")
    ap.add_argument("--with-sim", action="store_true", help="include agent/sim (tests and demos only)")
    ap.add_argument("--keep-sources", action="store_true", help="ship .py sources next to the bytecode")
    ap.add_argument("--no-strip", action="store_true", help="keep debug symbols in staged ELF files")
    ap.add_argument("--extra-elf", action="append", default=[], help="more ELF files whose libs to list")
    args = ap.parse_args(argv)

    python = args.python or os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    info = target_info(python)
    if args.agent_dir is None:
        import agent

        args.agent_dir = Path(agent.__file__).resolve().parent
    site_src = args.site or Path(md.distribution("chutes-attest-agent").locate_file(""))
    root = args.dest / args.prefix.lstrip("/")
    if root.exists():
        shutil.rmtree(root)
    bindir, lib, site = root / "bin", root / "lib" / f"python{info['ver']}", root / "site"
    bindir.mkdir(parents=True)
    py_dst = bindir / f"python{info['ver']}"
    shutil.copy2(info["exe"], py_dst)
    stage_stdlib(info, lib)
    site.mkdir()
    for dist in runtime_dists(site_src, "chutes-attest-agent"):
        stage_dist(dist, site_src, site)
    stage_agent(args.agent_dir, site, args.with_sim)
    in_image = f"{args.prefix}/lib/python{info['ver']}"
    compile_all(python, {lib: in_image, site: f"{args.prefix}/site"}, args.keep_sources)
    if not args.no_strip:
        strip_elves(root)
    (root / "launcher.py").write_text(LAUNCHER.format(site=f"{args.prefix}/site"))
    wrapper = args.dest / "usr/bin/chutes-attest"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(WRAPPER.format(python=f"{args.prefix}/bin/{py_dst.name}", launcher=f"{args.prefix}/launcher.py"))
    wrapper.chmod(0o755)
    fix_mtimes([root, wrapper], source_date_epoch())

    res = Resolver().closure([*iter_elf_files([root]), *map(Path, args.extra_elf)])
    if res.missing:
        for req, soname in res.missing:
            print(f"stage_runtime: {req}: needed library {soname} not found", file=sys.stderr)
        return 1
    for p in sorted(res.libraries) + sorted(res.interpreters):
        if not p.resolve().is_relative_to(root.resolve()):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
