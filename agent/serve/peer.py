"""Who is calling: the connecting process, pinned by a pidfd, and the cgroup it runs in.

A caller must not be able to shed its identity: the scope every per-caller limit is keyed by comes
from the cgroup (container, pod, else the cgroup path), never from something the caller chooses.

- ``SO_PEERPIDFD`` (Linux >= 6.5) gives a pidfd for the process that called ``connect()``. The cgroup is
  read from ``/proc/<pid>/cgroup`` and *afterwards* the pidfd is polled: a pidfd becomes readable when its
  process exits, so "still running after the read" proves the file read was that process's (a pid cannot
  be reused while its process lives).
- Older kernels: the start time in ``/proc/<pid>/stat`` is read before and after the cgroup and must match
  (a reused pid has a different start time). Residual gap: a pid recycled between ``connect()`` and the
  first read is not caught there; ``SO_PEERPIDFD`` closes it.
- A caller that cannot be identified this way (exited, e.g. connected then handed the socket to a child,
  pid reused, /proc unreadable) lands in the one shared :data:`UNIDENTIFIED_SCOPE`, which admission
  (:mod:`agent.serve.admission`) gives a small lane of its own, never in a fresh per-uid scope.
- So does a caller whose main thread has exited while the thread that connected lives on: ``/proc/<pid>``
  then describes the exiting thread-group leader, and on cgroup v1 (and the v1 half of a hybrid host)
  every line of its ``cgroup`` file reads "/" (the kernel reports exiting tasks in the root), which would
  make a container look like a host process in the root cgroup (``uid:N``). The leader's state (``Z``/``X``)
  and ``PF_EXITING`` flag in ``/proc/<pid>/stat`` are checked after the cgroup read.
- Every caller belongs to one class (:attr:`Peer.caller_class`): ``container`` (a container or pod),
  ``host`` (a process outside any container) or ``unidentified``; shared capacity (connections, rint
  nonces) is partitioned by class.
- A caller outside any container is scoped by its cgroup path (``setuid`` does not move a process out
  of its cgroup); only processes in the root cgroup, which on a systemd host are host-level, are scoped
  by uid.

With pidfs (Linux >= 6.9) each process has its own pidfd inode number, never reused while the system
runs, so lookups are cached by that number; otherwise nothing is cached.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

_UCRED = struct.Struct("3i")
#: SO_PEERPIDFD from <asm-generic/socket.h> (Python 3.11's socket module does not name it).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
UNIDENTIFIED_SCOPE = "unidentified"
#: Caller classes (:attr:`Peer.caller_class`); shared capacity is partitioned between them.
CONTAINER, HOST, UNIDENTIFIED = "container", "host", "unidentified"
CALLER_CLASSES = (CONTAINER, HOST, UNIDENTIFIED)
#: PF_EXITING from <linux/sched.h>: the task is exiting (set for a thread-group leader whose thread exited).
_PF_EXITING = 0x4

# containerd/cri-o/docker ids are 64 hex; pods appear as kubepods...-pod<uid>.slice or /pod<uid>/.
_CONTAINER_RE = re.compile(r"(?:cri-containerd-|crio-|docker-|libpod-|/)([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_POD_RE = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True, slots=True)
class Peer:
    """The calling process as the kernel reports it, plus the container / cgroup it runs in (if known)."""

    pid: int
    uid: int
    gid: int
    container: str | None = None
    pod: str | None = None
    #: The unified (v2) cgroup path, else the name=systemd one; "" when not read.
    cgroup: str = ""
    #: False when the connecting process could not be pinned (exited, pid reused, /proc unreadable).
    identified: bool = True
    #: The key nonces and rate limits are scoped to: container, else pod, else cgroup path, else uid
    #: (root cgroup only); "unidentified" for every caller that could not be pinned.
    scope: str = field(init=False, repr=False, compare=False)
    #: ``container``, ``host`` or ``unidentified`` (see :func:`class_of_scope`).
    caller_class: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.identified:
            scope = UNIDENTIFIED_SCOPE
        elif self.container:
            scope = f"container:{self.container}"
        elif self.pod:
            scope = f"pod:{self.pod}"
        elif self.cgroup and self.cgroup != "/":
            scope = f"cgroup:{self.cgroup}"
        else:
            scope = f"uid:{self.uid}"
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "caller_class", class_of_scope(scope))


def class_of_scope(scope: str) -> str:
    """The caller class a scope belongs to: ``container:``/``pod:`` -> container, :data:`UNIDENTIFIED_SCOPE`
    -> unidentified, anything else (``cgroup:``, ``uid:``) -> host."""
    if scope.startswith(("container:", "pod:")):
        return CONTAINER
    return UNIDENTIFIED if scope == UNIDENTIFIED_SCOPE else HOST


UNKNOWN = Peer(pid=0, uid=-1, gid=-1, identified=False)


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


def cgroup_path(text: str) -> str:
    """The v2 ("0::") path, else the v1 name=systemd path, else the first line's path; "" if none."""
    first = systemd = ""
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrl, _, path = rest.partition(":")
        if hid == "0" and ctrl == "":
            return path
        if ctrl == "name=systemd":
            systemd = path
        first = first or path
    return systemd or first


_Found = tuple[str | None, str | None, str]  # container, pod, cgroup path


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _pidfs() -> bool:
    """Pidfds have per-process inode numbers (pidfs) rather than one shared anonymous inode."""
    try:
        pfd = os.pidfd_open(os.getpid())
    except (OSError, AttributeError):
        return False
    efd = os.eventfd(0) if hasattr(os, "eventfd") else -1
    try:
        return efd < 0 or os.fstat(pfd).st_ino != os.fstat(efd).st_ino
    finally:
        os.close(pfd)
        if efd >= 0:
            os.close(efd)


class PeerResolver:
    """Turns a connected socket into a :class:`Peer` (see the module docstring for how it is pinned)."""

    def __init__(self, proc_root: str = "/proc", cache_size: int = 4096) -> None:
        self._proc = Path(proc_root)
        self._cache: OrderedDict[int, _Found] = OrderedDict()  # pidfs inode -> what was found
        self._size = cache_size
        self._pidfd_ok = True  # cleared on the first ENOPROTOOPT (kernel < 6.5)
        self._pidfs = _pidfs()
        self.unidentified = 0

    def _read_cgroup(self, pid: int) -> str | None:
        try:
            return (self._proc / str(pid) / "cgroup").read_text()
        except OSError:
            return None

    def _stat(self, pid: int) -> tuple[str, bool] | None:
        """(start time, exiting) from ``/proc/<pid>/stat``; None when unreadable.

        Fields are counted after the ")" that ends the (untrusted) comm field: state is field 3, flags
        field 9, starttime field 22. "Exiting": the thread-group leader is a zombie / dead or has
        ``PF_EXITING`` set, i.e. its main thread is gone while another thread still runs.
        """
        try:
            stat = (self._proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        fields = stat.rpartition(")")[2].split()
        if len(fields) <= 19:
            return None
        try:
            flags = int(fields[6])
        except ValueError:
            return None
        return fields[19], fields[0] in ("Z", "X", "x") or bool(flags & _PF_EXITING)

    def _via_pidfd(self, sock: socket.socket, pid: int) -> _Found | bool | None:
        """What the pidfd-pinned process's cgroup says; None: not identifiable; False: no SO_PEERPIDFD."""
        try:
            pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError:
            self._pidfd_ok = False
            return False
        try:
            key = os.fstat(pidfd).st_ino if self._pidfs else None
            if key is not None:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
            text = self._read_cgroup(pid)
            if text is None or _exited(pidfd):
                return None
            st = self._stat(pid)  # read after the cgroup: the leader was not exiting when it was read
            if st is None or st[1]:
                return None
            found = (*parse_cgroup(text), cgroup_path(text))
            if key is not None:
                self._cache[key] = found
                if len(self._cache) > self._size:
                    self._cache.popitem(last=False)
            return found
        finally:
            os.close(pidfd)

    def _via_start_time(self, pid: int) -> _Found | None:
        before = self._stat(pid)
        text = self._read_cgroup(pid) if before is not None and not before[1] else None
        if text is None or self._stat(pid) != before:
            return None
        return (*parse_cgroup(text), cgroup_path(text))

    def forget(self, pid: int) -> None:
        """Kept for callers of the old per-pid cache; entries are keyed by process now, not pid."""

    def resolve(self, sock: socket.socket | None) -> Peer:
        if sock is None or sock.family != socket.AF_UNIX:
            return UNKNOWN
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return UNKNOWN
        found: _Found | bool | None = None
        if pid > 0:
            found = self._via_pidfd(sock, pid) if self._pidfd_ok else False
            if found is False:
                found = self._via_start_time(pid)
        if not found:
            self.unidentified += 1
            return Peer(pid=pid, uid=uid, gid=gid, identified=False)
        assert isinstance(found, tuple)
        container, pod, path = found
        return Peer(pid=pid, uid=uid, gid=gid, container=container, pod=pod, cgroup=path)
