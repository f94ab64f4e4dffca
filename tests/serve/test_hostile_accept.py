"""A refused connection is closed at accept, on the raw socket: no transport, protocol, task or aiohttp
handler is made for it (a container reconnecting as fast as it can over its cap bought all four with each
attempt, on the event loop its neighbours share). Admitted connections are served as before."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web_server

REQ = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


async def _refused(path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(REQ)
    try:
        return await asyncio.wait_for(reader.read(), 3)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def _count_handlers(monkeypatch: Any) -> list[int]:
    """Counts aiohttp request handlers made (web.Server.__call__ is aiohttp's protocol factory)."""
    made = [0]
    orig = web_server.Server.__call__

    def counting(self: Any) -> Any:
        made[0] += 1
        return orig(self)

    monkeypatch.setattr(web_server.Server, "__call__", counting)
    return made


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int = 1) -> list[bytes]:
    writer.write(REQ * n)  # pipelined
    out = []
    for _ in range(n):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        body = await asyncio.wait_for(reader.readexactly(length), 3)
        out.append(head.split(b"\r\n")[0] + b" " + body)
    return out


async def test_refused_connections_never_reach_aiohttp(service_factory, monkeypatch) -> None:
    svc = await service_factory(max_connections=100, max_connections_per_caller=2)
    path = svc.cfg.serve.chute_socket
    tracker = svc.ctx.trackers["chute"]
    made = _count_handlers(monkeypatch)
    held = [await asyncio.open_unix_connection(path) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert made[0] == 2 and len(tracker.states) == 2 and tracker.accepted == 2
    tasks_before = len(asyncio.all_tasks())
    answers = await asyncio.gather(*(_refused(path) for _ in range(40)))
    assert answers == [b""] * 40 and tracker.refused == 40
    # not one aiohttp handler (nor our protocol, task or transport around it) for the 40 refused
    assert made[0] == 2 and len(tracker.states) == 2 and tracker.accepted == 2
    assert len(svc.listeners[1].runner.server.connections) == 2
    assert len(asyncio.all_tasks()) <= tasks_before
    assert tracker.connections_of(next(iter(tracker.states.values())).peer.scope) == 2
    # the admitted connections are served exactly as before: keep-alive, pipelined
    for reader, writer in held:
        answers = await _get(reader, writer, 3)
        assert all(a.startswith(b"HTTP/1.1 200 OK") and b'"status"' in a for a in answers), answers
    # a slot freed is a slot admitted again
    held[0][1].close()
    await asyncio.sleep(0.1)
    assert len(tracker.states) == 1
    again = await asyncio.open_unix_connection(path)
    assert (await _get(*again))[0].startswith(b"HTTP/1.1 200 OK")
    assert made[0] == 3 and tracker.accepted == 3 and tracker.refused == 40
    for _, w in (held[1], again):
        w.close()


async def test_reserved_slots_refused_at_accept(service_factory, monkeypatch) -> None:
    """The socket's last slots (reserved for callers holding none) are refused at accept too."""
    svc = await service_factory(max_connections=8, max_connections_per_caller=8,
                                connections_reserved_for_new_callers=2, connections_share_containers=0,
                                connections_share_host=0, max_connections_unidentified=0)  # all pooled
    path = svc.cfg.serve.chute_socket
    tracker = svc.ctx.trackers["chute"]
    made = _count_handlers(monkeypatch)
    held = [await asyncio.open_unix_connection(path) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert await _refused(path) == b""
    assert made[0] == 6 and tracker.refused == 1 and len(tracker.states) == 6
    for _, w in held:
        w.close()


async def test_failed_transport_gives_the_slot_back(service_factory, monkeypatch) -> None:
    """An admitted socket whose transport cannot be made does not keep its caller's slot."""
    svc = await service_factory(max_connections=100, max_connections_per_caller=1)
    path = svc.cfg.serve.chute_socket
    tracker = svc.ctx.trackers["chute"]
    loop = asyncio.get_running_loop()

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise OSError("no transport")

    monkeypatch.setattr(loop, "connect_accepted_socket", broken)
    assert await _refused(path) == b""
    await asyncio.sleep(0.05)
    assert sum(tracker.admission.budget.held.values()) == 0 and not tracker.states and tracker.refused == 0
    monkeypatch.undo()
    reader, writer = await asyncio.open_unix_connection(path)
    assert (await _get(reader, writer))[0].startswith(b"HTTP/1.1 200 OK")
    assert sum(tracker.admission.budget.held.values()) == 1 and len(tracker.states) == 1
    writer.close()
