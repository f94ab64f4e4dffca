"""Caller identity: SO_PEERCRED from a real client process, cgroup -> container/pod parsing."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.serve.peer import Peer, PeerResolver, parse_cgroup, peer_credentials
from agent.serve.rint import NonceStore

CID = "3f1c9a" + "0" * 52 + "abcdef"
POD = "5d6e7f80-1a2b-4c3d-9e8f-0123456789ab"


@pytest.mark.parametrize(
    ("text", "container", "pod"),
    [
        (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/"
         f"cri-containerd-{CID}.scope\n", CID, POD),
        (f"0::/kubepods/burstable/pod{POD}/{CID}\n", CID, POD),
        (f"12:memory:/docker/{CID}\n11:cpu:/docker/{CID}\n", CID, None),
        (f"0::/system.slice/docker-{CID}.scope\n", CID, None),
        (f"0::/machine.slice/libpod-{CID}.scope/container\n", CID, None),
        ("0::/user.slice/user-0.slice/session-1.scope\n", None, None),
        ("0::/\n", None, None),
        ("", None, None),
    ],
)
def test_parse_cgroup(text: str, container: str | None, pod: str | None) -> None:
    assert parse_cgroup(text) == (container, pod)


def test_peer_credentials_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def write_stat(pid_dir: Path, *, state: str = "S", flags: int = 0x400000, start: int = 4242) -> None:
    """A ``/proc/<pid>/stat`` line: pid (comm) then 50 fields; state is field 3, flags 9, starttime 22."""
    fields = ["0"] * 50
    fields[0], fields[6], fields[19] = state, str(flags), str(start)
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / "stat").write_text(f"{pid_dir.name} (py) thon) {' '.join(fields)}\n")


def test_resolver_uses_proc_cgroup_and_caches(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_stat(proc / str(os.getpid()))
    cg = proc / str(os.getpid()) / "cgroup"
    cg.write_text(f"0::/kubepods/pod{POD}/{CID}\n")
    resolver = PeerResolver(proc_root=str(proc))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = resolver.resolve(a)
        assert peer == Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), container=CID, pod=POD,
                            cgroup=f"/kubepods/pod{POD}/{CID}")
        assert peer.scope == f"container:{CID}"
        cg.write_text("0::/\n")  # cached per process (its pidfd inode), which is still the same one
        assert resolver.resolve(a).container == CID
        fresh = PeerResolver(proc_root=str(proc))
        assert fresh.resolve(a).container is None
        assert fresh.resolve(a).scope == f"uid:{os.getuid()}"  # root cgroup: host-level, scoped by uid
        cg.write_text("0::/system.slice/foo.service\n")
        assert PeerResolver(proc_root=str(proc)).resolve(a).scope == "cgroup:/system.slice/foo.service"


def test_scopes_isolate_nonces() -> None:
    store = NonceStore(60, 10)
    a = Peer(1, 0, 0, container="a" * 64).scope
    b = Peer(2, 0, 0, container="b" * 64).scope
    n, _ = store.issue(a)
    assert store.consume(n, b) == "unknown_nonce"  # a neighbour can neither use nor burn it
    assert store.consume(n, a) == "ok"


async def test_peer_pid_of_real_client_process_is_logged(service) -> None:
    path = service.cfg.serve.chute_socket
    client = textwrap.dedent(f"""
        import os, socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect({path!r})
        s.sendall(b"POST /v1/no-such-route HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n"
                  b"Connection: close\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        print(os.getpid())
        print(data.split(b" ")[1].decode())
    """)
    with capture_logs() as logs:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", client, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
    pid_text, status = out.decode().split()
    assert status == "404"  # a refusal: logged on its own line (a routine 200 only goes into the summary)
    events = [e for e in logs if e.get("event") == "serve.request" and e.get("status") == 404]
    assert len(events) == 1
    ev = events[0]
    assert ev["peer_pid"] == int(pid_text) != os.getpid()
    assert ev["peer_uid"] == os.getuid()
    assert ev["socket"] == "chute" and ev["duration_ms"] >= 0 and ev["caller_class"] == "host"
    assert "container" in ev
