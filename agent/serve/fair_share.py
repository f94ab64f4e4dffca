"""Whose request starts next: a bounded number in progress per caller, the rest started in round-robin order.

A connection whose next request's first bytes arrive asks :meth:`FairShare.ask` before a byte reaches
aiohttp. A caller may have ``per_caller`` requests in progress at once (across all its connections), the
socket ``total``; a request over either waits with its bytes unread (the connection stops reading, so
the kernel's buffers and then the caller's own send queue hold the rest of a deep pipeline). When a slot
frees, the waiting callers are served one request each in turn (deficit round robin with a quantum and a
cost of one request: plain round robin), in the order they started waiting, so a caller with a hundred
requests pipelined gets one started for every one of a neighbour with a single request, never a hundred
first. Nothing is refused here and nothing is lost: every waiting request is started in turn.

The caller key is the caller's scope (:attr:`agent.serve.peer.Peer.scope`): every unidentified caller
shares one scope and so one turn. Everything here runs on the event loop; no locks, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

Go = Callable[[], None]


class FairShare:
    """Requests in progress per caller key and the round-robin queue of those waiting for a slot."""

    __slots__ = ("_active", "_queues", "_ring", "per_caller", "running", "total", "waited")

    def __init__(self, *, per_caller: int = 0, total: int = 0) -> None:
        self.per_caller = per_caller  # 0: no per-caller limit
        self.total = total  # 0: no limit for the socket
        self.running = 0
        self.waited = 0  # requests that had to wait for their turn (ever)
        self._active: dict[str, int] = {}
        self._queues: dict[str, deque[Go]] = {}
        self._ring: deque[str] = deque()  # keys with requests waiting, in turn order

    def active(self, key: str) -> int:
        return self._active.get(key, 0)

    def waiting(self, key: str) -> int:
        q = self._queues.get(key)
        return len(q) if q else 0

    def _room(self, key: str) -> bool:
        return (not self.per_caller or self._active.get(key, 0) < self.per_caller) and \
            (not self.total or self.running < self.total)

    def _start(self, key: str) -> None:
        self._active[key] = self._active.get(key, 0) + 1
        self.running += 1

    def ask(self, key: str, go: Go) -> bool:
        """True: start now (the slot is taken). False: ``go()`` is called when this request's turn comes
        (the slot is then already taken for it), unless :meth:`cancel` removes it first."""
        if key not in self._queues and self._room(key):
            self._start(key)
            return True
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            self._ring.append(key)
        q.append(go)
        self.waited += 1
        return False

    def force(self, key: str) -> None:
        """Count a request that is already running (parsed before it could be held back)."""
        self._start(key)

    def done(self, key: str) -> None:
        """A request of ``key`` finished: give its slot back and start the next in turn."""
        n = self._active.get(key, 0) - 1
        if n < 0:
            return
        self.running -= 1
        if n:
            self._active[key] = n
        else:
            del self._active[key]
        self._next()

    def _next(self) -> None:
        ring = self._ring
        for _ in range(len(ring)):
            if self.total and self.running >= self.total:
                return
            key = ring.popleft()
            q = self._queues[key]
            if not self._room(key):
                ring.append(key)  # at its own limit: its turn passes to the next caller
                continue
            go = q.popleft()
            if q:
                ring.append(key)
            else:
                del self._queues[key]
            self._start(key)
            go()

    def cancel(self, key: str, go: Go) -> None:
        """A waiting request's connection closed before its turn."""
        q = self._queues.get(key)
        if q is None:
            return
        try:
            q.remove(go)
        except ValueError:
            return
        if not q:
            del self._queues[key]
            self._ring.remove(key)
