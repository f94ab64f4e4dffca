"""Structured journald output read back: the service logs through systemd-python's sd_journal_send to
/run/systemd/journal/socket; here that path (in a private mount namespace) is a datagram socket owned by
the test, and the entries are decoded from the journal native protocol."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from agent.log import message_id
from tests.serve.helpers import make_cfg
from tests.serve.proc import NotifyListener, spawn, stop
from tests.serve.test_systemd import get, http

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from journal_sink import NS_PREFIX, receive  # (the one decoder of the journal native protocol)

pytestmark = pytest.mark.integration


class JournalReader(threading.Thread):
    """Reads datagrams as journald would (the sender blocks when the queue is full)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.entries: list[dict[str, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            entry = receive(self.sock)
            if entry is not None:
                self.entries.append(entry)


def test_journald_entries_have_stable_ids_and_fields(short_tmp: Path, sim_dir: Path) -> None:
    jdir = short_tmp / "journal"
    jdir.mkdir()
    jsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    jsock.bind(str(jdir / "socket"))
    jsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    reader = JournalReader(jsock)
    reader.start()
    notify = NotifyListener(short_tmp / "notify.sock")
    cfg = make_cfg(short_tmp, sim_dir)
    proc = spawn(cfg, short_tmp, env={"NOTIFY_SOCKET": notify.path}, log_format="journald",
                 prefix=[*NS_PREFIX, str(jdir)])
    try:
        notify.wait_for("READY=1")
        assert get(cfg.serve.chute_socket, "/v1/health")[0] == 200
        assert get(cfg.serve.chute_socket, "/v1/evidence?nonce=12")[0] == 400
        body = b'{"symmetric_key": "' + b"5a" * 16 + b'", "proto": "tcp", "port": 1}'
        answer = http(cfg.serve.chute_socket, b"POST /v1/symkey/respond HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 200")
        rc, out = stop(proc)
        assert rc == 0, out
    finally:
        stop(proc)
        notify.close()
    reader.stop.set()
    reader.join()
    jsock.close()
    entries = reader.entries
    assert entries, "no journal entries received"
    for e in entries:
        assert e["SYSLOG_IDENTIFIER"] == "chutes-attest"
        assert e["MESSAGE_ID"] == message_id(e["EVENT"])
    requests = [e for e in entries if e["EVENT"] == "serve.request"]
    # routine successes are summed, a refusal gets its own line
    assert [(r["ROUTE"], r["STATUS"]) for r in requests] == [("/v1/evidence", "400")]
    summaries = [e for e in entries if e["EVENT"] == "serve.request_summary"]
    assert len(summaries) == 1  # flushed at stop (the interval is a minute)
    summary = summaries[0]
    assert summary["MESSAGE_ID"] == message_id("serve.request_summary") == "6f6da2593442530eaa44d0ef28cd1fd5"
    assert json.loads(summary["COUNTS"]) == {"chute /v1/evidence 400 host": 1, "chute /v1/health 200 host": 1,
                                             "chute /v1/symkey/respond 200 host": 1}
    assert json.loads(summary["BY_CLASS"]) == {"host": 3}
    assert (summary["REQUESTS"], summary["ERRORS"], summary["SLOW"]) == ("3", "1", "0")
    for r in requests:
        assert r["MESSAGE_ID"] == message_id("serve.request") == "b78220e0841b5b4ab128b1c96cb7fa72"
        assert r["PEER_PID"] == str(os.getpid()) and r["PEER_UID"] == str(os.getuid())
        assert float(r["DURATION_MS"]) >= 0 and r["SOCKET"] == "chute" and r["PRIORITY"] == "6"
        assert "CONTAINER" in r
        assert r["MESSAGE"].startswith("serve.request ")
    events = {e["EVENT"] for e in entries}
    assert {"serve.self_check", "serve.ready", "serve.draining", "serve.stopped"} <= events
    assert not any("5a" * 16 in v for e in entries for v in e.values())  # the key never reaches the journal
