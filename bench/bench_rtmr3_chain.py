"""RTMR3 rootfs measurement on a full-image-shaped tree vs Chutes' own walker pipeline, same run.

Run from the repository root (as root for the FUSE part)::

    python bench/bench_rtmr3_chain.py [--files 41000] [--size-mib 2560] [--rounds 3] [--seed 1]

**The tree.** Chutes reports ~41,000 measured files on a full image (chutes-vm-generations.md §12.2:
``/usr/lib``, ``/usr/bin``, ``/opt/sek8s/venv`` …). The bench builds, once per run, seeded, in a temp dir,
a tree of that shape: ``--files`` files under ``/usr/lib`` (x86_64-linux-gnu, python3 dist-packages),
``/usr/bin``, ``/opt/venv`` (a Python venv) and ``/etc``, sized like a Debian ``/usr/lib`` plus a venv:
16% tiny (64 B–1 KiB: ``__init__.py``, configs), most 1–50 KiB (``.py``/``.pyc``/small libraries),
9% 50–512 KiB, 0.3% shared objects of 1–16 MiB, and ``--large`` big ones (libLLVM / libtorch-like)
sharing what is left of ``--size-mib`` (sizes log-uniform within a class; contents are slices of one
seeded random pool). The measured list overlaps on purpose (one venv package is listed again), so
1.4 extends those files twice and next de-duplicates. The tree is deleted at the end of the run.

**What is timed,** alternating within each of ``--rounds`` rounds (drift in machine load hits both
sides alike), page cache warm for both (the whole tree is read by both sides once, untimed, while
checking that they agree: same digests in the same order for 1.4, same RTMR3 for next):

* total, per scheme: Chutes' pipeline ``find <paths> -type f -print0 | LC_ALL=C sort -z [-u] |
  xargs -0 sha384sum -z`` (NUL-safe; ``sort -zu`` for next) vs ``predict_entries(root, paths,
  scheme=…)`` (walk + plan + hashing + the chain / list text: strictly more work than the pipeline);
* the walk alone: ``find | sort -z`` vs :func:`rootfs_measure.plan`;
* the hashing alone: ``xargs -0 sha384sum -z`` over the unique file list vs
  :func:`file_hashing.hash_files` over the same files.

Each pair prints the best time of each side, the best-vs-best ratio and the **median of the per-round
ratios** (baseline time / ours: robust when other jobs share the CPUs). Target: hashing ≥ 1.8× the
pipeline's ``sha384sum`` on 2 cores.

**Scaling:** ``hash_files`` with ``workers`` = 1 (in-process: the calling thread plus a pool for large
files), 2 and the CPU count, and one helper process alone (strictly one core: the per-core rate), with
wall and CPU seconds; from the one-core rate it extrapolates more cores (labelled as such: bounded
below by the largest file, which one core must hash alone).

**Register writes** (as root, with /dev/fuse): the 1.4 scheme's one extension per file (~41k 48-byte
``pwrite`` calls through ``MeasurementRegister(path).extend(digests)``) and next's single extension,
against the FUSE tsm-mr emulator (agent/sim/tsm_mr_emulator.py, mounted as tests/evidence/conftest.py
does), checked against the predicted RTMR3. The emulator is a Python FUSE server, so this is an upper
bound on the agent's side of the cost, not the TDX module's.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.evidence import file_hashing as fh  # noqa: E402
from agent.evidence import rootfs_measure as rm  # noqa: E402
from agent.evidence.mr_register import ZERO, MeasurementRegister, chain  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
#: (name, share of the file count, min size, max size); "small" takes the rest of the count.
CLASSES = (("tiny", 0.16, 64, KIB), ("medium", 0.09, 50 * KIB, 512 * KIB), ("lib", 0.003, MIB, 16 * MIB))
SMALL = (KIB, 50 * KIB)
PATHS = ["/etc", "/opt/venv", "/usr/bin", "/usr/lib", "/opt/venv/lib/python3.11/site-packages/pkg000"]
EXT = {"tiny": ".py", "small": ".pyc", "medium": ".so", "lib": ".so", "large": ".so"}


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def plan_sizes(rng: random.Random, nfiles: int, total: int, nlarge: int) -> list[tuple[str, int]]:
    """(class, size) per file: the class counts, then the large files share what is left of ``total``."""
    sizes: list[tuple[str, int]] = []
    for name, share, lo, hi in CLASSES:
        sizes += [(name, log_uniform(rng, lo, hi)) for _ in range(int(nfiles * share))]
    nsmall = max(0, nfiles - len(sizes) - nlarge)
    sizes += [("small", log_uniform(rng, *SMALL)) for _ in range(nsmall)]
    rest = max(nlarge * 16 * MIB, total - sum(s for _, s in sizes))
    weights = [rng.uniform(0.5, 1.5) for _ in range(nlarge)]
    sizes += [("large", int(rest * w / sum(weights))) for w in weights]
    rng.shuffle(sizes)
    return sizes


def build_tree(root: Path, nfiles: int, total: int, nlarge: int, seed: int) -> dict[str, tuple[int, int]]:
    """A seeded tree under root; returns {class: (files, bytes)}."""
    rng = random.Random(seed)
    pool = rng.randbytes(64 * MIB + 1)  # contents = slices of one seeded pool at seeded offsets
    tops = [("usr/lib/x86_64-linux-gnu", 0.25), ("usr/lib/python3/dist-packages", 0.25), ("usr/bin", 0.03),
            ("opt/venv/lib/python3.11/site-packages", 0.44), ("etc", 0.03)]
    dirs: list[Path] = []
    for top, share in tops:  # ~12 files per directory, two levels, like package trees
        for p in range(max(1, int(nfiles * share / 12 / 4))):
            for sub in ("", "core", "utils", "tests")[: 1 + rng.randrange(4)]:
                dirs.append(root / top / f"pkg{p:03d}" / sub)
    stats: dict[str, tuple[int, int]] = {}
    for n, (cls, size) in enumerate(plan_sizes(rng, nfiles, total, nlarge)):
        d = rng.choice(dirs)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"module_{n:06d}{EXT[cls]}", "wb") as f:
            left = size
            while left:
                take = min(left, 64 * MIB)
                off = rng.randrange(len(pool) - take)
                f.write(pool[off : off + take])
                left -= take
        c, b = stats.get(cls, (0, 0))
        stats[cls] = (c + 1, b + size)
    return stats


def pipeline(root: Path, *, unique: bool, hash_: bool = True) -> bytes:
    """Chutes' walker: find | LC_ALL=C sort -z [-u] [| xargs -0 sha384sum -z]; its stdout."""
    starts = " ".join(f"'{root}{p}'" for p in PATHS)
    cmd = f"find {starts} -type f -print0 | LC_ALL=C sort -z{'u' if unique else ''}"
    if hash_:
        cmd += " | xargs -0 sha384sum -z"
    return subprocess.run(["sh", "-c", cmd], capture_output=True, check=True).stdout


def sha384sum_list(names: bytes) -> bytes:
    """The pipeline's hashing stage alone, over a ready NUL-separated list."""
    return subprocess.run(["xargs", "-0", "sha384sum", "-z"], input=names, capture_output=True, check=True).stdout


def parse_sums(out: bytes, root: Path) -> list[tuple[bytes, bytes]]:
    """(root-relative path, digest) per ``sha384sum -z`` record."""
    skip = len(os.fsencode(root))
    return [(rec[98 + skip :], bytes.fromhex(rec[:96].decode())) for rec in out.split(b"\0") if rec]


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of its reaped children)."""
    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


def check_agree(root: Path, r14: rm.RootfsMeasurement, rnext: rm.RootfsMeasurement) -> str | None:
    base14 = parse_sums(pipeline(root, unique=False), root)
    if base14 != r14.entries:
        return "1.4: the pipeline's (path, digest) list differs from predict_entries'"
        # (this also compares the duplicates: both keep them)
    if chain(d for _, d in base14) != r14.rtmr3:
        return "1.4: RTMR3 differs"
    text = rm.list_text(parse_sums(pipeline(root, unique=True), root))
    if chain([hashlib.sha384(text).digest()]) != rnext.rtmr3:
        return "next: RTMR3 from the pipeline's list text differs"
    return None


def fuse_writes(r14: rm.RootfsMeasurement, rnext: rm.RootfsMeasurement) -> None:
    try:
        from agent.sim.tsm_mr_emulator import mounted_measurements
        ctx = mounted_measurements()
        mnt, state = ctx.__enter__()
    except Exception as exc:  # no root, no /dev/fuse, no fusepy: say so and go on
        print(f"register writes: skipped (FUSE emulator unavailable: {exc})")
        return
    try:
        reg = MeasurementRegister(os.path.join(mnt, "rtmr3:sha384"))
        for scheme, r in (("1.4", r14), ("next", rnext)):
            state.reset_td(())
            digests = r.extensions()
            t0 = time.perf_counter()
            n = reg.extend(digests)
            wall = time.perf_counter() - t0
            ok = state.rtmr(3) == r.rtmr3 and reg.read() == r.rtmr3
            print(f"register writes, {scheme}: {n} pwrite(s) through the FUSE emulator in {wall:.3f} s "
                  f"({wall / n * 1e6:.1f} µs per write); RTMR3 {'matches' if ok else 'DIFFERS FROM'} the prediction")
        state.reset_td(())
        assert state.rtmr(3) == ZERO
    finally:
        ctx.__exit__(None, None, None)


def report_pairs(pairs: dict[str, tuple[str, str]], walls: dict[str, list[float]], cpus: dict[str, list[float]],
                 ) -> dict[str, float]:
    print(f"{'':<14}{'baseline best s':>16}{'ours best s':>13}{'best/best':>11}{'median ratio':>14}"
          f"{'CPU s base/ours':>18}   (per-round ratios)")
    medians: dict[str, float] = {}
    for label, (b, o) in pairs.items():
        ratios = [x / y for x, y in zip(walls[b], walls[o], strict=True)]
        medians[label] = statistics.median(ratios)
        print(f"{label:<14}{min(walls[b]):>16.3f}{min(walls[o]):>13.3f}{min(walls[b]) / min(walls[o]):>10.2f}x"
              f"{medians[label]:>13.2f}x{min(cpus[b]):>9.2f}/{min(cpus[o]):<8.2f}  "
              + " ".join(f"{r:.2f}" for r in ratios))
    return medians


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--files", type=int, default=41000, help="measured files (default 41000, as Chutes reports)")
    ap.add_argument("--size-mib", type=int, default=2560, help="total size of the tree (default 2560 MiB)")
    ap.add_argument("--large", type=int, default=6, help="big shared objects sharing the rest of the size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0, help="hashing workers (default: file_hashing's default)")
    ap.add_argument("--dir", default=None, help="where to build the tree (default: a temp dir)")
    ap.add_argument("--no-fuse", action="store_true", help="skip the register writes through the FUSE emulator")
    args = ap.parse_args()
    workers = args.workers or fh.default_workers()
    ncpu = fh.cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="rtmr3-bench-", dir=args.dir))
    try:
        root = tmp / "root"
        t0 = time.perf_counter()
        stats = build_tree(root, args.files, args.size_mib * MIB, args.large, args.seed)
        files, _, _ = rm.plan(str(root), PATHS, "1.4")
        seen: dict[bytes, fh.HashJob] = {}
        for f in files:
            seen.setdefault(f.full, fh.HashJob(f.full, f.size))
        jobs = list(seen.values())
        total = sum(j.size for j in jobs)
        largest = max(j.size for j in jobs)
        print(f"tree: {len(jobs)} files, {total / MIB:.0f} MiB ("
              + ", ".join(f"{k} {c} / {b / MIB:.0f} MiB" for k, (c, b) in sorted(stats.items()))
              + f"), largest {largest / MIB:.0f} MiB, built in {time.perf_counter() - t0:.1f} s")
        print(f"measured: 1.4 {len(files)} extensions (overlap kept), next {len(jobs)} files; cpus={ncpu}, "
              f"workers={workers}; load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")

        # warm the page cache (both sides read everything once, untimed) and check they agree
        r14 = rm.predict_entries(str(root), PATHS, scheme="1.4", workers=workers)
        rnext = rm.predict_entries(str(root), PATHS, scheme="next", workers=workers)
        problem = check_agree(root, r14, rnext)
        if problem:
            print(f"MISMATCH: {problem}", file=sys.stderr)
            return 1
        unique_names = pipeline(root, unique=True, hash_=False)

        variants: dict[str, Callable[[], object]] = {
            "base-1.4": lambda: pipeline(root, unique=False),
            "ours-1.4": lambda: rm.predict_entries(str(root), PATHS, scheme="1.4", workers=workers),
            "base-next": lambda: pipeline(root, unique=True),
            "ours-next": lambda: rm.predict_entries(str(root), PATHS, scheme="next", workers=workers),
            "base-walk": lambda: pipeline(root, unique=False, hash_=False),
            "ours-plan": lambda: rm.plan(str(root), PATHS, "1.4"),
            "base-hash": lambda: sha384sum_list(unique_names),
            "ours-hash": lambda: fh.hash_files(jobs, workers),
        }
        scaling: dict[str, Callable[[], object]] = {"1 helper process": lambda: fh._hash_in_helpers(jobs, 1)}
        for w in sorted({1, 2, ncpu}):
            scaling[f"workers={w}"] = lambda w=w: fh.hash_files(jobs, w)
        walls: dict[str, list[float]] = {k: [] for k in (*variants, *scaling)}
        cpus: dict[str, list[float]] = {k: [] for k in walls}
        for _ in range(args.rounds):
            for name, fn in (*variants.items(), *scaling.items()):
                wall, c = timed(fn)
                walls[name].append(wall)
                cpus[name].append(c)

        print(f"\nbaseline / ours, {args.rounds} alternating rounds, warm page cache "
              f"(ratio > 1: ours is faster)")
        medians = report_pairs({"total 1.4": ("base-1.4", "ours-1.4"), "total next": ("base-next", "ours-next"),
                                "walk (plan)": ("base-walk", "ours-plan"), "hashing": ("base-hash", "ours-hash")},
                               walls, cpus)

        print(f"\nhashing scaling ({len(jobs)} files, {total / MIB:.0f} MiB; best of {args.rounds}):")
        one = min(walls["1 helper process"])
        for name in scaling:
            w = min(walls[name])
            print(f"  {name:<18}{w:>8.3f} s wall {min(cpus[name]):>7.2f} s CPU {total / MIB / w:>7.0f} MiB/s  "
                  f"x{one / w:.2f} vs one helper")
        rate = total / one  # bytes/s of one core, per-file costs included
        print(f"  one core: {rate / MIB:.0f} MiB/s incl. per-file costs; "
              f"sha384sum (one process): {total / MIB / min(walls['base-hash']):.0f} MiB/s")
        for n in (4, 8, 16):
            est = max(one / n, largest / (rate * 1.0)) + 0.03
            print(f"  extrapolated (not measured) {n:>2} cores: ~{est:.2f} s "
                  f"(= max(one-core time / {n}, largest file alone) + ~30 ms helper start)")

        if not args.no_fuse:
            print()
            fuse_writes(r14, rnext)
        print(f"\nRESULT hashing vs the pipeline's sha384sum: {medians['hashing']:.2f}x median of per-round ratios "
              f"(target >= 1.8x on 2 cores); total 1.4 {medians['total 1.4']:.2f}x, next {medians['total next']:.2f}x; "
              f"rtmr3 1.4={r14.rtmr3.hex()[:16]}… next={rnext.rtmr3.hex()[:16]}…; "
              f"load: {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
