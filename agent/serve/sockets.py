"""Listening unix sockets: taken from systemd when activated, else bound here with mode and group."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

from agent.errors import UnavailableError

BACKLOG = 1024


class SocketSetupError(UnavailableError, RuntimeError):
    """A socket path cannot be bound (occupied by a non-socket, bad group, permissions)."""


#: Linux ``sockaddr_un.sun_path`` is 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107


def bind_unix(path: str, mode: int, group: str = "") -> socket.socket:
    """Bind and listen on ``path`` (replacing a stale socket file, never any other file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = p.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(f"{path}: exists and is not a socket; refusing to replace it")
        p.unlink()
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SocketSetupError(f"serve.socket_group: no group named {group!r}") from None
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise SocketSetupError(f"{path}: {len(os.fsencode(path))} bytes long; a unix socket path holds at most "
                               f"{_SUN_PATH_MAX} bytes (sockaddr_un.sun_path): choose a shorter path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # never world-accessible, even for the instant before chmod
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"{path}: bind failed: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if gid >= 0:
        os.chown(path, -1, gid)
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock
