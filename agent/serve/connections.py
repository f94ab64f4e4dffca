"""Per-connection bookkeeping under aiohttp: caller identity once, connection caps, receive/idle timers.

aiohttp's protocol factory is wrapped by a thin :class:`asyncio.Protocol` proxy, so every accepted
connection is seen before aiohttp parses a byte of it: the caller is identified once and cached in
:class:`ConnState` (looked up per request by transport), and connections beyond the caps are closed at once.
The service decides even earlier, on the raw accepted socket (:meth:`ConnTracker.admit`, called by
:mod:`agent.serve.acceptor`), so a refused connection never gets a transport, protocol or aiohttp handler.

Caps (a hostile container must not lock its neighbours out): ``max_connections`` per socket;
``max_per_caller`` per caller scope; ``max_unidentified`` for the one scope shared by every caller that
could not be pinned (see :mod:`agent.serve.peer`); and the last ``reserved`` slots of the socket only go
to callers that hold no connection yet, so callers holding connections can never take the final ones.

Timers: a connection with no request in progress is closed ``idle_timeout_s`` after its last complete
request (or its accept); once the first byte of a request arrives, the *whole* request, head and body,
must arrive within ``header_timeout_s``. Dribbling a byte at a time therefore never keeps a connection
past ``idle_timeout_s + header_timeout_s`` without completing a request.

Edge answers: a request followed by a half-close (``shutdown(SHUT_WR)``) is still answered, then the
connection closes; a half-close in the middle of a request head, or an HTTP/0.9 request line
("GET /\r\n", no version), gets the socket's JSON 400, never a bare body.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.log import get_logger
from agent.serve.errors import ApiError, json_response
from agent.serve.peer import UNKNOWN, Peer, PeerResolver

log = get_logger(__name__)

#: A caller's refused connections are logged at most once per this many seconds (with a count).
REFUSAL_LOG_INTERVAL_S = 1.0


@dataclass(slots=True)
class ConnState:
    peer: Peer
    busy: bool = False
    requests: int = 0
    #: "idle" (between requests) or "head" (bytes of a request head arrived); ``since`` is loop time.
    phase: str = "idle"
    since: float = 0.0
    #: The request body stream of the request in progress (set by the middleware); None between requests.
    payload: Any = None
    #: The peer half-closed its side: answer what it sent, then close.
    eof: bool = False
    #: Counted in its caller's active requests (from a request's first byte until it is answered).
    active: bool = False


class ConnTracker:
    """Shared by all connections of one socket; ``states`` maps transport -> :class:`ConnState`.

    Timeouts are enforced by one periodic sweep (:meth:`sweep`) instead of a timer per request, so a
    request costs two attribute writes here, not timer-heap operations.
    """

    def __init__(
        self, resolver: PeerResolver, *, name: str, max_connections: int,
        idle_timeout_s: float, header_timeout_s: float, max_per_caller: int | None = None,
        max_unidentified: int | None = None, reserved: int = 0, max_scopes: int = 4096,
        max_active_per_caller: int | None = None, rate_per_caller: float = 0.0, burst_per_caller: int = 0,
    ) -> None:
        self.resolver = resolver
        self.name = name
        self.max_connections = max_connections
        #: One caller (container / cgroup scope) may not take every slot from its neighbours.
        self.max_per_caller = max_per_caller or max_connections
        #: All callers that could not be identified share this many connections.
        self.max_unidentified = max_unidentified if max_unidentified is not None else self.max_per_caller
        #: The last ``reserved`` slots (at most a quarter) go only to callers holding none on this socket.
        self.reserved = max(0, min(reserved, max_connections // 4))
        self._scopes: dict[str, int] = {}
        #: Requests one caller may have in progress at once (across its connections); the next request's
        #: bytes wait in the kernel until one is answered, so a flooding caller gets a bounded share of the
        #: event loop, not all of it. Pipelined requests on one connection still run one after another.
        self.max_active_per_caller = max_active_per_caller or 0
        self._active: dict[str, int] = {}
        self._waiting: dict[str, deque[Any]] = {}
        self.held = 0
        #: Requests per second one caller may send (burst ``burst_per_caller``); over it, its next bytes
        #: wait unread until the debt is paid back (0: no limit). Delays, never refuses.
        self.rate_per_caller = rate_per_caller
        self.burst_per_caller = float(max(1, burst_per_caller))
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # scope -> [tokens, last refill]
        self.delayed = 0
        #: Per-caller request counters (``/v1/status`` shows a caller only its own), bounded LRU.
        self.caller_counters: OrderedDict[str, Counter[str]] = OrderedDict()
        self._max_scopes = max_scopes
        #: Renders the JSON error body for requests aiohttp cannot parse (None: aiohttp's own answer).
        self.error_body: Callable[[ApiError], dict[str, str]] | None = None
        self._json_handler_cls: type | None = None
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.states: dict[Any, ConnState] = {}
        self.refused = 0
        #: Connections admitted by :meth:`admit` whose transport is not made yet (they hold their slot).
        self._admitting = 0
        self._refusal_log: dict[str, list[float]] = {}  # scope -> [loop time logged, refused since]
        self.timed_out = 0
        self.bad_http = 0
        self.accepted = 0
        self.draining = False
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

    def connections_of(self, scope: str) -> int:
        return self._scopes.get(scope, 0)

    def counters_of(self, scope: str) -> Counter[str]:
        """This caller's request counters (created on first use; least recently used scopes drop out)."""
        c = self.caller_counters.get(scope)
        if c is None:
            c = self.caller_counters[scope] = Counter()
            if len(self.caller_counters) > self._max_scopes:
                self.caller_counters.popitem(last=False)
        else:
            self.caller_counters.move_to_end(scope)
        return c

    def error_bytes(self, detail: str) -> bytes | None:
        """A complete HTTP/1.1 400 with this socket's JSON error body (None: no renderer configured)."""
        if self.error_body is None:
            return None
        body = json_response(self.error_body(ApiError(400, "bad_http", f"malformed HTTP request ({detail})")),
                             status=400).body
        assert isinstance(body, bytes)
        return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % len(body)) + body

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[..., asyncio.Protocol]:
        """The protocol factory for this socket: ``make()`` (asyncio's accept path: the caps are checked in
        ``connection_made``) or ``make(peer)`` for a socket :meth:`admit` already admitted."""

        def make(peer: Peer | None = None) -> asyncio.Protocol:
            proto = inner()
            if self.error_body is not None:
                # aiohttp answers unparseable HTTP itself (text/plain, a logged traceback); answer in JSON.
                # RequestHandler has __slots__, so swap in a slot-compatible subclass that overrides it.
                if self._json_handler_cls is None:
                    base = type(proto)
                    self._json_handler_cls = type(f"JsonErrors{base.__name__}", (base,), {
                        "__slots__": (), "handle_error": _json_protocol_error(self.name, self.error_body)})
                proto.__class__ = self._json_handler_cls
            return _TrackedProtocol(self, proto, peer)

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
                # a handler is running; the request body must still arrive within the receive window
                payload = st.payload
                if payload is None or payload.is_eof() or now - st.since <= self.header_timeout_s:
                    continue
                why = "request body not received in time"
            elif st.eof:
                if _pending(getattr(transport.get_protocol(), "_inner", None), st) and \
                        now - st.since <= self.idle_timeout_s:
                    continue
                transport.close()  # half-closed and everything it sent has been answered
                continue
            else:
                limit = self.header_timeout_s if st.phase == "head" else self.idle_timeout_s
                if now - st.since <= limit:
                    continue
                why = "request head not received in time" if st.phase == "head" else "idle"
            self.timed_out += 1
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
            if self.rate_per_caller:
                self._charge(st.peer.scope)
            if not st.active and self.max_active_per_caller:  # not counted yet (bytes came in one chunk)
                st.active = True
                self._active[st.peer.scope] = self._active.get(st.peer.scope, 0) + 1
        return st

    # -- per-caller share of the event loop ----------------------------------------------------------
    def _bucket(self, scope: str) -> list[float]:
        assert self._loop is not None
        now = self._loop.time()
        b = self._buckets.get(scope)
        if b is None:
            b = self._buckets[scope] = [self.burst_per_caller, now]
            if len(self._buckets) > self._max_scopes:
                self._buckets.popitem(last=False)
        else:
            b[0] = min(self.burst_per_caller, b[0] + (now - b[1]) * self.rate_per_caller)
            b[1] = now
        return b

    def _charge(self, scope: str) -> None:
        """One request started; the balance may go negative (requests already parsed still run)."""
        self._bucket(scope)[0] -= 1.0

    def debt_wait(self, scope: str) -> float:
        """Seconds until this caller is out of debt (0: its bytes may be read now)."""
        if not self.rate_per_caller or scope not in self._buckets:
            return 0.0
        tokens = self._bucket(scope)[0]
        return -tokens / self.rate_per_caller if tokens < 0 else 0.0

    def may_start(self, st: ConnState, proto: Any) -> bool:
        """A request's first bytes arrived: True to go ahead; False when the caller is at its limit (the
        connection waits, queued, until one of the caller's requests is answered)."""
        if not self.max_active_per_caller or st.active:
            return True
        scope = st.peer.scope
        n = self._active.get(scope, 0)
        if n < self.max_active_per_caller:
            self._active[scope] = n + 1
            st.active = True
            return True
        self.held += 1
        self._waiting.setdefault(scope, deque()).append(proto)
        return False

    def _release(self, st: ConnState) -> None:
        if not st.active:
            return
        st.active = False
        scope = st.peer.scope
        n = self._active.get(scope, 1) - 1
        waiting = self._waiting.get(scope)
        while waiting:
            proto = waiting.popleft()
            if not waiting:
                del self._waiting[scope]
            nst = proto._state
            if nst is not None:
                nst.active = True  # the slot passes straight on
                proto._go()
                return
        if n <= 0:
            self._active.pop(scope, None)
        else:
            self._active[scope] = n

    def request_finished(self, transport: Any, st: ConnState | None) -> None:
        if st is not None and self._loop is not None:
            st.busy = False
            st.payload = None
            if st.active and not getattr(getattr(transport.get_protocol(), "_inner", None), "_messages", None):
                self._release(st)  # (a connection with pipelined requests parsed keeps its slot for them)
            st.phase = "idle"
            st.since = self._loop.time()

    # -- connection lifecycle (called by the proxy) ------------------------------------------------
    def admit(self, sock: Any) -> Peer | None:
        """Decide on a just-accepted raw socket, before any transport or protocol exists for it.

        Returns the caller when admitted (its slot is reserved until :meth:`opened` or :meth:`unadmit`),
        None when refused: counted in :attr:`refused`, logged (rate-limited); the caller closes the socket.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if len(self.states) + self._admitting >= self.max_connections:
            self.refused += 1
            self._log_refusal(None, "connection cap reached", self.max_connections, self.max_connections)
            return None
        peer = self.resolver.resolve(sock)
        held = self._scopes.get(peer.scope, 0)
        cap = self.max_per_caller if peer.identified else self.max_unidentified
        why = ""
        if held >= cap:
            why = "per-caller connection cap reached" if peer.identified else "unidentified-caller cap reached"
        elif held and len(self.states) + self._admitting >= self.max_connections - self.reserved:
            why = "remaining connections are reserved for callers holding none"
        if why:
            self.refused += 1
            self._log_refusal(peer, why, cap, held)
            return None
        self._scopes[peer.scope] = held + 1
        self._admitting += 1
        return peer

    def unadmit(self, peer: Peer) -> None:
        """An admitted socket never became a connection (its transport could not be made)."""
        self._admitting -= 1
        held = self._scopes.get(peer.scope, 1) - 1
        if held <= 0:
            self._scopes.pop(peer.scope, None)
        else:
            self._scopes[peer.scope] = held

    def opened(self, transport: Any, peer: Peer | None = None) -> bool:
        """A transport was made: ``peer`` when :meth:`admit` already admitted its socket, else decide now."""
        if peer is None:
            peer = self.admit(transport.get_extra_info("socket"))
            if peer is None:
                transport.close()
                return False
        assert self._loop is not None
        self._admitting -= 1
        self.states[transport] = ConnState(peer=peer, since=self._loop.time())
        self.accepted += 1
        self._schedule()
        return True

    def _log_refusal(self, peer: Peer | None, why: str, cap: int, held: int) -> None:
        """One ``serve.connection_refused`` event per caller per :data:`REFUSAL_LOG_INTERVAL_S`, carrying
        how many were refused since the last one: a caller retrying thousands of connections a second
        must not buy a log line (JSON rendering and a write, the costliest part of a refusal) with each."""
        assert self._loop is not None
        now = self._loop.time()
        key = peer.scope if peer is not None else ""  # "": the socket's total cap, caller not looked up
        last = self._refusal_log.get(key)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL_S:
            last[1] += 1
            return
        suppressed = int(last[1]) if last is not None else 0
        if len(self._refusal_log) >= self._max_scopes:
            self._refusal_log.clear()
        self._refusal_log[key] = [now, 0]
        if peer is None:
            log.warning("serve.connection_refused", socket=self.name, reason=why, limit=cap,
                        refused_since_last=suppressed)
            return
        log.warning("serve.connection_refused", socket=self.name, reason=why, limit=cap, held=held,
                    peer_pid=peer.pid, peer_uid=peer.uid, scope=peer.scope, refused_since_last=suppressed)

    def data(self, transport: Any) -> None:
        st = self.states.get(transport)
        if st is not None and not st.busy and st.phase == "idle" and self._loop is not None:
            st.phase = "head"
            st.since = self._loop.time()

    def closed(self, transport: Any) -> None:
        st = self.states.pop(transport, None)
        if st is None:
            return
        self._release(st)
        waiting = self._waiting.get(st.peer.scope)
        if waiting:
            proto = transport.get_protocol()
            if proto in waiting:
                waiting.remove(proto)
                if not waiting:
                    del self._waiting[st.peer.scope]
        held = self._scopes.get(st.peer.scope, 1) - 1
        if held <= 0:
            self._scopes.pop(st.peer.scope, None)
        else:
            self._scopes[st.peer.scope] = held


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


#: Bytes a waiting connection may buffer here before it is closed (reading is paused meanwhile).
_MAX_HELD = 1 << 20


def _pending(inner: Any, st: ConnState) -> bool:
    """aiohttp has parsed a request the middleware has not seen yet, or is still writing an answer."""
    return bool(getattr(inner, "_messages", None) or getattr(inner, "_request_in_progress", False)
                or getattr(inner, "_request_count", 0) > st.requests)


def _http09(data: bytes) -> bool:
    """The first line of a request is "METHOD target" with no HTTP version (HTTP/0.9 style)."""
    nl = data.find(b"\n")
    if nl < 0:
        return False
    line = data[:nl].rstrip(b"\r")
    return bool(line) and line.count(b" ") == 1 and not line.endswith(b" ")


class _TrackedProtocol(asyncio.Protocol):
    """Forwards to aiohttp's RequestHandler after the tracker has admitted the connection."""

    __slots__ = ("_admitted", "_held", "_inner", "_now", "_peer", "_state", "_tracker", "_transport")

    def __init__(self, tracker: ConnTracker, inner: Any, peer: Peer | None = None) -> None:
        self._tracker = tracker
        self._inner = inner
        self._peer = peer  # admitted before the transport was made (see agent.serve.acceptor)
        self._admitted = False
        self._transport: Any = None
        self._state: ConnState | None = None  # this connection's entry in tracker.states (no per-chunk lookup)
        self._now: Callable[[], float] | None = None
        self._held: bytearray | None = None  # bytes waiting for the caller's turn (reading is paused)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._tracker.opened(transport, self._peer):
            self._admitted = True
            self._state = self._tracker.state_of(transport)
            self._now = asyncio.get_running_loop().time
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            if self._held is not None:  # still waiting for this caller's turn
                self._held += data
                if len(self._held) > _MAX_HELD:
                    self._transport.close()
                return
            st = self._state  # what ConnTracker.data does, without the dict lookup
            if st is not None and self._tracker.rate_per_caller:
                wait = self._tracker.debt_wait(st.peer.scope)
                if wait > 0:  # over its request rate: read on once the debt is paid back
                    self._tracker.delayed += 1
                    self._held = bytearray(data)
                    self._transport.pause_reading()
                    asyncio.get_running_loop().call_later(wait, self._go)
                    return
            if st is not None and not st.busy and st.phase == "idle" and self._now is not None:
                if not st.active and not self._tracker.may_start(st, self):
                    self._held = bytearray(data)
                    self._transport.pause_reading()
                    return
                st.phase = "head"
                st.since = self._now()
                if _http09(data):
                    self._reject("HTTP/0.9 request line")
                    return
            self._inner.data_received(data)

    def _go(self) -> None:
        """This connection's turn: resume reading and hand over what arrived meanwhile."""
        held, self._held = self._held, None
        if held is None or self._transport.is_closing() or self._state is None:
            return
        self._transport.resume_reading()
        if held:
            self.data_received(bytes(held))

    def _reject(self, detail: str) -> None:
        """Answer with the socket's JSON 400 and close (bytes aiohttp would never turn into a request)."""
        self._tracker.bad_http += 1
        log.info("serve.bad_http", socket=self._tracker.name, status=400, reason=detail)
        answer = self._tracker.error_bytes(detail)
        if answer is not None:
            self._transport.write(answer)
        self._transport.close()  # flushes the answer first

    def eof_received(self) -> bool | None:
        """Half-close: keep the write side open until what was sent is answered."""
        if not self._admitted:
            return None
        st = self._state
        if st is None:
            return None
        st.eof = True
        if self._held is not None:
            return True  # a request is waiting for its caller's turn: answer it, then close
        inner = self._inner
        if st.busy:
            if st.payload is not None and not st.payload.is_eof():
                return None  # the body will never complete: close (the handler sees the disconnect)
            return True  # answered by the running handler; the middleware marks the response final
        if _pending(inner, st):
            return True  # a parsed request is about to run, or its answer is being written
        if st.phase == "head":
            self._reject("connection half-closed in the middle of a request head")
            return True
        return None  # idle: nothing to answer

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
