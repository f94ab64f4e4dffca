"""One socket's gate: every connection is admitted, paced, timed and counted here before aiohttp sees it.

:class:`ServeGate` composes the parts, each its own module and tested alone:

- :mod:`agent.serve.admission`: who may hold a connection (capacity partitioned by caller class, fair
  per caller inside, room kept for new callers), decided on the raw accepted socket
  (:meth:`ServeGate.admit`, called by :mod:`agent.serve.acceptor`), so a refused connection never gets
  a transport, protocol or aiohttp handler;
- :mod:`agent.serve.fair_share`: whose request starts next (a bounded number in progress per caller, the
  rest in round-robin order, their bytes unread meanwhile);
- :class:`agent.serve.ratelimit.KeyedLimiter` as request pacing: a caller over
  ``serve.requests_per_caller_per_s`` has its next bytes wait unread until it is back within the rate
  (delayed, never refused);
- :mod:`agent.serve.timeouts`: idle / slow head / slow body, one periodic sweep;
- :mod:`agent.serve.aiohttp_adapter`: the aiohttp internals all this needs.

aiohttp's protocol factory is wrapped by :class:`GateProtocol`, a thin :class:`asyncio.Protocol` proxy:
the caller is identified once (cached in :class:`ConnState`, looked up per request by transport).

Edge answers: a request followed by a half-close (``shutdown(SHUT_WR)``) is still answered, then the
connection closes; a half-close in the middle of a request head, or an HTTP/0.9 request line
("GET /\\r\\n", no version), gets the socket's JSON 400, never a bare body.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from agent.log import get_logger
from agent.serve import aiohttp_adapter as adapter
from agent.serve import timeouts
from agent.serve.admission import Admission, Partition, Refusal, caller_key
from agent.serve.errors import ApiError, json_response
from agent.serve.fair_share import FairShare
from agent.serve.peer import UNIDENTIFIED, Peer, PeerResolver
from agent.serve.ratelimit import KeyedLimiter

if TYPE_CHECKING:
    from agent.config import ServeConfig

log = get_logger(__name__)

#: A caller's refused (or evicted) connections are logged at most once per this many seconds, with a count.
REFUSAL_LOG_INTERVAL_S = 1.0
#: Bytes a waiting connection may buffer here before it is closed (reading is paused meanwhile).
MAX_HELD_BYTES = 1 << 20
#: A waiting connection's reading is paused once it has buffered this much: a request waiting its turn is
#: usually one small head (no syscalls to pause and resume for it), a deep pipeline stops being read here
#: (at most this much per connection in memory, the rest in the kernel's and the caller's buffers).
HOLD_PAUSE_BYTES = 8192


@dataclass(slots=True, eq=False)
class ConnState:
    peer: Peer
    key: str  # admission's caller key (agent.serve.admission.caller_key)
    proto: GateProtocol
    busy: bool = False
    requests: int = 0
    #: "idle" (between requests) or "head" (bytes of a request arrived); ``since`` is loop time.
    phase: str = "idle"
    since: float = 0.0
    #: The request body stream of the request in progress (set by the middleware); None between requests.
    payload: Any = None
    #: The peer half-closed its side: answer what it sent, then close.
    eof: bool = False
    #: Holds one of its caller's request slots (agent.serve.fair_share), from a request's first byte on.
    active: bool = False
    #: Its next request's bytes wait, unread, for a slot.
    waiting: bool = False
    #: Its admission slot was given back early (evicted to make room for a new caller).
    released: bool = False


class RefusalLog:
    """One ``serve.connection_refused`` event per caller per :data:`REFUSAL_LOG_INTERVAL_S`, carrying how
    many were refused since the last one: a caller retrying thousands of connections a second must not buy
    a log line (JSON rendering and a write, the costliest part of a refusal) with each. Bounded."""

    def __init__(self, socket_name: str, max_keys: int) -> None:
        self._name = socket_name
        self._max = max_keys
        self._last: dict[str, list[float]] = {}  # key -> [loop time logged, refused since]

    def refused(self, now: float, peer: Peer, why: Refusal, event: str = "serve.connection_refused") -> None:
        key = f"{event} {peer.scope}"
        last = self._last.get(key)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL_S:
            last[1] += 1
            return
        if len(self._last) >= self._max:
            self._last.clear()
        self._last[key] = [now, 0]
        log.warning(event, socket=self._name, reason=why.reason, limit=why.limit, held=why.held,
                    peer_pid=peer.pid, peer_uid=peer.uid, scope=peer.scope, caller_class=peer.caller_class,
                    refused_since_last=int(last[1]) if last is not None else 0)


class ServeGate:
    """Shared by all connections of one socket; ``states`` maps transport -> :class:`ConnState`."""

    def __init__(self, resolver: PeerResolver, *, name: str, partition: Partition, per_caller: int,
                 reserved: int, idle_timeout_s: float, header_timeout_s: float, fair: FairShare | None = None,
                 pacing: KeyedLimiter | None = None, max_scopes: int = 4096) -> None:
        self.resolver = resolver
        self.name = name
        self.admission = Admission(partition, per_caller=per_caller, reserved=reserved)
        self.fair = fair or FairShare()
        self.pacing = pacing
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self._sweeper = timeouts.Sweeper(timeouts.sweep_interval(idle_timeout_s, header_timeout_s), self.sweep)
        self.states: dict[Any, ConnState] = {}
        self._by_key: dict[str, dict[Any, ConnState]] = {}  # caller key -> its connections, oldest first
        #: Per-caller request counters (``/v1/status`` shows a caller only its own), bounded LRU.
        self.caller_counters: OrderedDict[str, Counter[str]] = OrderedDict()
        self._max_scopes = max_scopes
        self._refusals = RefusalLog(name, max_scopes)
        #: Renders the JSON error body for requests aiohttp cannot parse (None: aiohttp's own answer).
        self.error_body: Callable[[ApiError], dict[str, str]] | None = None
        self._json_errors: adapter.JsonErrors | None = None
        self.accepted = self.refused = self.evicted = self.timed_out = self.bad_http = self.delayed = 0
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_socket(cls, name: str, s: ServeConfig, resolver: PeerResolver | None = None) -> ServeGate:
        """The gate for one socket, from ``[serve]``."""
        partition = Partition.split(s.max_connections, containers=s.connections_share_containers,
                                    host=s.connections_share_host, unidentified=s.max_connections_unidentified)
        pacing = (KeyedLimiter(s.requests_per_caller_per_s, max(1, s.requests_per_caller_burst))
                  if s.requests_per_caller_per_s > 0 else None)
        return cls(resolver or PeerResolver(), name=name, partition=partition,
                   per_caller=s.max_connections_per_caller, reserved=s.connections_reserved_for_new_callers,
                   idle_timeout_s=s.idle_timeout_s, header_timeout_s=s.header_timeout_s,
                   fair=FairShare(per_caller=s.max_active_requests_per_caller, total=s.max_active_requests),
                   pacing=pacing)

    # -- the middleware's view -------------------------------------------------------------------------
    def busy_count(self) -> int:
        return sum(1 for st in self.states.values() if st.busy)

    def connections_of(self, scope: str) -> int:
        if scope == UNIDENTIFIED:  # unidentified callers share one scope: the lane's connections
            return self.admission.budget.held[UNIDENTIFIED]
        return len(self._by_key.get(scope, ()))

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

    def request_started(self, transport: Any) -> ConnState | None:
        st = self.states.get(transport)
        if st is not None:
            st.busy = True
            st.requests += 1
            if self.pacing is not None:
                self.pacing.charge(st.peer.scope)
            if not st.active:  # not counted yet (a pipelined request parsed with the previous one)
                st.active = True
                self.fair.force(st.peer.scope)
        return st

    def request_finished(self, transport: Any, st: ConnState | None) -> None:
        if st is not None and self._loop is not None:
            st.busy = False
            st.payload = None
            # a connection with pipelined requests already parsed keeps its slot for them
            if st.active and not adapter.has_parsed_requests(st.proto.inner):
                st.active = False
                self.fair.done(st.peer.scope)
            st.phase = "idle"
            st.since = self._loop.time()

    def start_drain(self) -> None:
        """Stop keep-alive reuse and close connections that have no request in progress."""
        self.draining = True
        for transport, st in list(self.states.items()):
            if not st.busy:
                transport.close()

    def close(self) -> None:
        self._sweeper.cancel()

    # -- connection lifecycle --------------------------------------------------------------------------
    def admit(self, sock: Any) -> Peer | None:
        """Decide on a just-accepted raw socket, before any transport or protocol exists for it.

        Returns the caller when admitted (its slot is held until :meth:`closed` or :meth:`unadmit`),
        None when refused: counted in :attr:`refused`, logged (rate-limited); the caller closes the socket.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        peer = self.resolver.resolve(sock)
        why = self.admission.admit(peer.caller_class, caller_key(peer), self._evict)
        if why is None:
            return peer
        self.refused += 1
        self._refusals.refused(self._loop.time(), peer, why)
        return None

    def unadmit(self, peer: Peer) -> None:
        """An admitted socket never became a connection (its transport could not be made)."""
        self.admission.release(peer.caller_class, caller_key(peer))

    def _evict(self, klass: str, key: str) -> bool:
        """Close the oldest idle connection of ``key`` to make room for a new caller (see admission)."""
        idle = next(((t, st) for t, st in self._by_key.get(key, {}).items()
                     if not (st.busy or st.active or st.waiting or st.eof) and st.phase == "idle"), None)
        if idle is not None:
            transport, st = idle
            self._forget(transport, st)
            self.admission.release(klass, key)
            st.released = True
            self.evicted += 1
            assert self._loop is not None
            self._refusals.refused(self._loop.time(), st.peer, Refusal(
                "idle connection closed to make room for a caller holding none", 0, 0), "serve.connection_evicted")
            transport.close()
            return True
        return False

    def opened(self, transport: Any, proto: GateProtocol, peer: Peer | None) -> ConnState | None:
        """A transport was made: ``peer`` when :meth:`admit` already admitted its socket, else decide now."""
        if peer is None:
            peer = self.admit(transport.get_extra_info("socket"))
            if peer is None:
                transport.close()
                return None
        assert self._loop is not None
        st = ConnState(peer=peer, key=caller_key(peer), proto=proto, since=self._loop.time())
        self.states[transport] = st
        self._by_key.setdefault(st.key, {})[transport] = st
        self.accepted += 1
        self._sweeper.schedule()
        return st

    def _forget(self, transport: Any, st: ConnState) -> None:
        mine = self._by_key.get(st.key)
        if mine is not None:
            mine.pop(transport, None)
            if not mine:
                del self._by_key[st.key]

    def closed(self, transport: Any) -> None:
        st = self.states.pop(transport, None)
        if st is None:
            return
        scope = st.peer.scope
        if st.active:
            st.active = False
            self.fair.done(scope)
        if st.waiting:
            st.waiting = False
            self.fair.cancel(scope, st.proto.granted)
        if not st.released:
            self._forget(transport, st)
            self.admission.release(st.peer.caller_class, st.key)

    # -- timeouts ----------------------------------------------------------------------------------------
    def sweep(self) -> bool:
        """Close connections idle too long, or whose request is arriving too slowly; True while any is left."""
        if self._loop is None:
            return False
        now = self._loop.time()
        idle_s, header_s = self.idle_timeout_s, self.header_timeout_s
        for transport, st in list(self.states.items()):
            why = timeouts.verdict(st, now, idle_s=idle_s, header_s=header_s,
                                   pending=partial(adapter.has_unanswered, st.proto.inner, st.requests))
            if why is None:
                continue
            if why != timeouts.ANSWERED:
                self.timed_out += 1
                log.info("serve.connection_timeout", socket=self.name, reason=why, peer_pid=st.peer.pid)
            transport.close()
        return bool(self.states)

    # -- the protocol --------------------------------------------------------------------------------------
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
        """The protocol factory for this socket: ``make()`` (asyncio's accept path: admission is decided in
        ``connection_made``) or ``make(peer)`` for a socket :meth:`admit` already admitted."""

        def make(peer: Peer | None = None) -> asyncio.Protocol:
            proto = inner()
            if self.error_body is not None:
                # aiohttp answers unparseable HTTP itself (text/plain, a logged traceback); answer in JSON
                if self._json_errors is None:
                    self._json_errors = adapter.JsonErrors(self.name, self.error_body)
                self._json_errors.install(proto)
            return GateProtocol(self, proto, peer)

        return make


def _http09(data: bytes) -> bool:
    """The first line of a request is "METHOD target" with no HTTP version (HTTP/0.9 style)."""
    nl = data.find(b"\n")
    if nl < 0:
        return False
    line = data[:nl].rstrip(b"\r")
    return bool(line) and line.count(b" ") == 1 and not line.endswith(b" ")


class GateProtocol(asyncio.Protocol):
    """Forwards to aiohttp's RequestHandler once the gate has admitted the connection; holds a request's
    bytes back (reading paused) while its caller is over its rate or has no request slot free."""

    __slots__ = ("_gate", "_held", "_held_len", "_now", "_paused", "_peer", "_state", "_transport", "inner",
                 "opened")

    def __init__(self, gate: ServeGate, inner: Any, peer: Peer | None = None) -> None:
        self._gate = gate
        self.inner = inner
        self._peer = peer  # admitted before the transport was made (see agent.serve.acceptor)
        self._transport: Any = None
        self._state: ConnState | None = None  # this connection's entry in gate.states (no per-chunk lookup)
        self._now: Callable[[], float] = asyncio.get_running_loop().time
        self._held: list[bytes] | None = None  # chunks waiting for the caller's turn
        self._held_len = 0
        self._paused = False  # reading paused by the gate (a deep pipeline is waiting)
        #: The gate took the connection over (its admission slot is now given back when it closes).
        self.opened = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._state = self._gate.opened(transport, self, self._peer)
        if self._state is not None:
            self.opened = True
            self.inner.connection_made(transport)

    def _hold(self, data: bytes) -> None:
        self._held = [data]
        self._held_len = len(data)
        if self._held_len > HOLD_PAUSE_BYTES:
            self._pause()

    def _pause(self) -> None:
        self._paused = True
        self._transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        st = self._state
        if st is None:
            return
        held = self._held
        if held is not None:  # still waiting for this caller's turn
            held.append(data)
            self._held_len += len(data)
            if self._held_len > MAX_HELD_BYTES:
                self._transport.close()
            elif self._held_len > HOLD_PAUSE_BYTES and not self._paused:
                self._pause()
            return
        gate = self._gate
        if gate.pacing is not None:
            wait = gate.pacing.debt_s(st.peer.scope)
            if wait > 0:  # over its request rate: read on once the debt is paid back
                gate.delayed += 1
                self._hold(data)
                asyncio.get_running_loop().call_later(wait, self._go)
                return
        if not st.busy and st.phase == "idle":
            if not st.active:
                if not gate.fair.ask(st.peer.scope, self.granted):
                    st.waiting = True
                    self._hold(data)
                    return
                st.active = True
            st.phase = "head"
            st.since = self._now()
            if _http09(data):
                self._reject("HTTP/0.9 request line")
                return
        self.inner.data_received(data)

    def granted(self) -> None:
        """This connection's request got its slot (:class:`~agent.serve.fair_share.FairShare`)."""
        st = self._state
        if st is not None:
            st.waiting = False
            st.active = True
        self._go()

    def _go(self) -> None:
        """Resume reading and hand over what arrived meanwhile."""
        held, self._held = self._held, None
        if held is None or self._transport.is_closing() or self._state is None:
            return
        if self._paused:
            self._paused = False
            self._transport.resume_reading()
        data = held[0] if len(held) == 1 else b"".join(held)
        if data:
            self.data_received(data)

    def _reject(self, detail: str) -> None:
        """Answer with the socket's JSON 400 and close (bytes aiohttp would never turn into a request)."""
        self._gate.bad_http += 1
        log.info("serve.bad_http", socket=self._gate.name, status=400, reason=detail)
        answer = self._gate.error_bytes(detail)
        if answer is not None:
            self._transport.write(answer)
        self._transport.close()  # flushes the answer first

    def eof_received(self) -> bool | None:
        """Half-close: keep the write side open until what was sent is answered."""
        st = self._state
        if st is None:
            return None
        st.eof = True
        if self._held is not None:
            return True  # a request is waiting for its caller's turn: answer it, then close
        if st.busy:
            if st.payload is not None and not st.payload.is_eof():
                return None  # the body will never complete: close (the handler sees the disconnect)
            return True  # answered by the running handler; the middleware marks the response final
        if adapter.has_unanswered(self.inner, st.requests):
            return True  # a parsed request is about to run, or its answer is being written
        if st.phase == "head":
            self._reject("connection half-closed in the middle of a request head")
            return True
        return None  # idle: nothing to answer

    def pause_writing(self) -> None:
        if self._state is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._state is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is not None:
            self._gate.closed(self._transport)
            self._state = None
            self.inner.connection_lost(exc)
