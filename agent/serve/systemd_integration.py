"""systemd glue: socket activation (LISTEN_FDS/LISTEN_FDNAMES) and sd_notify (READY, STATUS, WATCHDOG).

Uses systemd-python when installed; without it (a stripped build, or not under systemd) activation is
read from the environment by the same rules sd_listen_fds(3) uses and notifications go straight to the
``NOTIFY_SOCKET`` datagram socket, so behaviour does not depend on the optional extra.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

LISTEN_FDS_START = 3


def listen_sockets(environ: Mapping[str, str] | None = None, *, unset: bool = True) -> dict[str, socket.socket]:
    """Sockets passed by systemd, by ``FileDescriptorName=`` (unnamed ones are ``fd<N>``); {} when none."""
    if environ is None:
        try:
            from systemd import daemon
        except ImportError:
            pass
        else:
            named = daemon.listen_fds_with_names(unset_environment=unset)
            out_sd: dict[str, socket.socket] = {}
            for fd, name in sorted(named.items()):
                os.set_inheritable(fd, False)
                key = name or f"fd{fd}"
                # One .socket unit gives all its fds the same name: keep every fd (matched by path later).
                out_sd[key if key not in out_sd else f"{key}#{fd}"] = socket.socket(fileno=fd)
            return out_sd
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out: dict[str, socket.socket] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        os.set_inheritable(fd, False)
        out[name if name not in out else f"{name}#{fd}"] = socket.socket(fileno=fd)
    if unset and environ is None:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return out


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of ``WatchdogSec`` when the watchdog is on for this process (as sd_watchdog_enabled(3))."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 / 2 if value > 0 else None


class Notifier:
    """sd_notify(3) sender; a no-op without ``NOTIFY_SOCKET``.

    Written here rather than through systemd-python's ``daemon.notify``: that call blocks when the
    receiver's buffer is full, and a service blocked in a notify never gets to its SIGTERM handler.
    Each message is one non-blocking datagram (``MSG_DONTWAIT``); a full buffer drops that message
    (the next WATCHDOG=1 or STATUS= follows soon) instead of wedging the event loop.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, addr)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")
