"""The benchmarks' load generator never leaves its parent waiting forever: a worker that dies is named
(with its exit code), a server that stops answering ends the run at its deadline.

A real unix-socket server that accepts and never answers holds the workers mid-run, so the only way out
is the death (or deadline) under test.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from loadgen import Load, LoadTimeout, WorkerDied

from tests.waiting import wait_until


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lg-") as d:  # unix socket paths stay under 108 bytes
        yield Path(d)


@pytest.fixture
def silent_server(short_tmp: Path) -> Iterator[tuple[str, list[socket.socket]]]:
    """Accepts every connection and reads, never answers."""
    path = str(short_tmp / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def loop() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            accepted.append(conn)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield path, accepted
    stop.set()
    t.join()
    for c in accepted:
        c.close()
    srv.close()


def test_a_killed_worker_is_named_not_waited_for(silent_server) -> None:
    path, accepted = silent_server
    load = Load(path, total=8, clients=4, workers=2, start_delay_s=0.0).start()
    try:
        wait_until(lambda: len(accepted) == 4, "every client connected")
        victim = load.pids[1]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerDied, match=rf"load worker 1 \(pid {victim}\) exited with code -9"):
            load.wait(timeout_s=60)  # without the fix: blocks on worker 1's pipe forever
        assert all(not p.is_alive() for p in load._procs)  # the surviving worker was stopped too
    finally:
        load.stop()


def test_a_server_that_stops_answering_ends_at_the_deadline(silent_server) -> None:
    path, accepted = silent_server
    load = Load(path, total=2, clients=2, workers=1, start_delay_s=0.0).start()
    try:
        wait_until(lambda: len(accepted) == 2, "every client connected")
        with pytest.raises(LoadTimeout, match=r"within 0\.5s; workers still running: 0 \(pid \d+\)"):
            load.wait(timeout_s=0.5)
    finally:
        load.stop()
