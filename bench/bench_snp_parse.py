"""SEV-SNP report parsing: our C extension vs installable PyPI peers, side by side in one run.

Run from the repository root: ``python bench/bench_snp_parse.py [--number N] [--rounds R]``.

One call = parse all eight sample reports of tests/data/sev-snp/ and read every field the peer's
parsed object exposes. The peers are pure-Python parsers from PyPI (the ``bench`` extra:
``pip install -e .[bench]``):

- ``omne-attest`` 0.1.0 (Apache-2.0): ``omne_attest.snp.Report.parse`` -- the primary peer, the
  target being ours <= 0.5x of it;
- ``cvm-attest`` 1.0.0 (MIT): ``cvm_attest.snp.report.parse_snp_report`` (a dict of every field).

The implementations are timed in alternating rounds (the order flips every round) so drift on a
shared machine hits them alike; each round times N calls. Best and median per-report times and
the ours/peer ratios are printed. Without omne-attest the bench prints SKIP and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.quote import parse_snp_report  # noqa: E402

SNP_DIR = REPO / "tests" / "data" / "sev-snp"
#: What omne-attest's Report exposes, in our names (its sig_r/sig_s are our signature_r/signature_s).
FIELDS = ("version", "guest_svn", "policy", "family_id", "image_id", "vmpl", "signature_algo", "current_tcb",
          "platform_info", "report_data", "measurement", "host_data", "id_key_digest", "author_key_digest",
          "report_id", "reported_tcb", "chip_id", "committed_tcb", "launch_tcb", "signature_r", "signature_s", "raw")
OMNE_FIELDS = tuple({"signature_r": "sig_r", "signature_s": "sig_s"}.get(f, f) for f in FIELDS)


def workloads(reports: list[bytes]) -> dict[str, Callable[[], None]]:
    def ours() -> None:
        for raw in reports:
            r = parse_snp_report(raw)
            for name in FIELDS:
                getattr(r, name)

    def ours_parse_only() -> None:
        for raw in reports:
            parse_snp_report(raw)

    out: dict[str, Callable[[], None]] = {"ours (C ext), parse + fields": ours,
                                          "ours (C ext), parse only": ours_parse_only}
    try:
        from omne_attest.snp import Report
    except ImportError:
        return out

    def omne() -> None:
        for raw in reports:
            r = Report.parse(raw)
            for name in OMNE_FIELDS:
                getattr(r, name)

    out["omne-attest 0.1.0"] = omne
    try:
        from cvm_attest.snp.report import parse_snp_report as cvm_parse
    except ImportError:
        return out

    def cvm() -> None:
        for raw in reports:
            cvm_parse(raw)  # returns a dict of every field, already materialised

    out["cvm-attest 1.0.0"] = cvm
    return out


def sanity(reports: list[bytes]) -> None:
    """The peers read the same bytes we do (measurement, report_data, chip_id), before any timing."""
    from omne_attest.snp import Report

    for raw in reports:
        ours, theirs = parse_snp_report(raw), Report.parse(raw)
        assert (ours.measurement, ours.report_data, ours.chip_id) == (theirs.measurement, theirs.report_data,
                                                                      theirs.chip_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=2000, help="calls (of 8 reports each) per round")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    reports = [p.read_bytes() for p in sorted(SNP_DIR.glob("*.bin"))]
    assert len(reports) == 8
    jobs = workloads(reports)
    if "omne-attest 0.1.0" not in jobs:
        print("SKIP: the peer parser omne-attest is not installed (pip install -e '.[bench]'); nothing compared")
        return 0
    sanity(reports)
    names = list(jobs)
    per_report: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(a.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for n in order:
            fn = jobs[n]
            t0 = time.perf_counter()
            for _ in range(a.number):
                fn()
            per_report[n].append((time.perf_counter() - t0) / (a.number * len(reports)) * 1e6)
    print(f"{len(reports)} reports, {len(FIELDS)} fields read each; {a.rounds} alternating rounds x {a.number} "
          f"calls; us per report")
    best = {n: min(v) for n, v in per_report.items()}
    med = {n: statistics.median(v) for n, v in per_report.items()}
    peer = "omne-attest 0.1.0"
    print(f"  {'implementation':<30} {'best':>8} {'median':>8}   {'best/peer':>9} {'median/peer':>11}")
    for n in names:
        print(f"  {n:<30} {best[n]:8.3f} {med[n]:8.3f}   {best[n] / best[peer]:8.3f}x {med[n] / med[peer]:10.3f}x")
    ours = "ours (C ext), parse + fields"
    ratio = max(best[ours] / best[peer], med[ours] / med[peer])
    verdict = "meets" if ratio <= 0.5 else "MISSES"
    print(f"\nours/omne-attest (parse + fields, worse of best and median): {ratio:.3f}x "
          f"({verdict} the <= 0.50x target)")
    cvm = "cvm-attest 1.0.0"
    if cvm in best:
        print(f"ours/cvm-attest (same measure): {max(best[ours] / best[cvm], med[ours] / med[cvm]):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
