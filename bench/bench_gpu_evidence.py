"""GPU evidence fan-out: 8 emulated GPUs whose attestation-report call takes 200 ms each.

Measures ``NvmlGpuSource.evidence`` for all 8 GPUs vs for 1 (``gpu_ids`` = the first GPU), through
the real pynvml wrapper and the emulated NVML library. Target: all 8 within 1.5x the time for one
(the GPUs are collected in parallel). Prints the medians and the ratio.

    python bench/bench_gpu_evidence.py [--gpus 8] [--delay 0.2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from agent import log

log.configure("warning", "console")  # before the modules below bind their loggers

from agent.config import GpuConfig  # noqa: E402
from agent.evidence.nvml_gpu import NvmlGpuSource  # noqa: E402
from agent.sim.fake_nvml import install_fake_nvml  # noqa: E402


async def _timed(src: NvmlGpuSource, gpu_ids: list[str] | None) -> float:
    start = time.perf_counter()
    await src.evidence(os.urandom(32), gpu_ids)
    return time.perf_counter() - start


async def main(gpus: int, delay: float, rounds: int) -> int:
    with install_fake_nvml(gpus, report_delay_s=delay) as fake:
        src = NvmlGpuSource(GpuConfig(call_timeout_s=10.0))
        try:
            first = [fake.gpus[0].uuid]
            await _timed(src, None)  # warm up: NVML init, chain cache, key derivation
            one, all_ = [], []
            for _ in range(rounds):
                one.append(await _timed(src, first))
                all_.append(await _timed(src, None))
        finally:
            src.close()
    t1, tn = statistics.median(one), statistics.median(all_)
    ratio = tn / t1
    print(f"report delay {delay * 1000:.0f} ms, {rounds} rounds (median)")
    print(f"evidence for 1 GPU : {t1 * 1000:7.1f} ms")
    print(f"evidence for {gpus} GPUs: {tn * 1000:7.1f} ms")
    print(f"ratio {gpus}/1        : {ratio:.2f}x  (target <= 1.5x; serial would be {gpus}x)")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.gpus, a.delay, a.rounds)))
