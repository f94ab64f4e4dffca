"""Attacks on admission, each with real processes over the service's real unix sockets (issue 20).

- A container's connect/close loop kept the listen queue full (16 sockets accepted per wake-up): a new
  container's non-blocking ``connect()`` failed with ``EAGAIN``.
- A container whose connecting thread outlives its main thread: ``/proc/<pid>`` then describes the
  exiting leader, every cgroup v1 line reads "/", and the caller looked like a host process in the root
  cgroup, one ``uid:N`` scope per uid; 100 of them held every chute connection and filled the rint nonce
  store. Such a caller is unidentified now, and shares the unidentified lane.
- One container parking connections in the unidentified lane got every other unidentified caller refused.

Callers here are forked processes (new uids, main threads exited via ``SYS_exit``) and processes in
fresh cgroup v2 directories named like containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.serve.server import Service
from tests.serve.test_hostile_identity import _cgroup2_root, _open_socket_dirs, _release
from tests.waiting import async_wait_until

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def container_cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 directory named like a container (64 hex): its processes are a container."""
    path = _cgroup2_root() / secrets.token_hex(32)
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


_HTTP = textwrap.dedent("""
    import socket

    def exchange(s, target, method="GET"):
        s.sendall((method + " " + target + " HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n").encode())
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return 0
            data += chunk
        head, _, body = data.partition(b"\\r\\n\\r\\n")
        length = [int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length")]
        while length and len(body) < length[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split(b" ")[1])
""")

# Forks N callers, one after another when "sequential", else all at once. Each child takes uid base+i
# (base < 0: keeps its uid), starts a thread, and ends its main thread with SYS_exit; the thread waits
# until the leader is a zombie, opens CONNS connections, sends NONCES nonce requests and then one request
# for TARGET ("-": none) on the first, reports the statuses and holds its connections until released.
_ORPHANED_THREADS = _HTTP + textwrap.dedent("""
    import ctypes, json, os, sys, threading, time
    path, n, base, conns, nonces, target, sequential = sys.argv[1:8]
    n, base, conns, nonces, sequential = int(n), int(base), int(conns), int(nonces), sequential == "1"
    libc = ctypes.CDLL(None)
    r_rel, w_rel = os.pipe()
    r_rep, w_rep = os.pipe()

    def leader_gone():
        for _ in range(5000):
            if open("/proc/self/stat").read().rpartition(")")[2].split()[0] in ("Z", "X"):
                return
            time.sleep(0.001)
        raise SystemExit("main thread did not exit")

    def caller(i):
        leader_gone()
        held, statuses = [], []
        for _ in range(conns):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(path)
                held.append(s)
            except OSError:
                statuses.append("connect-failed")
        for _ in range(nonces if held else 0):
            try:
                statuses.append(exchange(held[0], "/v1/rint/nonce", "POST"))
            except OSError:
                statuses.append(0)
        if target != "-" and held:
            try:
                statuses.append(exchange(held[0], target))
            except OSError:
                statuses.append(0)
        os.write(w_rep, (json.dumps({"i": i, "statuses": statuses}) + "\\n").encode())
        os.read(r_rel, 1)
        os._exit(0)

    reports = []
    rep = os.fdopen(r_rep, "r")
    for i in range(n):
        if os.fork() == 0:
            os.close(w_rel)
            if base >= 0:
                os.setgid(base + i)
                os.setuid(base + i)
            threading.Thread(target=caller, args=(i,)).start()
            libc.syscall(60, 0)  # SYS_exit: this (the main) thread only
        if sequential:
            reports.append(json.loads(rep.readline()))
    while len(reports) < n:
        reports.append(json.loads(rep.readline()))
    print(json.dumps(reports), flush=True)
    sys.stdin.read()
    os.close(w_rel)
    for _ in range(n):
        os.wait()
""")


def _orphaned(sock: str, n: int, *, base: int = -1, conns: int = 1, nonces: int = 0, target: str = "-",
              sequential: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _ORPHANED_THREADS, sock, str(n), str(base), str(conns),
                             str(nonces), target, "1" if sequential else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")


async def _reports(proc: subprocess.Popen[bytes]) -> list[dict]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), 120)
    return json.loads(line)


# One request from a process in its own cgroup, on a fresh connection: prints "status" or "eagain".
_IN_CGROUP = _HTTP + textwrap.dedent("""
    import json, os, sys
    path, cg, target, method, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    out = {"eagain": 0, "statuses": []}
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)  # non-blocking, as asyncio's and most clients' connect is
        except BlockingIOError:
            out["eagain"] += 1
            s.close()
            continue
        s.setblocking(True)
        s.settimeout(10)
        try:
            out["statuses"].append(exchange(s, target, method))
        except OSError:
            out["statuses"].append(0)
        s.close()
    print(json.dumps(out))
""")


async def _from_container(sock: str, cg: Path, target: str, method: str = "GET", n: int = 1) -> dict:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _IN_CGROUP, sock, str(cg), target, method,
                                                str(n), stdout=asyncio.subprocess.PIPE, cwd="/")
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return json.loads(out)


def _scopes(svc: Service) -> list[str]:
    return sorted(st.peer.scope for st in svc.ctx.trackers["chute"].states.values())


# A container's connect/close loop, paced at RATE connects a second (faster than 16 accepts per wake-up
# of the old acceptor kept up with; slower than this machine's accept loop drains, with room to spare).
_CONNECT_CLOSE_LOOP = textwrap.dedent("""
    import os, socket, sys, time
    path, cg, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    print("ready", flush=True)
    start, n = time.monotonic(), 0
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError:
            pass
        s.close()
        n += 1
        if n % 50 == 0:
            ahead = n / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
""")


async def test_connect_close_loop_does_not_fill_the_listen_queue(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    acceptor, gate = svc.listeners[1].server, svc.ctx.trackers["chute"]

    def seen() -> int:  # connections the loop made that reached accept()
        return acceptor.hung_up + gate.accepted + gate.refused
    with container_cgroup() as hostile, container_cgroup() as newcomer:
        loop_proc = subprocess.Popen([sys.executable, "-c", _CONNECT_CLOSE_LOOP, sock, str(hostile), "20000"],
                                     stdout=subprocess.PIPE, cwd="/")
        try:
            assert loop_proc.stdout is not None
            await asyncio.get_running_loop().run_in_executor(None, loop_proc.stdout.readline)
            await async_wait_until(lambda: seen() > 2000, "the loop at full pace")  # the loop runs at full pace
            before = seen()
            got = await _from_container(sock, newcomer, "/v1/health", n=200)
            during = seen() - before
        finally:
            loop_proc.kill()
            loop_proc.wait()
            assert loop_proc.stdout is not None
            loop_proc.stdout.close()
    assert during > 2000  # the loop went on throughout
    assert got["eagain"] == 0 and got["statuses"] == [200] * 200, {**got, "statuses": set(got["statuses"])}


def test_orphaned_thread_is_unidentified_not_a_host_process(tmp_path: Path) -> None:
    """cgroup v1 emulated: the exiting leader's lines all read "/" (the kernel shows exiting tasks in the
    root); the stat line says the leader is a zombie. Unidentified, never ``uid:N``."""
    import os
    import socket

    from agent.serve.peer import UNIDENTIFIED, PeerResolver
    from tests.serve.test_peer import write_stat

    me = tmp_path / "proc" / str(os.getpid())
    write_stat(me, state="Z", flags=0x40800C)
    (me / "cgroup").write_text("".join(f"{i}:{c}:/\n" for i, c in enumerate(
        ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "name=systemd"), 1)))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = PeerResolver(proc_root=str(tmp_path / "proc")).resolve(a)
        assert not peer.identified and peer.scope == "unidentified" and peer.caller_class == UNIDENTIFIED
        write_stat(me, state="S", flags=0x400000)  # the same lines from a live process: the host's root
        assert PeerResolver(proc_root=str(tmp_path / "proc")).resolve(a).scope == f"uid:{os.getuid()}"
        write_stat(me, state="R", flags=0x404)  # PF_EXITING, not yet a zombie
        assert not PeerResolver(proc_root=str(tmp_path / "proc")).resolve(a).identified


async def test_hundred_orphaned_threads_hold_neither_connections_nor_nonces(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666, max_connections=128, max_connections_per_caller=4,
                                rint_nonces_max=1024, rint_nonces_per_caller=16, nonce_rate_per_s=1000.0,
                                nonce_burst=1000)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    gate = svc.ctx.trackers["chute"]
    # 100 callers, each its own uid (a uid:N scope each, before), 4 connections and 20 nonces each
    proc = _orphaned(sock, 100, base=43000, conns=4, nonces=20)
    try:
        reports = await _reports(proc)
        assert len(reports) == 100
        assert svc.ctx.trackers["chute"].resolver.unidentified >= 100
        scopes = _scopes(svc)
        assert set(scopes) <= {"unidentified"} and len(scopes) <= svc.cfg.serve.max_connections_unidentified
        assert not any(s.startswith("uid:43") for s in gate.caller_counters)  # no uid:N scope ever served
        assert svc.ctx.nonces.live_for("unidentified") <= 16  # one scope, one per-caller share
        with container_cgroup() as cg:  # a container that never asked: a connection and a nonce
            got = await _from_container(sock, cg, "/v1/rint/nonce", method="POST", n=3)
        assert got == {"eagain": 0, "statuses": [200, 200, 200]}
        assert svc.ctx.nonces.refused_full == 0
    finally:
        _release(proc)


async def test_parking_in_the_unidentified_lane_does_not_lock_others_out(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666, max_connections_unidentified=8)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    gate = svc.ctx.trackers["chute"]
    parker = _orphaned(sock, 16, conns=2, sequential=True)  # one container: 16 pids, 2 connections each
    try:
        await _reports(parker)
        # admitted on the raw socket first, a transport a loop turn later: wait for both
        await async_wait_until(lambda: gate.admission.budget.held["unidentified"] == 8 and len(gate.states) == 8,
                               "8 parked connections admitted and open")
        assert _scopes(svc) == ["unidentified"] * 8  # the lane is full of parked, idle connections
        evicted_before = gate.evicted
        for _ in range(3):  # other unidentified callers, one after another: each gets in and is answered
            other = _orphaned(sock, 1, target="/v1/health")
            try:
                [report] = await _reports(other)
            finally:
                _release(other)
            assert report["statuses"] == [200]
        assert gate.evicted > evicted_before  # the first displaced a parked one; the others found room
        assert gate.admission.budget.held["unidentified"] <= 8
    finally:
        _release(parker)
