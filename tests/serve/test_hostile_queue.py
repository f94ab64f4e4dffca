"""Fair share of the quote source: one flooding caller can neither take the whole queue nor starve the
compat socket's /attest (the validator's own evidence pull through the attestation proxy).

Before: one global bound of 64 and no per-caller share; a flood got the compat /attest 429 on 28 of 30.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time

import pytest

from agent.evidence.base import QueueFullError
from agent.evidence.quote_queue import RESERVED_LANE, QuoteQueue, queue_lane
from tests.serve.helpers import unix_client


class _SlowSource:
    """A quote source that takes ``delay`` seconds per quote (a QGS round trip) and records the order."""

    name = "slow-test"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.order: list[bytes] = []
        self.lock = threading.Lock()

    def get_quote(self, report_data: bytes) -> bytes:
        time.sleep(self.delay)
        with self.lock:
            self.order.append(report_data)
        return b"Q" + report_data


async def test_per_caller_share_and_reserved_lane_unit() -> None:
    src = _SlowSource(0.05)
    q = QuoteQueue(src, max_len=10, default_deadline_s=10, max_per_caller=3, reserved=4)
    hostile = [asyncio.create_task(q.get(secrets.token_bytes(64), caller="container:h")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="already has 3"):
        await q.get(secrets.token_bytes(64), caller="container:h")
    # other shared-lane callers fill the shared part (10 - 4 reserved = 6)
    others = [asyncio.create_task(q.get(secrets.token_bytes(64), caller=f"container:o{i}")) for i in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="for callers of this socket"):
        await q.get(secrets.token_bytes(64), caller="container:late")

    async def compat(rd: bytes) -> bytes:
        queue_lane.set(RESERVED_LANE)
        return await q.get(rd, caller="pod:proxy")

    rd = secrets.token_bytes(64)
    assert await compat(rd) == b"Q" + rd  # admitted despite the full shared lane ...
    assert src.order.index(rd) <= 1  # ... and served next (at most behind the one in flight)
    await asyncio.gather(*hostile, *others)
    assert q.stats["rejected_caller_share"] == 1
    await q.aclose()


async def test_compat_attest_survives_a_flooding_container(service_factory, monkeypatch) -> None:
    from agent.sim.quote_sim import SimulatedQuoteSource

    # the event-loop share (max_active_requests_per_caller) would already hold most of the flood back
    # before the queue: switched off here so this is the quote queue's own guarantee
    svc = await service_factory(evidence_rate_per_s=10000.0, evidence_burst=10000, quote__queue_max=16,
                                quote__queue_per_caller=4, quote__queue_reserved_compat=4, quote__deadline_s=20.0,
                                max_active_requests_per_caller=0, requests_per_caller_per_s=0.0)
    real = SimulatedQuoteSource.get_quote

    def slow(self, report_data: bytes) -> bytes:  # emulated QGS round trip
        time.sleep(0.02)
        return real(self, report_data)

    monkeypatch.setattr(SimulatedQuoteSource, "get_quote", slow)
    stop = asyncio.Event()
    flood_status: list[int] = []

    async def flood(c) -> None:
        while not stop.is_set():
            r = await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})
            flood_status.append(r.status)
            await r.read()

    async with unix_client(svc.cfg.serve.chute_socket, limit=32) as hostile, \
            unix_client(svc.cfg.serve.compat_socket) as validator:
        flooders = [asyncio.create_task(flood(hostile)) for _ in range(32)]
        await asyncio.sleep(0.3)
        attest = []
        for _ in range(10):
            r = await validator.get("/attest", params={"nonce": secrets.token_hex(32)})
            attest.append(r.status)
            await r.read()
        stop.set()
        await asyncio.gather(*flooders)
    assert attest == [200] * 10
    assert flood_status.count(429) > 0  # the flood really hit its share
    assert svc._queue.stats["rejected_caller_share"] > 0
