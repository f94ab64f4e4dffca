"""sd_notify never blocks the service: a receiver that stops reading costs dropped messages, not a hang."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from agent.serve.systemd_integration import Notifier


def test_messages_arrive_as_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.ready("serving") is True
        msg = rx.recv(4096).decode()
        assert msg.splitlines()[:2] == ["READY=1", "STATUS=serving"]
        assert msg.splitlines()[2].startswith("MAINPID=")


def test_full_receiver_never_blocks(tmp_path: Path) -> None:
    """A receiver that never reads: the old blocking send hung on the first full buffer (SIGTERM never ran)."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        rx.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        results: list[bool] = []
        done = threading.Event()

        def spam() -> None:
            for _ in range(2000):
                results.append(n.status("x" * 200))
            done.set()

        threading.Thread(target=spam, daemon=True).start()
        assert done.wait(10), "notify blocked on a full receiver"
        assert results[0] is True and results[-1] is False  # delivered until full, then dropped


def test_without_notify_socket_it_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog() is False


def test_abstract_address(tmp_path: Path) -> None:
    name = f"chutes-attest-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog() is True
        assert rx.recv(100) == b"WATCHDOG=1"
