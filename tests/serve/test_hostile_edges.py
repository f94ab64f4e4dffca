"""A hostile container against one caller's edges: half-closes, HTTP/0.9, dribbled bodies, relay floods.

Each test is an attack from issue 11 over the real unix sockets of a running service.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

from tests.serve.helpers import unix_client
from tests.serve.test_relay import FakeValidator, make_jwt, tls_pair, validator  # noqa: F401 (fixtures)


def _exchange(path: str, payload: bytes, *, half_close: bool, timeout: float = 3.0) -> bytes:
    """Send ``payload`` (optionally then shutdown(SHUT_WR)) and read until the server closes or times out."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            data += b"<timeout>"
        return data
    finally:
        s.close()


def _json_body(answer: bytes) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)


async def test_request_then_half_close_is_answered(service_factory) -> None:
    svc = await service_factory(header_timeout_s=2.0)
    for path, payload in (
        (svc.cfg.serve.chute_socket, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"),
        (svc.cfg.serve.chute_socket, b"POST /v1/rint/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        (svc.cfg.serve.compat_socket, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
    ):
        t0 = time.monotonic()
        answer = await asyncio.to_thread(_exchange, path, payload, half_close=True)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert not answer.endswith(b"<timeout>")  # and then the connection closes
        assert time.monotonic() - t0 < 2.5
    body = _json_body(answer)
    assert body == "pong"


async def test_half_close_mid_head_gets_json_error(service_factory) -> None:
    svc = await service_factory(header_timeout_s=5.0)
    answer = await asyncio.to_thread(_exchange, svc.cfg.serve.chute_socket, b"GET /v1/health HTTP/1.1\r\nHo",
                                     half_close=True)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert _json_body(answer)["error"] == "bad_http"


async def test_http09_request_gets_json_error_not_a_bare_body(service_factory) -> None:
    svc = await service_factory(header_timeout_s=5.0)
    for half_close in (False, True):
        answer = await asyncio.to_thread(_exchange, svc.cfg.serve.chute_socket, b"GET /v1/health\r\n",
                                         half_close=half_close)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        body = _json_body(answer)
        assert body["error"] == "bad_http" and "HTTP/0.9" in body["detail"]
        answer = await asyncio.to_thread(_exchange, svc.cfg.serve.compat_socket, b"GET /\r\n", half_close=half_close)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert set(_json_body(answer)) == {"detail"}  # the compat socket's error shape
    assert svc.ctx.trackers["chute"].bad_http == 2


async def test_dribbled_body_does_not_hold_the_connection(service_factory) -> None:
    """A byte of body now and then used to keep a connection busy until the request timeout (then again)."""
    svc = await service_factory(header_timeout_s=0.6, idle_timeout_s=1.0, request_timeout_s=30.0)
    reader, writer = await asyncio.open_unix_connection(svc.cfg.serve.chute_socket)
    writer.write(b"POST /v1/rint/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 5000\r\n\r\n{")
    t0 = time.monotonic()
    closed_after = None
    while time.monotonic() - t0 < 6:
        try:
            if await asyncio.wait_for(reader.read(1000), 0.2) == b"":
                closed_after = time.monotonic() - t0
                break
        except TimeoutError:
            pass
        try:
            writer.write(b" ")
            await writer.drain()
        except ConnectionError:
            closed_after = time.monotonic() - t0
            break
    writer.close()
    assert closed_after is not None and closed_after < 0.6 + 1.5, closed_after
    assert svc.ctx.trackers["chute"].timed_out == 1


async def test_dribbled_head_closes_within_idle_plus_receive_window(service_factory) -> None:
    svc = await service_factory(header_timeout_s=0.5, idle_timeout_s=0.8)
    reader, writer = await asyncio.open_unix_connection(svc.cfg.serve.chute_socket)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    closed_after = None
    while time.monotonic() - t0 < 5:
        await asyncio.sleep(0.3)
        try:
            writer.write(b"G")
            await writer.drain()
            if reader.at_eof():
                break
        except ConnectionError:
            break
    closed_after = time.monotonic() - t0
    writer.close()
    assert closed_after < 0.8 + 0.5 + 1.2, closed_after


async def test_relay_calls_are_limited_per_caller(service_factory, validator: FakeValidator, tls_pair) -> None:  # noqa: F811
    """One caller drove hundreds of validator calls a second; now a token bucket (burst 10, 1/s) holds it."""
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"], relay_ca_bundle=str(tls_pair[0]),
                                relay_rate_per_s=0.01, relay_burst=4, nonce_rate_per_s=1000.0, nonce_burst=1000)
    token = make_jwt({"url": f"https://localhost:{validator.port}/instances/launch_config/cfg-1"})
    statuses = []
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        for _ in range(10):
            r = await c.get("/v1/rint/validator-nonce", headers={"Authorization": token})
            body = await r.json()
            statuses.append(r.status)
            if r.status == 429:
                assert body["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert len(validator.auth_seen) == 4  # only the burst reached the validator
    assert statuses[4:] == [429] * 6
    async with unix_client(svc.cfg.serve.compat_socket) as c:
        node = await (await c.get("/status")).json()
    assert node["counters"]["rate_limited"]["relay"] == 6
