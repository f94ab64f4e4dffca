"""systemd integration with a real ``chutes-attest serve`` process: socket activation, sd_notify
readiness/status/watchdog, SIGTERM drain, and the unit files passing ``systemd-analyze verify``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.helpers import REPO, make_cfg
from tests.serve.proc import NotifyListener, listening_socket, spawn, stop
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def http(path: str, request: bytes, timeout: float = 20.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(request)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data


def get(path: str, route: str) -> tuple[int, bytes]:
    data = http(path, f"GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
def notify(short_tmp: Path):
    n = NotifyListener(short_tmp / "notify.sock")
    yield n
    n.close()


@pytest.mark.parametrize("named", [True, False])
def test_socket_activation_ready_status_and_drain(short_tmp: Path, sim_dir: Path, notify: NotifyListener,
                                                  named: bool) -> None:
    act_compat = str(short_tmp / "act" / "compat.sock")
    act_chute = str(short_tmp / "act" / "chute.sock")
    if named:  # FileDescriptorName=compat / chute; the configured paths are never bound
        cfg = make_cfg(short_tmp, sim_dir)
        socks = [listening_socket(act_chute), listening_socket(act_compat)]
        fdnames = "chute:compat"
    else:  # one .socket unit with two ListenStream=: same name, matched by path
        cfg = make_cfg(short_tmp, sim_dir, compat_socket=act_compat, chute_socket=act_chute)
        socks = [listening_socket(act_compat), listening_socket(act_chute)]
        fdnames = "chutes-attest.socket:chutes-attest.socket"
    inodes = {p: os.stat(p).st_ino for p in (act_compat, act_chute)}
    proc = spawn(cfg, short_tmp, activate=socks, fdnames=fdnames,
                 env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "600000"})
    try:
        ready = notify.wait_for("READY=1")
        # both activated sockets are served as passed: none was dropped and re-bound by the service
        assert {p: os.stat(p).st_ino for p in inodes} == inodes
        assert any(line.startswith("STATUS=serving") for line in ready.split("\n"))
        assert f"MAINPID={proc.pid}" in ready.split("\n")
        notify.wait_for("WATCHDOG=1")  # pinged while healthy
        assert get(act_compat, "/health") == (200, b'"pong"')
        status, body = get(act_chute, "/v1/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        if named:
            assert not Path(cfg.serve.compat_socket).exists() and not Path(cfg.serve.chute_socket).exists()

        # drain: a request whose body is still arriving when SIGTERM lands completes normally
        body = json.dumps({"symmetric_key": "00" * 16, "proto": "tcp", "port": 8080}).encode()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(20)
        c.connect(act_chute)
        c.sendall(b"POST /v1/symkey/respond HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                  + body[:10])
        # SIGTERM only once the service holds this connection (a fixed sleep could be too short here)
        wait_until(lambda: json.loads(get(act_compat, "/status")[1])["counters"]["connections"]["chute"]["open"],
                   "the service to accept the half-sent request")
        get(act_compat, "/health")  # one more loop round trip: the head already buffered is read by now
        proc.send_signal(15)
        notify.wait_for("STOPPING=1")
        c.sendall(body[10:])
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
        c.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"response":"' in answer
        rc, out = stop(proc)
        assert rc == 0, out
        assert '"serve.draining"' in out and '"in_flight": 1' in out and '"serve.stopped"' in out
        assert Path(act_chute).exists()  # activated sockets belong to systemd: not unlinked
    finally:
        stop(proc)
        for s in socks:
            s.close()


def test_bind_mode_self_check_and_sigterm(short_tmp: Path, sim_dir: Path, notify: NotifyListener) -> None:
    cfg = make_cfg(short_tmp, sim_dir, socket_mode=0o640)
    proc = spawn(cfg, short_tmp, env={"NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY=1")
        for p in (cfg.serve.compat_socket, cfg.serve.chute_socket):
            assert Path(p).is_socket()
            assert Path(p).stat().st_mode & 0o777 == 0o640
        assert get(cfg.serve.compat_socket, "/health")[0] == 200
        key = Path(cfg.serve.key_path)
        assert key.stat().st_mode & 0o777 == 0o600  # created on first start like the init step
        rc, out = stop(proc)
        assert rc == 0, out
        assert not Path(cfg.serve.chute_socket).exists()  # our own sockets are removed on exit
        assert '"serve.self_check"' in out and '"result": "ok"' in out
    finally:
        stop(proc)


def test_failed_self_check_never_reports_ready(short_tmp: Path, sim_dir: Path, notify: NotifyListener) -> None:
    cfg = make_cfg(short_tmp, sim_dir)
    cfg.quote.source = "configfs"
    cfg.quote.tee = "tdx"  # no TEE devices here: pinned, so the missing configfs-tsm is what fails
    cfg.quote.configfs_root = str(short_tmp / "no-tsm" / "report")
    cfg.quote.retries = 0
    proc = spawn(cfg, short_tmp, env={"NOTIFY_SOCKET": notify.path})
    rc, out = stop(proc, timeout=60) if proc.wait(timeout=60) is not None else (None, "")
    assert rc == 5, out
    assert not any("READY=1" in m.split("\n") for m in notify.messages)
    notify.sock.settimeout(0.2)
    try:
        while True:
            notify.messages.append(notify.sock.recv(65536).decode())
    except TimeoutError:
        pass
    assert not any("READY=1" in m.split("\n") for m in notify.messages)
    assert any("STATUS=self-check failed" in m or "STATUS=start failed" in m for m in notify.messages)
    assert not Path(cfg.serve.chute_socket).exists()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("chutes-attest")
    assert exe.exists()
    (tmp_path / "chutes-attest.socket").write_text((REPO / "systemd" / "chutes-attest.socket").read_text())
    service = (REPO / "systemd" / "chutes-attest.service").read_text()
    assert "ExecStart=/usr/bin/chutes-attest " in service
    (tmp_path / "chutes-attest.service").write_text(service.replace("/usr/bin/chutes-attest", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", "chutes-attest.socket", "chutes-attest.service"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # no warnings (unknown keys, bad values) either
    for needle in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "ReadWritePaths=-/sys/kernel/config/tsm/report",
                   "DevicePolicy=closed"):
        assert needle in service
