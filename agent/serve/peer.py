"""Who is calling: SO_PEERCRED on the connection, then the container or pod from ``/proc/<pid>/cgroup``.

Resolved once per connection (credentials cannot change on an open unix socket) and cached per pid
for the cgroup part, so per-request logging and rate limiting cost a dict lookup, not a syscall.
"""

from __future__ import annotations

import re
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

_UCRED = struct.Struct("3i")

# containerd/cri-o/docker ids are 64 hex; pods appear as kubepods...-pod<uid>.slice or /pod<uid>/.
_CONTAINER_RE = re.compile(r"(?:cri-containerd-|crio-|docker-|libpod-|/)([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_POD_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True, slots=True)
class Peer:
    """The calling process as the kernel reports it, plus the container it runs in (if any)."""

    pid: int
    uid: int
    gid: int
    container: str | None = None
    pod: str | None = None
    #: The key nonces and rate limits are scoped to: container, else pod, else uid (computed once,
    #: read on every request).
    scope: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.container:
            scope = f"container:{self.container}"
        elif self.pod:
            scope = f"pod:{self.pod}"
        else:
            scope = f"uid:{self.uid}"
        object.__setattr__(self, "scope", scope)


UNKNOWN = Peer(pid=0, uid=-1, gid=-1)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock`` (an AF_UNIX stream socket)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """(container id, pod uid) found in the text of ``/proc/<pid>/cgroup``; (None, None) on the host."""
    container = pod = None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if container is None:
            m = _CONTAINER_RE.search(path)
            if m:
                container = m.group(1)
        if pod is None:
            m = _POD_RE.search(path)
            if m:
                pod = m.group(1).replace("_", "-")
    return container, pod


class PeerResolver:
    """Turns a connected socket into a :class:`Peer`, caching the cgroup lookup per pid (bounded LRU)."""

    def __init__(self, proc_root: str = "/proc", cache_size: int = 4096) -> None:
        self._proc = Path(proc_root)
        self._cache: OrderedDict[int, tuple[str | None, str | None]] = OrderedDict()
        self._size = cache_size

    def cgroup_of(self, pid: int) -> tuple[str | None, str | None]:
        hit = self._cache.get(pid)
        if hit is not None:
            self._cache.move_to_end(pid)
            return hit
        try:
            text = (self._proc / str(pid) / "cgroup").read_text()
        except OSError:
            return None, None  # process gone or /proc hidden: identify by uid only, don't cache
        found = parse_cgroup(text)
        self._cache[pid] = found
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return found

    def forget(self, pid: int) -> None:
        """Drop a pid's cached cgroup (its last connection closed; the pid may be reused later)."""
        self._cache.pop(pid, None)

    def resolve(self, sock: socket.socket | None) -> Peer:
        if sock is None or sock.family != socket.AF_UNIX:
            return UNKNOWN
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return UNKNOWN
        container, pod = self.cgroup_of(pid) if pid > 0 else (None, None)
        return Peer(pid=pid, uid=uid, gid=gid, container=container, pod=pod)
