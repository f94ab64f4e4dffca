"""Accepting on a listening unix socket ourselves, so a refused connection costs a syscall or three.

asyncio's own accept path (``create_unix_server``) makes a task, a transport and a protocol (aiohttp's
``RequestHandler``) for every accepted socket before anything can look at it. A hostile container that
reconnects as fast as it can once over its connection cap (tens of thousands of times a minute) then
buys all of that with each attempt, on the event loop every neighbour shares.

Here the listening socket is watched with ``loop.add_reader``; each wake-up accepts up to
:data:`ACCEPT_BATCH` sockets, identifies each caller on the raw socket (``SO_PEERCRED`` /
``SO_PEERPIDFD`` via :class:`~agent.serve.peer.PeerResolver`, through
:meth:`~agent.serve.connections.ConnTracker.admit`) and closes a refused one right there (counted in the
tracker's ``refused``, logged rate-limited). Only admitted sockets become connections, through
``loop.connect_accepted_socket`` with the tracker's protocol factory around aiohttp's server, so they are
served exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Any

from agent.log import get_logger
from agent.serve.connections import ConnTracker
from agent.serve.peer import Peer

log = get_logger(__name__)

#: Sockets accepted per wake-up: small, so a reconnect storm interleaves with everyone else's callbacks
#: (asyncio's own path accepts up to the backlog, 1,024, in one go).
ACCEPT_BATCH = 16
#: Out of file descriptors / memory: stop accepting this long (as asyncio does), then try again.
ACCEPT_RETRY_DELAY_S = 1.0
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Serves one listening socket: admits or refuses each connection before asyncio/aiohttp see it."""

    def __init__(self, sock: socket.socket, tracker: ConnTracker, factory: Callable[..., asyncio.Protocol],
                 *, batch: int = ACCEPT_BATCH) -> None:
        self._sock = sock
        self._tracker = tracker
        self._factory = factory  # ConnTracker.factory(aiohttp server): make(peer) -> protocol
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        tracker = self._tracker
        for _ in range(self._batch):
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
            if not made or not getattr(made[0], "_admitted", False):
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
