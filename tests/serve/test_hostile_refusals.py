"""A caller retrying connections over its cap: each is refused, but the log gets one line per second, not one
per attempt (rendering and writing that line was the costliest part of a refusal under the issue-11 flood)."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from agent.serve import gate


async def _refused(path: str) -> bytes:
    """Connect, send a request and read what comes back (b"" when the service closes the connection)."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 3)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_refused_connections_are_counted_and_logged_once_per_interval(service_factory, monkeypatch) -> None:
    svc = await service_factory(max_connections=100, max_connections_per_caller=2)
    path = svc.cfg.serve.chute_socket
    tracker = svc.ctx.trackers["chute"]
    held = [await asyncio.open_unix_connection(path) for _ in range(2)]
    await asyncio.sleep(0.05)
    monkeypatch.setattr(gate, "REFUSAL_LOG_INTERVAL_S", 3600.0)
    with capture_logs() as logs:
        answers = [await _refused(path) for _ in range(30)]
    assert answers == [b""] * 30 and tracker.refused == 30
    refused = [e for e in logs if e["event"] == "serve.connection_refused"]
    assert len(refused) == 1
    assert refused[0]["reason"] == "per-caller connection cap reached" and refused[0]["held"] == 2
    assert refused[0]["refused_since_last"] == 0
    # once the interval has passed, the next refusal is logged with the count of those not logged
    monkeypatch.setattr(gate, "REFUSAL_LOG_INTERVAL_S", 0.0)
    with capture_logs() as logs:
        assert await _refused(path) == b""
    refused = [e for e in logs if e["event"] == "serve.connection_refused"]
    assert len(refused) == 1 and refused[0]["refused_since_last"] == 29
    assert tracker.refused == 31
    # the caller's two held connections still work
    reader, writer = held[0]
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 3)).startswith(b"HTTP/1.1 200")
    for _, w in held:
        w.close()
