"""Parse + read every field dcap-qvl also exposes: C extension vs dcap-qvl vs pure-Python reference.

Run from the repository root: ``python bench/bench_quote_parse.py [--number N] [--repeat R]``.
Prints per-call times (best of R runs of N calls) and ratios; target: C <= 0.5x dcap-qvl.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dcap_qvl  # noqa: E402

from agent.quote import parse_quote  # noqa: E402
from tests.conftest import QUOTES_DIR  # noqa: E402
from tests.quote import reference_parser  # noqa: E402

HEADER = ("version", "att_key_type", "tee_type", "qe_svn", "pce_svn", "qe_vendor_id", "user_data")
TD10 = ("tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes", "xfam", "mr_td",
        "mr_config_id", "mr_owner", "mr_owner_config", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data")
TD15 = ("tee_tcb_svn2", "mr_service_td")
DCAP_HEADER = ("version", "attestation_key_type", "tee_type", "qe_svn", "pce_svn", "qe_vendor_id", "user_data")
DCAP_TD10 = tuple(f.replace("rtmr", "rt_mr") for f in TD10)

SAMPLES = {"v4 (dcapqvl_tdx_quote_v4, 5006 B)": "dcapqvl_tdx_quote_v4.bin",
           "v5/TD1.5 (gotdxguest_quote_v5_sample, 5006 B)": "gotdxguest_quote_v5_sample.bin"}


def make_workloads(raw: bytes, td15: bool):
    ours = HEADER + TD10 + (TD15 if td15 else ())
    theirs_report = DCAP_TD10 + (TD15 if td15 else ())

    def c_ext() -> None:
        q = parse_quote(raw)
        for name in ours:
            getattr(q, name)
        q.pck_cert_chain  # noqa: B018

    def dcap() -> None:
        d = dcap_qvl.parse_quote(raw)
        h = d.header
        for name in DCAP_HEADER:
            getattr(h, name)
        r = d.report
        for name in theirs_report:
            getattr(r, name)
        d.cert_chain_pem_bytes()

    def reference() -> None:
        d = reference_parser.parse(raw)
        for name in ours:
            d[name]
        d["pck_cert_chain"]

    return {"C extension": c_ext, "dcap-qvl 0.7.0": dcap, "pure-Python reference": reference}


def best_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    print(f"parse + read {len(HEADER)} header + 15/17 report fields + PEM chain; best of {a.repeat} x {a.number}")
    worst = 0.0
    for label, fname in SAMPLES.items():
        raw = (QUOTES_DIR / fname).read_bytes()
        td15 = parse_quote(raw).body_type == 3
        times = {k: best_us(fn, a.number if k != "pure-Python reference" else a.number // 5, a.repeat)
                 for k, fn in make_workloads(raw, td15).items()}
        base = times["dcap-qvl 0.7.0"]
        print(f"\n{label}")
        for k, us in times.items():
            print(f"  {k:<24} {us:8.3f} us/call   {us / base:6.2f}x dcap-qvl   "
                  f"{us / times['C extension']:6.2f}x C")
        worst = max(worst, times["C extension"] / base)
    verdict = "meets" if worst <= 0.5 else "MISSES"
    print(f"\nC/dcap-qvl worst ratio {worst:.2f} ({verdict} the <= 0.50 target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
