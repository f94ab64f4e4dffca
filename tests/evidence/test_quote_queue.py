"""The hardware quote queue: fairness, bound, deadlines, coalescing, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from agent.evidence.base import DeadlineExceeded, QueueFullError, QuoteSourceError
from agent.evidence.quote_queue import QuoteQueue


class GatedSource:
    """A QuoteSource whose calls block until the test opens the gate; records every call."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls: list[bytes] = []
        self.fail_with: Exception | None = None

    def get_quote(self, report_data: bytes) -> bytes:
        self.calls.append(report_data)
        self.started.set()
        self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        return b"QUOTE:" + report_data


@pytest.fixture
def source() -> Iterator[GatedSource]:
    src = GatedSource()
    yield src
    src.gate.set()  # never leave the source thread blocked


def rd(i: int) -> bytes:
    return bytes([i]) * 64


async def _wait_started(src: GatedSource) -> None:
    await asyncio.to_thread(src.started.wait, 5)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_serves_quote_for_the_report_data(source) -> None:
    source.gate.set()
    q = QuoteQueue(source, max_len=4, default_deadline_s=5)
    assert await q.get(rd(1)) == b"QUOTE:" + rd(1)
    assert q.stats["source_calls"] == 1 and q.stats["served"] == 1 and q.depth == 0
    await q.aclose()


async def test_round_robin_across_callers(source) -> None:
    q = QuoteQueue(source, max_len=16, default_deadline_s=10)
    tasks = [asyncio.create_task(q.get(rd(i), caller="A")) for i in range(1, 6)]
    tasks.append(asyncio.create_task(q.get(rd(100), caller="B")))
    await _settle()
    await _wait_started(source)
    source.gate.set()
    await asyncio.gather(*tasks)
    # plain FIFO would serve B last; round-robin serves it right after A's first request
    assert source.calls == [rd(1), rd(100), rd(2), rd(3), rd(4), rd(5)]
    await q.aclose()


async def test_bound_refuses_with_retry_after(source) -> None:
    q = QuoteQueue(source, max_len=2, default_deadline_s=10)
    first = asyncio.create_task(q.get(rd(1)))
    await _wait_started(source)  # rd(1) is in flight, not queued
    queued = [asyncio.create_task(q.get(rd(i))) for i in (2, 3)]
    await _settle()
    assert q.depth == 2 and q.in_flight
    with pytest.raises(QueueFullError) as exc:
        await q.get(rd(4))
    assert exc.value.retry_after_s > 0
    assert "2 requests waiting" in str(exc.value)
    # an identical request is not a new job: it joins the queued one instead of being refused
    joined = asyncio.create_task(q.get(rd(3)))
    source.gate.set()
    results = await asyncio.gather(first, *queued, joined)
    assert results[-1] == b"QUOTE:" + rd(3)
    assert q.stats["rejected_full"] == 1 and rd(4) not in source.calls
    await q.aclose()


async def test_coalescing_identical_requests(source) -> None:
    q = QuoteQueue(source, max_len=4, default_deadline_s=10)
    tasks = [asyncio.create_task(q.get(rd(7), caller=f"c{i}")) for i in range(20)]
    await _wait_started(source)
    late = asyncio.create_task(q.get(rd(7), caller="late"))  # joins the one in flight
    await _settle()
    source.gate.set()
    results = await asyncio.gather(*tasks, late)
    assert set(results) == {b"QUOTE:" + rd(7)}
    assert source.calls == [rd(7)]
    assert q.stats["coalesced"] == 20 and q.stats["served"] == 21
    await q.aclose()


async def test_deadline_and_expired_requests_never_reach_the_source(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    first = asyncio.create_task(q.get(rd(1)))
    await _wait_started(source)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await q.get(rd(2), deadline_s=0.05)  # stuck behind rd(1)
    source.gate.set()
    assert await first == b"QUOTE:" + rd(1)
    assert await q.get(rd(3)) == b"QUOTE:" + rd(3)
    assert source.calls == [rd(1), rd(3)]
    assert q.stats["deadline_exceeded"] == 1
    await q.aclose()


async def test_deadline_while_in_flight_does_not_break_others(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    patient = asyncio.create_task(q.get(rd(1), deadline_s=10))
    await _wait_started(source)
    with pytest.raises(DeadlineExceeded):
        await q.get(rd(1), deadline_s=0.05)  # coalesced onto the in-flight job, then gives up
    source.gate.set()
    assert await patient == b"QUOTE:" + rd(1)
    assert source.calls == [rd(1)]
    await q.aclose()


async def test_cancellation_is_contained(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    first = asyncio.create_task(q.get(rd(1)))
    await _wait_started(source)
    a = asyncio.create_task(q.get(rd(2), caller="a"))
    b = asyncio.create_task(q.get(rd(2), caller="b"))
    lonely = asyncio.create_task(q.get(rd(3), caller="c"))
    await _settle()
    assert q.depth == 2
    a.cancel()
    lonely.cancel()
    await _settle()
    assert q.depth == 1  # rd(3) had no other waiter: dropped; rd(2) still wanted by b
    source.gate.set()
    assert await b == b"QUOTE:" + rd(2)
    assert await first == b"QUOTE:" + rd(1)
    for t in (a, lonely):
        with pytest.raises(asyncio.CancelledError):
            await t
    assert source.calls == [rd(1), rd(2)]
    assert q.stats["cancelled"] == 2 and q.stats["abandoned"] == 1
    assert await q.get(rd(4)) == b"QUOTE:" + rd(4)  # still healthy
    await q.aclose()


async def test_cancelling_the_in_flight_waiter_keeps_the_worker(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    t = asyncio.create_task(q.get(rd(1)))
    await _wait_started(source)
    t.cancel()
    source.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert await q.get(rd(2)) == b"QUOTE:" + rd(2)
    await q.aclose()


async def test_source_errors_reach_every_waiter(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    source.fail_with = QuoteSourceError("empty outblob", hint="host quote service (QGS) failed")
    source.gate.set()
    results = await asyncio.gather(q.get(rd(1)), q.get(rd(1)), return_exceptions=True)
    assert all(isinstance(r, QuoteSourceError) and "QGS" in str(r) for r in results)
    source.fail_with = OSError("disk on fire")
    with pytest.raises(QuoteSourceError, match="quote source gated failed: disk on fire"):
        await q.get(rd(2))
    assert q.stats["source_errors"] == 2
    await q.aclose()


async def test_bad_arguments(source) -> None:
    q = QuoteQueue(source, max_len=1, default_deadline_s=1)
    with pytest.raises(ValueError, match="report_data: expected 64 bytes, got 63"):
        await q.get(bytes(63))
    with pytest.raises(ValueError, match="deadline_s"):
        await q.get(rd(1), deadline_s=0)
    with pytest.raises(ValueError, match="max_len"):
        QuoteQueue(source, max_len=0, default_deadline_s=1)
    await q.aclose()


async def test_aclose_fails_waiters(source) -> None:
    q = QuoteQueue(source, max_len=8, default_deadline_s=10)
    first = asyncio.create_task(q.get(rd(1)))
    await _wait_started(source)
    queued = asyncio.create_task(q.get(rd(2)))
    await _settle()
    await q.aclose()
    for t in (first, queued):
        with pytest.raises(QuoteSourceError, match="closed"):
            await t
    with pytest.raises(QuoteSourceError, match="closed"):
        await q.get(rd(3))
