"""GateProtocol holding a request that waits for its caller's turn: buffered without a syscall while it
is small, reading paused once a deep pipeline passes HOLD_PAUSE_BYTES, the connection closed past
MAX_HELD_BYTES, and every byte handed to aiohttp, in order, when the turn comes.

The gate and transport are small fakes that record what the protocol asks of them; FairShare is real.
"""

from __future__ import annotations

from typing import Any

from agent.serve.fair_share import FairShare
from agent.serve.gate import HOLD_PAUSE_BYTES, MAX_HELD_BYTES, ConnState, GateProtocol
from agent.serve.peer import Peer

PEER = Peer(pid=7, uid=0, gid=0, container="c" * 64)


class Transport:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed = False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class Inner:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.data.append(data)


class Gate:
    """What GateProtocol reads of a ServeGate: one request slot in all, no pacing."""

    name = "chute"
    pacing = None
    delayed = 0
    bad_http = 0

    def __init__(self) -> None:
        self.fair = FairShare(per_caller=1)

    def opened(self, transport: Any, proto: GateProtocol, peer: Peer | None) -> ConnState:
        return ConnState(peer=PEER, key=PEER.scope, proto=proto)

    def closed(self, transport: Any) -> None:
        pass


def waiting_connection() -> tuple[GateProtocol, Transport, Inner, Gate]:
    """A connection whose caller already has its one request in progress elsewhere."""
    gate, inner, transport = Gate(), Inner(), Transport()
    assert gate.fair.ask(PEER.scope, lambda: None)  # the caller's only slot is taken
    proto = GateProtocol(gate, inner, PEER)  # type: ignore[arg-type]
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, inner, gate


async def test_a_small_waiting_request_costs_no_pause_and_arrives_whole_on_its_turn() -> None:
    proto, transport, inner, gate = waiting_connection()
    head = b"POST /v1/rint/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    proto.data_received(head[:20])
    proto.data_received(head[20:])
    assert inner.data == [] and transport.calls == []  # held, and no pause_reading syscall for it
    gate.fair.done(PEER.scope)  # the caller's other request finished: this one's turn
    assert inner.data == [head] and transport.calls == []


async def test_a_deep_pipeline_stops_being_read_past_the_threshold() -> None:
    proto, transport, inner, gate = waiting_connection()
    chunk = b"x" * 1024
    for _ in range(HOLD_PAUSE_BYTES // len(chunk)):
        proto.data_received(chunk)
    assert transport.calls == []  # exactly at the threshold: still reading
    proto.data_received(chunk)
    assert transport.calls == ["pause"]
    proto.data_received(chunk)  # what the kernel already had in flight: buffered, no second pause
    assert transport.calls == ["pause"]
    gate.fair.done(PEER.scope)
    assert transport.calls == ["pause", "resume"]
    assert b"".join(inner.data) == chunk * (HOLD_PAUSE_BYTES // len(chunk) + 2)


async def test_a_connection_buffering_past_the_cap_is_closed() -> None:
    proto, transport, _inner, _gate = waiting_connection()
    proto.data_received(b"y" * MAX_HELD_BYTES)
    assert not transport.closed
    proto.data_received(b"y")
    assert transport.closed
