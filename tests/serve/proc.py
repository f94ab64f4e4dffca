"""Run a real ``chutes-attest serve`` subprocess, optionally socket-activated and with a NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from agent.config import AgentConfig
from tests.serve.helpers import REPO, toml_for

_EXEC_WRAPPER = """
import os, sys
fds = [int(x) for x in os.environ.pop("TEST_ACTIVATE_FDS").split(",")]
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "agent.cli", *sys.argv[1:]])
"""


class NotifyListener:
    """A datagram socket playing systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if needle in m.split("\n"):
                return m
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(65536).decode()
            except TimeoutError:
                break
            self.messages.append(msg)
            if needle in msg.split("\n"):
                return msg
        raise AssertionError(f"no {needle!r} notification; got {self.messages!r}")

    def close(self) -> None:
        self.sock.close()


def listening_socket(path: str) -> socket.socket:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    return s


def spawn(cfg: AgentConfig, tmp: Path, *, activate: list[socket.socket] | None = None, fdnames: str | None = None,
          env: dict[str, str] | None = None, prefix: list[str] | None = None,
          log_format: str = "json") -> subprocess.Popen[bytes]:
    conf = tmp / "agent.toml"
    conf.write_text(toml_for(cfg))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    args = ["--config", str(conf), "--log-format", log_format, "serve"]
    pass_fds: tuple[int, ...] = ()
    if activate:
        high = []
        for i, s in enumerate(activate):
            os.dup2(s.fileno(), 200 + i)
            high.append(200 + i)
        pass_fds = tuple(high)
        environ["TEST_ACTIVATE_FDS"] = ",".join(map(str, high))
        environ["LISTEN_FDS"] = str(len(activate))
        if fdnames is not None:
            environ["LISTEN_FDNAMES"] = fdnames
        cmd = [sys.executable, "-c", _EXEC_WRAPPER, *args]
    else:
        cmd = [sys.executable, "-m", "agent.cli", *args]
    try:
        return subprocess.Popen([*(prefix or []), *cmd], env=environ, pass_fds=pass_fds, cwd=str(REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    finally:
        for fd in pass_fds:
            os.close(fd)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out.decode(errors="replace")
