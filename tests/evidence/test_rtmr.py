"""RTMR3 extension through the (emulated) measurement sysfs, with a replayable crash-safe event log."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.evidence.rtmr import RtmrError, RtmrExtender, make_rtmr_extender, replay_event_log

pytestmark = [pytest.mark.integration]


def _expected(*events: bytes) -> bytes:
    value = bytes(48)
    for data in events:
        value = hashlib.sha384(value + hashlib.sha384(data).digest()).digest()
    return value


@pytest.fixture
def ext(measurements, tmp_path):
    mnt, state = measurements
    return RtmrExtender(os.path.join(mnt, "rtmr3:sha384"), str(tmp_path / "log" / "rtmr3.jsonl")), state


def test_extend_and_replay(ext) -> None:
    x, state = ext
    assert x.read() == bytes(48)
    v1 = x.extend("app.start", b"hello")
    v2 = x.extend("app.config", b"world")
    assert v1 == _expected(b"hello")
    assert v2 == _expected(b"hello", b"world") == state.rtmr(3)
    assert state.rtmr(0) == bytes(48)  # only RTMR3 touched
    assert replay_event_log(x.event_log_path) == state.rtmr(3)
    records = [json.loads(line) for line in Path(x.event_log_path).read_text().splitlines()]
    assert [(r["seq"], r["event"], r["new"]) for r in records] == [
        (1, "app.start", v1.hex()), (2, "app.config", v2.hex())
    ]
    assert records[1]["digest"] == hashlib.sha384(b"world").hexdigest() and records[1]["old"] == v1.hex()
    assert os.stat(x.event_log_path).st_mode & 0o777 == 0o600


def test_missing_log_replays_to_zero(tmp_path) -> None:
    assert replay_event_log(str(tmp_path / "none.jsonl")) == bytes(48)


def test_crash_between_log_and_extend_is_redone(ext, monkeypatch) -> None:
    x, state = ext
    x.extend("one", b"1")

    def crash(self, digest):  # the process dies after the fsync'ed log record, before the sysfs write
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(RtmrExtender, "_write_digest", crash)
        with pytest.raises(KeyboardInterrupt):
            x.extend("two", b"2")
    assert state.rtmr(3) == _expected(b"1")  # not applied
    assert replay_event_log(x.event_log_path) == _expected(b"1", b"2")  # but logged
    v = x.extend("three", b"3")  # recovery re-applies "two" first
    assert v == _expected(b"1", b"2", b"3") == state.rtmr(3) == replay_event_log(x.event_log_path)


def test_failed_write_is_aborted_in_the_log(ext) -> None:
    x, state = ext
    x.extend("one", b"1")
    state.fail_writes(1)
    with pytest.raises(RtmrError, match="failed"):
        x.extend("two", b"2")
    assert replay_event_log(x.event_log_path) == state.rtmr(3) == _expected(b"1")
    assert x.extend("three", b"3") == _expected(b"1", b"3") == replay_event_log(x.event_log_path)


def test_torn_tail_is_discarded(ext) -> None:
    x, _ = ext
    x.extend("one", b"1")
    with open(x.event_log_path, "ab") as f:
        f.write(b'{"type":"extend","seq":2,"ev')  # crash mid-append
    assert replay_event_log(x.event_log_path) == _expected(b"1")
    assert x.extend("two", b"2") == _expected(b"1", b"2") == replay_event_log(x.event_log_path)


def test_extension_outside_the_log_is_detected(ext) -> None:
    x, _ = ext
    x.extend("one", b"1")
    fd = os.open(x.sysfs_path, os.O_WRONLY)
    os.write(fd, hashlib.sha384(b"rogue").digest())
    os.close(fd)
    with pytest.raises(RtmrError, match="does not match the event log"):
        x.extend("two", b"2")


def test_tampered_log_fails_replay(ext) -> None:
    x, _ = ext
    x.extend("one", b"1")
    x.extend("two", b"2")
    lines = Path(x.event_log_path).read_text().splitlines()
    rec = json.loads(lines[0])
    rec["data"] = "AAAA"
    lines[0] = json.dumps(rec)
    Path(x.event_log_path).write_text("\n".join(lines) + "\n")
    with pytest.raises(RtmrError, match=":1: digest does not match"):
        replay_event_log(x.event_log_path)


def test_concurrent_extenders_serialise_on_the_lock(ext) -> None:
    x, state = ext
    errors: list[BaseException] = []

    def work(i: int) -> None:
        other = RtmrExtender(x.sysfs_path, x.event_log_path)  # own fd, own flock
        try:
            for j in range(5):
                other.extend(f"t{i}", f"{i}-{j}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert state.extends == 20
    assert len(Path(x.event_log_path).read_text().splitlines()) == 20
    assert replay_event_log(x.event_log_path) == state.rtmr(3)


def test_sysfs_abi_rejects_partial_writes(measurements) -> None:
    mnt, state = measurements
    fd = os.open(os.path.join(mnt, "rtmr3:sha384"), os.O_WRONLY)
    with pytest.raises(OSError) as exc:
        os.write(fd, bytes(47))
    os.close(fd)
    assert exc.value.errno == 22 and state.extends == 0


def test_off_by_default() -> None:
    cfg = AgentConfig()
    assert make_rtmr_extender(cfg) is None
    cfg.rtmr.enabled = True
    x = make_rtmr_extender(cfg)
    assert isinstance(x, RtmrExtender) and x.sysfs_path == "/sys/class/misc/tdx_guest/measurements/rtmr3:sha384"
