"""When a connection must be closed for taking too long: idle, slow request head, slow request body.

A connection with no request in progress is closed ``idle_s`` after its last complete request (or its
accept); once the first byte of a request arrives, the *whole* request, head and body, must arrive within
``header_s``. Dribbling a byte at a time therefore never keeps a connection past ``idle_s + header_s``
without completing a request. A half-closed connection is closed once everything it sent is answered.

One periodic sweep (:class:`Sweeper`) checks every connection instead of a timer per request, so a
request costs two attribute writes, not timer-heap operations; :func:`verdict` is the decision for one
connection, a pure function of its state and the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

IDLE = "idle"
SLOW_HEAD = "request head not received in time"
SLOW_BODY = "request body not received in time"
#: Half-closed by the caller and everything it sent is answered: close quietly (not a timeout).
ANSWERED = "answered"


class ConnTimes(Protocol):
    busy: bool
    eof: bool
    phase: str  # "idle" between requests, "head" once a request's first byte arrived
    since: float
    payload: Any  # the body stream of the request in progress (``is_eof()``), or None


def verdict(st: ConnTimes, now: float, *, idle_s: float, header_s: float,
            pending: Callable[[], bool]) -> str | None:
    """Why ``st``'s connection must close now (:data:`IDLE`, :data:`SLOW_HEAD`, :data:`SLOW_BODY`,
    :data:`ANSWERED`), or None to keep it. ``pending()``: a parsed request or an answer is still on its way
    (asked only for a half-closed connection)."""
    age = now - st.since
    if st.busy:  # a handler is running; the body must still arrive within the receive window
        payload = st.payload
        if payload is None or payload.is_eof() or age <= header_s:
            return None
        return SLOW_BODY
    if st.eof:
        return None if age <= idle_s and pending() else ANSWERED
    if st.phase == "head":
        return SLOW_HEAD if age > header_s else None
    return IDLE if age > idle_s else None


def sweep_interval(idle_s: float, header_s: float) -> float:
    """A quarter of the shorter window, between 50 ms and 1 s."""
    return max(0.05, min(1.0, header_s / 4, idle_s / 4))


class Sweeper:
    """Runs ``sweep()`` every ``interval`` seconds while it reports connections left to watch."""

    __slots__ = ("_handle", "_loop", "_sweep", "interval")

    def __init__(self, interval: float, sweep: Callable[[], bool]) -> None:
        self.interval = interval
        self._sweep = sweep  # returns True while there is anything left to watch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        if self._handle is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._handle = self._loop.call_later(self.interval, self._run)

    def _run(self) -> None:
        self._handle = None
        if self._sweep():
            self.schedule()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
