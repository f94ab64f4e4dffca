"""Borrowed identities, connection exhaustion and cross-tenant status, with real processes and real cgroups.

The attacks of issue 11 items 7, 9 and 11: a caller that connects and exits (handing the socket to a
survivor) or switches uid used to get a fresh ``uid:N`` scope per connection, defeating every per-caller
limit; the last connections of a socket could be taken by one caller; ``/v1/status`` showed every caller
the counters of all. Callers here are real processes in real cgroup v2 directories, talking to the
service over its real unix sockets.
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

from tests.serve.helpers import unix_client

pytestmark = pytest.mark.integration


def _cgroup2_root() -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return Path(parts[1])
    raise AssertionError("no cgroup2 mount: these tests need cgroup v2 (unified or hybrid)")


@contextlib.contextmanager
def cgroup_dir() -> Iterator[Path]:
    """A fresh cgroup v2 directory (removed when its processes are gone)."""
    path = _cgroup2_root() / f"chutes-attest-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _open_socket_dirs(sock_path: str) -> None:
    for d in (Path(sock_path).parent, Path(sock_path).parent.parent):
        d.chmod(0o755)  # let other uids reach the socket (mode 0666 set by the service config)


# Connects N times, each from a forked child that switches to a fresh uid, hands the connected socket to
# the parent over SCM_RIGHTS and exits: the connecting pid is gone before the service looks at it.
_CONNECT_AND_EXIT = textwrap.dedent("""
    import os, socket, sys
    path, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    a, b = socket.socketpair()
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.setgid(base + i); os.setuid(base + i)
            s = socket.socket(socket.AF_UNIX); s.connect(path)
            socket.send_fds(b, [b"x"], [s.fileno()])
            os._exit(0)
        os.waitpid(pid, 0)
    held = [socket.socket(fileno=socket.recv_fds(a, 1, 1)[1][0]) for _ in range(n)]
    print("ready", flush=True)
    sys.stdin.read()
""")

# Joins a cgroup, then forks N children that each take a different uid and hold one connection.
_SETUID_IN_CGROUP = textwrap.dedent("""
    import os, socket, sys, time
    path, n, base, cg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    for i in range(n):
        if os.fork() == 0:
            os.setgid(base + i); os.setuid(base + i)
            s = socket.socket(socket.AF_UNIX); s.connect(path)
            sys.stdin.read()
            os._exit(0)
    time.sleep(0.3)
    print("ready", flush=True)
    sys.stdin.read()
""")

# One request from a process in its own cgroup; prints the status line and the JSON body.
_ONE_REQUEST = textwrap.dedent("""
    import os, socket, sys
    path, cg, target = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(cg + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    s = socket.socket(socket.AF_UNIX); s.connect(path)
    s.sendall(("GET " + target + " HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n").encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    print(head.split(b"\\r\\n")[0].decode())
    print(body.decode())
""")


def _spawn(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd="/")


def _release(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(10)
    proc.stdout.close()


async def _one_request(sock: str, cg: Path, target: str) -> tuple[str, dict]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _ONE_REQUEST, sock, str(cg), target,
                                                stdout=asyncio.subprocess.PIPE, cwd="/")
    out, _ = await proc.communicate()
    status, body = out.decode().split("\n", 1)
    return status, json.loads(body)


def _scopes(svc, name: str = "chute") -> list[str]:
    return sorted(st.peer.scope for st in svc.ctx.trackers[name].states.values())


async def test_connect_and_exit_lands_in_one_small_unidentified_scope(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666, max_connections=100, max_connections_per_caller=2,
                                max_connections_unidentified=3, connections_reserved_for_new_callers=0)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    proc = _spawn(_CONNECT_AND_EXIT, sock, "10", "41000")
    try:
        assert proc.stdout is not None
        # Blocking read on purpose: the service shares this event loop, so it accepts only after every
        # connecting child has exited.
        assert proc.stdout.readline().strip() == b"ready"
        await asyncio.sleep(0.5)
        tracker = svc.ctx.trackers["chute"]
        assert _scopes(svc) == ["unidentified"] * 3  # not ten fresh uid:410xx scopes
        # the lane is full from the fourth on (all ten were queued at once, so none of the first three was a
        # connection yet that a newcomer could displace: refused)
        assert tracker.refused + tracker.evicted == 7
        assert tracker.resolver.unidentified == 10
        async with unix_client(sock) as c:  # an identified caller is unaffected
            assert (await c.get("/v1/health")).status == 200
    finally:
        _release(proc)


async def test_setuid_does_not_make_a_new_caller(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666, max_connections=100, max_connections_per_caller=2,
                                connections_reserved_for_new_callers=0)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    with cgroup_dir() as cg:
        proc = _spawn(_SETUID_IN_CGROUP, sock, "6", "42000", str(cg))
        try:
            assert proc.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
            assert line.strip() == b"ready"
            await asyncio.sleep(0.3)
            want = f"cgroup:/{cg.name}"
            assert _scopes(svc) == [want, want]  # six uids, one caller: its cgroup
            assert svc.ctx.trackers["chute"].refused == 4
        finally:
            _release(proc)


async def test_last_connections_are_kept_for_callers_holding_none(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666, max_connections=8, max_connections_per_caller=8,
                                connections_reserved_for_new_callers=2, connections_share_containers=0,
                                connections_share_host=0, max_connections_unidentified=0)  # all pooled
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    held = []
    for _ in range(8):  # one caller takes all it can: six, the last two are reserved
        reader, writer = await asyncio.open_unix_connection(sock)
        held.append((reader, writer))
    await asyncio.sleep(0.2)
    tracker = svc.ctx.trackers["chute"]
    assert len(tracker.states) == 6 and tracker.refused == 2
    with cgroup_dir() as cg:
        status, body = await _one_request(sock, cg, "/v1/health")  # a caller holding none still gets in
    assert status == "HTTP/1.1 200 OK", (status, body)
    for _, w in held:
        w.close()


async def test_status_shows_a_caller_only_its_own_counters(service_factory) -> None:
    svc = await service_factory(socket_mode=0o666)
    sock = svc.cfg.serve.chute_socket
    _open_socket_dirs(sock)
    async with unix_client(sock) as c:  # tenant A: this process
        for _ in range(3):
            assert (await c.post("/v1/rint/nonce")).status == 200
        assert (await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})).status == 200
        mine = await (await c.get("/v1/status")).json()
    assert mine["counters"]["requests"]["chute /v1/rint/nonce 200"] == 3
    assert mine["rint"] == {"live_nonces": 3}
    with cgroup_dir() as cg:
        status, other = await _one_request(sock, cg, "/v1/status")  # tenant B: another cgroup
    assert status == "HTTP/1.1 200 OK"
    assert other["caller"] == {"scope": f"cgroup:/{cg.name}", "identified": True}
    assert other["counters"]["requests"] == {}  # nothing of A's
    assert other["rint"] == {"live_nonces": 0} and other["queue"] == {"depth": 0}
    assert "stats" not in other["queue"] and "quotes" not in other["counters"]
    assert other["measurements"] == mine["measurements"]  # node facts stay visible
    async with unix_client(svc.cfg.serve.compat_socket) as c:  # node-wide figures: compat socket only
        node = await (await c.get("/status")).json()
    assert node["counters"]["requests"]["chute /v1/rint/nonce 200"] == 3
    assert node["counters"]["requests"]["chute /v1/status 200"] == 2
    assert node["rint"]["issued"] == 3 and node["counters"]["quotes"]["ok"] >= 2
