"""Per-connection bookkeeping under aiohttp: peer credentials once, a connection cap, header/idle timers.

aiohttp's protocol factory is wrapped by a thin :class:`asyncio.Protocol` proxy, so every accepted
connection is seen before aiohttp parses a byte of it: SO_PEERCRED is read once and cached in
:class:`ConnState` (looked up per request by transport), connections beyond the cap are closed at once,
and a connection that stays idle, or sends a request head too slowly, is closed by a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.log import get_logger
from agent.serve.errors import ApiError, json_response
from agent.serve.peer import UNKNOWN, Peer, PeerResolver

log = get_logger(__name__)


@dataclass(slots=True)
class ConnState:
    peer: Peer
    busy: bool = False
    requests: int = 0
    #: "idle" (between requests) or "head" (bytes of a request head arrived); ``since`` is loop time.
    phase: str = "idle"
    since: float = 0.0


class ConnTracker:
    """Shared by all connections of one socket; ``states`` maps transport -> :class:`ConnState`.

    Timeouts are enforced by one periodic sweep (:meth:`sweep`) instead of a timer per request, so a
    request costs two attribute writes here, not timer-heap operations.
    """

    def __init__(
        self, resolver: PeerResolver, *, name: str, max_connections: int,
        idle_timeout_s: float, header_timeout_s: float, max_per_caller: int | None = None,
    ) -> None:
        self.resolver = resolver
        self.name = name
        self.max_connections = max_connections
        #: One caller (container / uid scope) may not take every slot from its neighbours.
        self.max_per_caller = max_per_caller or max_connections
        self._scopes: dict[str, int] = {}
        #: Renders the JSON error body for requests aiohttp cannot parse (None: aiohttp's own answer).
        self.error_body: Callable[[ApiError], dict[str, str]] | None = None
        self._json_handler_cls: type | None = None
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.states: dict[Any, ConnState] = {}
        self.refused = 0
        self.timed_out = 0
        self.accepted = 0
        self.draining = False
        self._pids: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def sweep_interval_s(self) -> float:
        return max(0.05, min(1.0, self.header_timeout_s / 4, self.idle_timeout_s / 4))

    def busy_count(self) -> int:
        return sum(1 for st in self.states.values() if st.busy)

    def start_drain(self) -> None:
        """Stop keep-alive reuse and close connections that have no request in progress."""
        self.draining = True
        for transport, st in list(self.states.items()):
            if not st.busy:
                transport.close()

    def state_of(self, transport: Any) -> ConnState | None:
        return self.states.get(transport)

    def peer_of(self, transport: Any) -> Peer:
        st = self.states.get(transport)
        return st.peer if st is not None else UNKNOWN

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            proto = inner()
            if self.error_body is not None:
                # aiohttp answers unparseable HTTP itself (text/plain, a logged traceback); answer in JSON.
                # RequestHandler has __slots__, so swap in a slot-compatible subclass that overrides it.
                if self._json_handler_cls is None:
                    base = type(proto)
                    self._json_handler_cls = type(f"JsonErrors{base.__name__}", (base,), {
                        "__slots__": (), "handle_error": _json_protocol_error(self.name, self.error_body)})
                proto.__class__ = self._json_handler_cls
            return _TrackedProtocol(self, proto)

        return make

    # -- timeouts -----------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._sweeper is None and self._loop is not None:
            self._sweeper = self._loop.call_later(self.sweep_interval_s, self.sweep)

    def sweep(self) -> None:
        """Close connections idle too long, or whose request head is arriving too slowly."""
        self._sweeper = None
        if self._loop is None:
            return
        now = self._loop.time()
        for transport, st in list(self.states.items()):
            if st.busy:
                continue
            limit = self.header_timeout_s if st.phase == "head" else self.idle_timeout_s
            if now - st.since > limit:
                self.timed_out += 1
                why = "request head not received in time" if st.phase == "head" else "idle"
                log.info("serve.connection_timeout", socket=self.name, reason=why, peer_pid=st.peer.pid)
                transport.close()
        if self.states:
            self._schedule()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- requests (called by the middleware) --------------------------------------------------------
    def request_started(self, transport: Any) -> ConnState | None:
        st = self.states.get(transport)
        if st is not None:
            st.busy = True
            st.requests += 1
        return st

    def request_finished(self, transport: Any, st: ConnState | None) -> None:
        if st is not None and self._loop is not None:
            st.busy = False
            st.phase = "idle"
            st.since = self._loop.time()

    # -- connection lifecycle (called by the proxy) ------------------------------------------------
    def opened(self, transport: Any) -> bool:
        if len(self.states) >= self.max_connections:
            self.refused += 1
            log.warning("serve.connection_refused", socket=self.name, reason="connection cap reached",
                        limit=self.max_connections)
            transport.close()
            return False
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        peer = self.resolver.resolve(transport.get_extra_info("socket"))
        held = self._scopes.get(peer.scope, 0)
        if held >= self.max_per_caller:
            self.refused += 1
            log.warning("serve.connection_refused", socket=self.name, reason="per-caller connection cap reached",
                        limit=self.max_per_caller, peer_pid=peer.pid, peer_uid=peer.uid, scope=peer.scope)
            transport.close()
            return False
        self._scopes[peer.scope] = held + 1
        self.states[transport] = ConnState(peer=peer, since=self._loop.time())
        self._pids[peer.pid] = self._pids.get(peer.pid, 0) + 1
        self.accepted += 1
        self._schedule()
        return True

    def data(self, transport: Any) -> None:
        st = self.states.get(transport)
        if st is not None and not st.busy and st.phase == "idle" and self._loop is not None:
            st.phase = "head"
            st.since = self._loop.time()

    def closed(self, transport: Any) -> None:
        st = self.states.pop(transport, None)
        if st is None:
            return
        held = self._scopes.get(st.peer.scope, 1) - 1
        if held <= 0:
            self._scopes.pop(st.peer.scope, None)
        else:
            self._scopes[st.peer.scope] = held
        left = self._pids.get(st.peer.pid, 1) - 1
        if left <= 0:
            self._pids.pop(st.peer.pid, None)
            self.resolver.forget(st.peer.pid)
        else:
            self._pids[st.peer.pid] = left


def _json_protocol_error(socket_name: str, render: Callable[[ApiError], dict[str, str]]) -> Callable[..., Any]:
    """A replacement for aiohttp's ``RequestHandler.handle_error``: same contract, JSON body, no traceback,
    and the raw request line is never echoed back."""

    def handle_error(self: Any, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.info("serve.bad_http", socket=socket_name, status=status, reason=type(exc).__name__ if exc else "")
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        if status >= 500:
            err = ApiError(500, "internal_error", "internal error")
        else:
            err = ApiError(status, "bad_http", f"malformed HTTP request ({type(exc).__name__ if exc else status})")
        resp = json_response(render(err), status=err.status)
        resp.force_close()
        return resp

    return handle_error


class _TrackedProtocol(asyncio.Protocol):
    """Forwards to aiohttp's RequestHandler after the tracker has admitted the connection."""

    __slots__ = ("_admitted", "_inner", "_now", "_state", "_tracker", "_transport")

    def __init__(self, tracker: ConnTracker, inner: Any) -> None:
        self._tracker = tracker
        self._inner = inner
        self._admitted = False
        self._transport: Any = None
        self._state: ConnState | None = None  # this connection's entry in tracker.states (no per-chunk lookup)
        self._now: Callable[[], float] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._tracker.opened(transport):
            self._admitted = True
            self._state = self._tracker.state_of(transport)
            self._now = asyncio.get_running_loop().time
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            st = self._state  # what ConnTracker.data does, without the dict lookup
            if st is not None and not st.busy and st.phase == "idle" and self._now is not None:
                st.phase = "head"
                st.since = self._now()
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._tracker.closed(self._transport)
            self._state = None
            self._inner.connection_lost(exc)
