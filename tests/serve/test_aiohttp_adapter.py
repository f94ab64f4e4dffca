"""The aiohttp internals the service relies on, checked against the installed aiohttp."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web, web_protocol

from agent.serve import aiohttp_adapter as adapter
from agent.serve.errors import ApiError


def test_installed_aiohttp_is_in_the_tested_range_and_the_check_bites() -> None:
    adapter.check_version(aiohttp.__version__)
    for ok in ("3.9.0", "3.14.5", "3.14.0rc1"):
        adapter.check_version(ok)
    for bad in ("3.8.6", "3.15.0", "4.0.0", "nonsense"):
        with pytest.raises(adapter.UntestedAiohttpError):
            adapter.check_version(bad)


def test_request_handler_still_has_the_private_state_we_read() -> None:
    slots = {s for cls in web_protocol.RequestHandler.__mro__ for s in getattr(cls, "__slots__", ())}
    assert {"_messages", "_request_in_progress", "_request_count"} <= slots
    assert "handle_error" in vars(web_protocol.RequestHandler)


async def _handler(app: web.Application) -> web_protocol.RequestHandler:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    proto = runner.server()
    await runner.cleanup()
    return proto


async def test_json_errors_swaps_a_slot_compatible_class() -> None:
    handler = await _handler(web.Application())
    assert not adapter.has_parsed_requests(handler) and not adapter.has_unanswered(handler, 0)
    errors = adapter.JsonErrors("chute", lambda e: {"error": e.code, "detail": e.detail})
    errors.install(handler)
    assert type(handler).__name__ == "JsonErrorsRequestHandler"
    assert isinstance(handler, web_protocol.RequestHandler)
    other = await _handler(web.Application())
    errors.install(other)
    assert type(other) is type(handler)  # one subclass per socket


async def test_bad_http_is_answered_in_the_sockets_json() -> None:
    """A real request head aiohttp cannot parse, through a real unix socket."""
    import tempfile
    from pathlib import Path

    app = web.Application()
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    errors = adapter.JsonErrors("chute", lambda e: {"error": e.code, "detail": e.detail})
    server = runner.server

    def factory() -> web_protocol.RequestHandler:
        h = server()
        errors.install(h)
        return h

    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "s.sock")
        srv = await asyncio.get_running_loop().create_unix_server(factory, path)
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
        finally:
            srv.close()
            await srv.wait_closed()
            await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")) and b"application/json" in head.lower()
    assert b'"error": "bad_http"' in body or b'"error":"bad_http"' in body
    assert b"Bad Header" not in body
    assert ApiError(400, "x", "y").status == 400
