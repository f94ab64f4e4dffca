"""Accepting on a listening unix socket ourselves, so a refused connection costs a syscall or three.

asyncio's own accept path (``create_unix_server``) makes a task, a transport and a protocol (aiohttp's
``RequestHandler``) for every accepted socket before anything can look at it. A hostile container that
reconnects as fast as it can once over its connection cap (tens of thousands of times a minute) then
buys all of that with each attempt, on the event loop every neighbour shares.

Here the listening socket is watched with ``loop.add_reader``; each wake-up accepts until the listen
queue is empty (``EAGAIN``), or for at most :data:`ACCEPT_BUDGET_S` of loop time and one backlog's worth
of sockets, whichever comes first, so a connect/close loop cannot keep the queue full for everyone else
(with a fixed 16 per wake-up it did: a new container's non-blocking ``connect()`` then failed with
``EAGAIN``) and a reconnect storm still interleaves with everyone else's callbacks. Each caller is
identified on the raw socket (``SO_PEERCRED`` / ``SO_PEERPIDFD`` via
:class:`~agent.serve.peer.PeerResolver`, through :meth:`~agent.serve.gate.ServeGate.admit`) and a refused
one is closed right there (counted in the gate's ``refused``, logged rate-limited); one whose caller has
already closed its end without sending a byte (a connect/close loop) is closed before even that, for one
``recv(MSG_PEEK)``. Only admitted sockets
become connections, through ``loop.connect_accepted_socket`` with the gate's protocol factory around
aiohttp's server, so they are served exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Any

from agent.log import get_logger
from agent.serve.gate import ServeGate
from agent.serve.peer import Peer

log = get_logger(__name__)

#: Most sockets accepted per wake-up (one listen backlog's worth, as asyncio's own accept path does).
ACCEPT_BATCH = 4096
#: Loop time one wake-up may spend accepting before it yields to other callbacks (checked every
#: :data:`_CLOCK_EVERY` sockets); the reader fires again at once if the queue is not empty.
ACCEPT_BUDGET_S = 0.002
_CLOCK_EVERY = 16
#: Out of file descriptors / memory: stop accepting this long (as asyncio does), then try again.
ACCEPT_RETRY_DELAY_S = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _hung_up(conn: socket.socket) -> bool:
    """The caller has closed its end and sent nothing (one ``recv(MSG_PEEK)``; data stays queued)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # reset: gone too


class Acceptor:
    """Serves one listening socket: admits or refuses each connection before asyncio/aiohttp see it."""

    def __init__(self, sock: socket.socket, tracker: ServeGate, factory: Callable[..., asyncio.Protocol],
                 *, batch: int = ACCEPT_BATCH, budget_s: float = ACCEPT_BUDGET_S) -> None:
        self._sock = sock
        self._tracker = tracker
        self._factory = factory  # ServeGate.factory(aiohttp server): make(peer) -> protocol
        self._batch = batch
        self._budget_s = budget_s
        self.wakeups = 0
        #: Sockets whose caller had already closed its end when accepted (a connect/close loop's).
        self.hung_up = 0
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        tracker = self._tracker
        self.wakeups += 1
        clock = self._loop.time
        until = clock() + self._budget_s
        for i in range(1, self._batch + 1):
            if i % _CLOCK_EVERY == 0 and clock() > until:
                return  # the queue is not empty: the reader fires again on the next loop iteration
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.warning("serve.accept_paused", socket=tracker.name, reason=exc.strerror,
                                retry_s=ACCEPT_RETRY_DELAY_S)
                    self._loop.remove_reader(self._fd)
                    self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume)
                    return
                continue  # e.g. ECONNABORTED: that caller is gone; take the next one
            if _hung_up(conn):
                self.hung_up += 1
                conn.close()  # connected and closed again before we got to it: nothing to answer
                continue
            try:
                peer = tracker.admit(conn)
            except Exception:
                conn.close()
                raise
            if peer is None:
                conn.close()  # refused: no transport, protocol, task or aiohttp handler was made
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, peer: Peer) -> None:
        made: list[asyncio.Protocol] = []

        def make() -> asyncio.Protocol:
            proto = self._factory(peer)
            made.append(proto)
            return proto

        try:
            await self._loop.connect_accepted_socket(make, sock=conn)
        except BaseException as exc:
            # connection_made runs before connect_accepted_socket returns; without it the slot is still
            # only reserved and must be given back
            if not made or not getattr(made[0], "opened", False):
                self._tracker.unadmit(peer)
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.warning("serve.accept_failed", socket=self._tracker.name, reason=str(exc))

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (as ``asyncio.Server.close`` does)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self._sock.close()
