"""Quote queue under load: 50 concurrent callers on a 1 s emulated quote source, and the queue's overhead.

Scenarios (each caller asks for a distinct report_data unless noted):
  A  deadline generous (60 s), bound 64       -> all 50 served, none past its deadline
  B  deadline 10 s, bound 64                   -> about 10 served; the rest DeadlineExceeded, and expired
                                                  requests never reach the source
  C  bound 20                                  -> 20 accepted (all arrive before the first starts), 30 refused
                                                  at once with QueueFullError (HTTP 429) + a Retry-After estimate
  D  50 callers, identical report_data         -> one source call serves all (coalescing)
Overhead: an instant source called directly vs through the queue (sequential and 50-concurrent), and
the simulated source (real ECDSA signing) directly vs through the queue.

    python bench/bench_quote_queue.py [--quote-s 1.0] [--callers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from agent.evidence.base import DeadlineExceeded, QueueFullError
from agent.evidence.quote_queue import QuoteQueue


class SleepSource:
    """Emulated hardware: each quote takes ``seconds`` and they are serial (one at a time)."""

    name = "sleep"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def get_quote(self, report_data: bytes) -> bytes:
        self.calls += 1
        time.sleep(self.seconds)
        return b"Q" + report_data


class InstantSource:
    name = "instant"

    def get_quote(self, report_data: bytes) -> bytes:
        return report_data


def rd(i: int) -> bytes:
    return i.to_bytes(8, "big") * 8


async def load(quote_s: float, callers: int, *, deadline_s: float, max_len: int, same: bool = False) -> dict:
    src = SleepSource(quote_s)
    q = QuoteQueue(src, max_len=max_len, default_deadline_s=deadline_s)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(i: int) -> tuple[str, float]:
        start = loop.time()
        try:
            await q.get(rd(0 if same else i), caller=f"c{i}")
            return "served", loop.time() - start
        except DeadlineExceeded:
            return "deadline", loop.time() - start
        except QueueFullError as exc:
            return f"refused(retry_after={exc.retry_after_s}s)", loop.time() - start

    results = await asyncio.gather(*(one(i) for i in range(callers)))
    wall = loop.time() - t0
    await q.aclose()
    served = [t for r, t in results if r == "served"]
    outcomes: dict[str, int] = {}
    for r, _ in results:
        key = r.split("(")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
    return {
        "wall_s": wall, "outcomes": outcomes, "source_calls": src.calls,
        "max_served_latency_s": max(served) if served else 0.0,
        "served_past_deadline": sum(1 for t in served if t > deadline_s),
        "retry_after": sorted({r for r, _ in results if r.startswith("refused")}),
        "stats": q.stats,
    }


async def overhead(n: int) -> None:
    src = InstantSource()
    t0 = time.perf_counter()
    for i in range(n):
        src.get_quote(rd(i))
    direct = (time.perf_counter() - t0) / n
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    for i in range(n):
        await loop.run_in_executor(None, src.get_quote, rd(i))
    executor_only = (time.perf_counter() - t0) / n
    q = QuoteQueue(src, max_len=n + 1, default_deadline_s=60)
    t0 = time.perf_counter()
    for i in range(n):
        await q.get(rd(i))
    seq = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    await asyncio.gather(*(q.get(rd(i + n), caller=f"c{i % 50}") for i in range(n)))
    conc = (time.perf_counter() - t0) / n
    await q.aclose()
    print(f"overhead, instant source ({n} quotes):")
    print(f"  direct call                 {direct * 1e6:9.1f} us/quote")
    print(f"  run_in_executor alone       {executor_only * 1e6:9.1f} us/quote")
    print(f"  queue, sequential awaits    {seq * 1e6:9.1f} us/quote  (+{(seq - direct) * 1e6:.1f} us vs direct)")
    print(f"  queue, {n} concurrent      {conc * 1e6:9.1f} us/quote  (+{(conc - direct) * 1e6:.1f} us vs direct)")
    print(f"  => queue cost per quote vs a 1 s hardware quote: {max(seq, conc) / 1.0 * 100:.4f} %")

    from agent.sim.quote_sim import SimulatedQuoteSource

    sim = SimulatedQuoteSource(tempfile.mkdtemp(prefix="bench-sim-"))
    m = 200
    t0 = time.perf_counter()
    for i in range(m):
        sim.get_quote(rd(i))
    sim_direct = (time.perf_counter() - t0) / m
    q = QuoteQueue(sim, max_len=m + 1, default_deadline_s=60)
    t0 = time.perf_counter()
    for i in range(m):
        await q.get(rd(i + m))
    sim_q = (time.perf_counter() - t0) / m
    await q.aclose()
    print(f"overhead, simulated source with real ECDSA ({m} quotes):")
    print(f"  direct {sim_direct * 1e3:.3f} ms/quote, via queue {sim_q * 1e3:.3f} ms/quote, "
          f"ratio {sim_q / sim_direct:.3f}")


def show(name: str, r: dict, deadline_s: float) -> None:
    print(f"{name}: wall {r['wall_s']:.2f} s, outcomes {r['outcomes']}, source calls {r['source_calls']}, "
          f"slowest served {r['max_served_latency_s']:.2f} s (deadline {deadline_s:g} s), "
          f"served past deadline {r['served_past_deadline']}")
    if r["retry_after"]:
        print(f"   refusals carried {r['retry_after']}")
    s = r["stats"]
    print(f"   stats: coalesced {s['coalesced']}, dropped before the source (expired or abandoned) "
          f"{s['expired_skipped'] + s['abandoned']}, "
          f"rejected_full {s['rejected_full']}, deadline_exceeded {s['deadline_exceeded']}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quote-s", type=float, default=1.0, help="emulated seconds per quote (default 1.0)")
    ap.add_argument("--callers", type=int, default=50)
    ap.add_argument("--overhead-n", type=int, default=2000)
    ap.add_argument("--skip-load", action="store_true", help="only measure overhead")
    args = ap.parse_args()
    from agent.log import configure

    configure("error", "console")  # the simulated source warns on every quote; keep the output readable
    n, qs = args.callers, args.quote_s
    if not args.skip_load:
        generous = 1.2 * n * qs + 5
        show(f"A  {n} callers, {qs:g} s source, deadline {generous:g} s, bound 64",
             await load(qs, n, deadline_s=generous, max_len=64), generous)
        tight = 10 * qs
        show(f"B  {n} callers, deadline {tight:g} s, bound 64", await load(qs, n, deadline_s=tight, max_len=64), tight)
        show(f"C  {n} callers, bound 20", await load(qs, n, deadline_s=generous, max_len=20), generous)
        show(f"D  {n} callers, identical report_data", await load(qs, n, deadline_s=generous, max_len=64, same=True),
             generous)
    await overhead(args.overhead_n)


if __name__ == "__main__":
    asyncio.run(main())
