"""Logging: JSON lines carry stable message ids; secrets never reach a sink."""

from __future__ import annotations

import io
import json

from agent import log


def test_json_lines_with_stable_message_id_and_redaction() -> None:
    buf = io.StringIO()
    assert log.configure("debug", "json", stream=buf) == "json"
    secret = log.Secret(b"hunter2-passphrase")
    log.get_logger("t").info("boot.stage", stage="unlock", duration_ms=12, passphrase="hunter2-passphrase",
                             value=secret)
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["event"] == "boot.stage"
    assert line["stage"] == "unlock"
    assert line["message_id"] == log.message_id("boot.stage")
    assert line["passphrase"] == log.REDACTED
    assert line["value"] == log.REDACTED
    assert "hunter2" not in buf.getvalue()
    assert log.message_id("boot.stage") == log.message_id("boot.stage")
    assert log.message_id("boot.stage") != log.message_id("boot.failed")
    assert len(log.message_id("x")) == 32


def test_secret_wipe_and_repr() -> None:
    s = log.Secret("abc")
    buf = s.reveal()
    assert bytes(buf) == b"abc"
    assert repr(s) == str(s) == "<redacted>"
    s.wipe()
    assert len(s) == 0 and bytes(buf) == b""


def test_level_filtering() -> None:
    buf = io.StringIO()
    log.configure("warning", "json", stream=buf)
    log.get_logger().info("quiet.event")
    log.get_logger().warning("loud.event")
    out = buf.getvalue()
    assert "quiet.event" not in out and "loud.event" in out


def test_logger_created_before_configure_follows_configuration() -> None:
    early = log.get_logger("early.module")
    buf = io.StringIO()
    log.configure("info", "json", stream=buf)
    early.info("late.event", n=1)
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["event"] == "late.event" and line["module"] == "early.module"
