"""A caller's share of the event loop: at most ``serve.max_active_requests_per_caller`` of its requests are
in progress at once; the rest wait unread (nothing refused, nothing lost) and never delay a neighbour.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time


async def _get(path: str, target: str) -> tuple[int, float]:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert m, data[:100]
    return int(m.group(1)), time.monotonic() - t0


async def test_flooding_caller_gets_a_bounded_share(service_factory, monkeypatch) -> None:
    from agent.sim.quote_sim import SimulatedQuoteSource

    svc = await service_factory(max_active_requests_per_caller=2, evidence_rate_per_s=1000.0, evidence_burst=1000,
                                quote__queue_per_caller=64)
    real = SimulatedQuoteSource.get_quote

    def slow(self, report_data: bytes) -> bytes:  # emulated QGS round trip
        time.sleep(0.2)
        return real(self, report_data)

    monkeypatch.setattr(SimulatedQuoteSource, "get_quote", slow)
    chute = svc.cfg.serve.chute_socket
    tracker = svc.ctx.trackers["chute"]
    flood = [asyncio.create_task(_get(chute, f"/v1/evidence?nonce={secrets.token_hex(32)}")) for _ in range(6)]
    await asyncio.sleep(0.1)
    scope = next(iter(tracker.states.values())).peer.scope
    assert sum(st.busy for st in tracker.states.values()) == 2  # two in progress ...
    assert tracker.fair.active(scope) == 2
    assert tracker.fair.waited == 4 and tracker.fair.waiting(scope) == 4  # ... four waiting, unread
    # the compat socket is another tracker: the validator's path is not held behind the flood
    status, took = await _get(svc.cfg.serve.compat_socket, "/health")
    assert status == 200 and took < 0.15
    results = await asyncio.gather(*flood)
    assert [s for s, _ in results] == [200] * 6  # every waiting request was answered in turn
    assert tracker.fair.active(scope) == 0 and tracker.fair.waiting(scope) == 0 and tracker.fair.running == 0
    assert max(t for _, t in results) >= 0.6  # three rounds of two 0.2 s quotes


async def test_request_rate_over_budget_is_delayed_not_refused(service_factory) -> None:
    """A caller pipelining requests beyond serve.requests_per_caller_per_s waits unread; all are answered."""
    svc = await service_factory(requests_per_caller_per_s=50.0, requests_per_caller_burst=10)
    reader, writer = await asyncio.open_unix_connection(svc.cfg.serve.chute_socket)
    t0 = time.monotonic()
    for _ in range(3):  # three batches of ten pipelined requests, each sent once the previous is answered
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        for _ in range(10):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
    took = time.monotonic() - t0
    writer.close()
    assert took >= (30 - 10 - 10) / 50  # past the burst, about 50 per second (one batch may already be read)
    assert svc.ctx.trackers["chute"].delayed >= 1
    status, quick = await _get(svc.cfg.serve.compat_socket, "/health")  # another socket, another budget
    assert status == 200 and quick < 0.15
