"""Watchdog pings follow real health: they stop while a quote-source call is wedged and resume after."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from pathlib import Path

from agent.serve import server as server_mod
from agent.sim.quote_sim import SimulatedQuoteSource
from tests.serve.helpers import unix_client


async def collect(sock: socket.socket, seconds: float) -> list[str]:
    loop = asyncio.get_running_loop()
    out: list[str] = []
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            out.append((await asyncio.wait_for(loop.sock_recv(sock, 65536), left)).decode())
        except TimeoutError:
            break
    return out


def lines(msgs: list[str]) -> list[str]:
    return [line for m in msgs for line in m.split("\n")]


async def test_watchdog_stops_while_quote_source_is_wedged(service_factory, short_tmp: Path, monkeypatch) -> None:
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(str(short_tmp / "wd.sock"))
    nsock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "wd.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setattr(server_mod, "WEDGE_GRACE_S", 0.0)
    svc = await service_factory(quote__deadline_s=0.3)
    healthy = lines(await collect(nsock, 0.6))
    assert "READY=1" in healthy and "WATCHDOG=1" in healthy

    release = threading.Event()
    real = SimulatedQuoteSource.get_quote

    def stuck(self, report_data: bytes) -> bytes:  # an emulated QGS that never answers
        release.wait(30)
        return real(self, report_data)

    monkeypatch.setattr(SimulatedQuoteSource, "get_quote", stuck)
    try:
        async with unix_client(svc.cfg.serve.chute_socket) as c:
            r = await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})
            assert r.status == 504 and (await r.json())["error"] == "deadline_exceeded"
            first = lines(await collect(nsock, 1.0))  # let the wedge threshold (2 x 0.3 s) pass
            wedged = lines(await collect(nsock, 0.8))
            assert "WATCHDOG=1" not in wedged
            h = await c.get("/v1/health")
            assert h.status == 503
            st = await (await c.get("/v1/status")).json()
            assert st["health"]["quote_source"] == "wedged"
            assert any(line.startswith("STATUS=degraded") for line in first + wedged)
    finally:
        release.set()
    recovered = lines(await collect(nsock, 0.8))
    assert "WATCHDOG=1" in recovered
    nsock.close()
