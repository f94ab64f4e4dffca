"""The per-request wrapper both sockets share: caller identity, body cap, timeout, error shape, accounting.

Every request is counted (per route and status, service-wide and per caller) and handed to
:class:`agent.serve.request_log.RequestLog`, which logs refusals, errors and slow requests as they
happen and sums routine successes into one line per interval; nothing a handler raises becomes a 500
with a stack trace on the wire.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.evidence.quote_queue import RESERVED_LANE, queue_lane
from agent.log import get_logger
from agent.serve.errors import ApiError, json_response
from agent.serve.gate import ServeGate
from agent.serve.peer import UNKNOWN, Peer
from agent.serve.request_log import RequestLog

log = get_logger("agent.serve.request")

PEER_KEY: web.RequestKey[Peer] = web.RequestKey("chutes_attest_peer", Peer)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Renderer = Callable[[ApiError], dict[str, str]]

_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
               414: "uri_too_long", 429: "rate_limited", 431: "headers_too_large"}


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def make_middleware(
    tracker: ServeGate, *, socket_name: str, render: Renderer, max_body: int, timeout_s: float,
    counters: Counter[str], request_log: RequestLog, no_timeout: frozenset[tuple[str, str]] = frozenset(),
    reserved_lane: bool = False,
) -> Middleware:
    """Build the middleware for one socket; ``no_timeout`` lists (method, path) that never wait on I/O.

    ``reserved_lane``: quotes requested through this socket use the quote queue's reserved capacity
    (the compat socket, the validator's own evidence path), set per request in a context variable.

    This runs on every request, so everything that can be looked up once is looked up here.
    """
    record = request_log.record
    now = time.perf_counter
    started = tracker.request_started
    finished = tracker.request_finished
    counter_keys: dict[tuple[str, int], str] = {}  # (route, status) -> counter name; both sets are small
    counters_of = tracker.counters_of

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = now()
        transport = request.transport
        st = started(transport)
        peer = st.peer if st is not None else UNKNOWN
        request[PEER_KEY] = peer
        if st is not None:
            st.payload = request.content  # the tracker's receive timer watches the body arrive
        if reserved_lane:
            queue_lane.set(RESERVED_LANE)
        status = 500
        try:
            try:
                length = request.content_length
                if length is not None and length > max_body:
                    raise ApiError(413, "body_too_large", f"request body over {max_body} bytes")
                if (request.method, request.path) in no_timeout:
                    resp = await handler(request)  # never waits on I/O or a body: no per-request timer
                else:
                    async with asyncio.timeout(timeout_s):
                        resp = await handler(request)
            except ApiError as err:
                resp = json_response(render(err), err.status, err.headers)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = _HTTP_CODES.get(exc.status, "http_error")
                detail = exc.reason if exc.status != 413 else f"request body over {max_body} bytes"
                headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
                resp = json_response(render(ApiError(exc.status, code, detail)), exc.status, headers)
            except TimeoutError:
                timeout_err = ApiError(504, "timeout", f"request took longer than {timeout_s:g}s")
                resp = json_response(render(timeout_err), 504)
            except ConnectionError:
                status = 499  # the caller went away (or was cut off) while its request was read
                raise
            except Exception as exc:  # last resort: log the type, never leak a traceback to the caller
                log.error("serve.internal_error", socket=socket_name, route=_route_name(request),
                          error_type=type(exc).__name__, exc_info=True)
                resp = json_response(render(ApiError(500, "internal", "internal error")), 500)
            status = resp.status
            if tracker.draining or (st is not None and st.eof):
                resp.force_close()  # no further keep-alive requests while shutting down
            return resp
        except asyncio.CancelledError:
            status = 499  # the connection went away (or drain timed out) mid-request
            raise
        finally:
            duration_ms = round((now() - start) * 1_000_000) / 1000  # ms to the µs; round(x, 3) costs more
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"  # _route_name, inlined
            key = counter_keys.get((route, status))
            if key is None:
                key = counter_keys[(route, status)] = f"{socket_name} {route} {status}"
            counters[key] += 1
            counters_of(peer.scope)[key] += 1
            record(socket_name, request.method, route, status, duration_ms, peer)
            finished(transport, st)

    return middleware


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; 400 naming the problem otherwise (413 comes from the size cap)."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError(400, "bad_json", "body: expected a JSON object, got an empty body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body: not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "body: JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", f"body: expected a JSON object, got {type(data).__name__}")
    return data
