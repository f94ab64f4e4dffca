"""RequestLog: what reaches the journal per request (refusals/errors/slow now, routine successes summed).

A fake clock and a recording logger stand in for time and structlog; every expected line and count is
written out here, not derived from the code under test.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent import config
from agent.serve.peer import Peer
from agent.serve.request_log import LINES_PER_CALLER_PER_S, RequestLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """Stands in for a bound structlog logger at a given level."""

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def bind(self) -> Recorder:
        return self

    def is_enabled_for(self, level: int) -> bool:
        return level >= self.level

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def debug(self, event: str, **kw: Any) -> None:
        if self.level <= logging.DEBUG:
            self.lines.append(("debug", event, kw))


def container(name: str, pid: int = 4242) -> Peer:
    return Peer(pid=pid, uid=0, gid=0, container=name, cgroup=f"/system.slice/docker-{name}.scope")


HOST = Peer(pid=1, uid=0, gid=0, cgroup="/system.slice/sshd.service")


def make(mode: str = "summary", level: int = logging.INFO) -> tuple[RequestLog, Recorder, Clock]:
    rec, clock = Recorder(level), Clock()
    return RequestLog(mode=mode, interval_s=60.0, slow_ms=1000.0, clock=clock, logger=rec), rec, clock


def test_routine_successes_are_summed_not_logged() -> None:
    rlog, rec, clock = make()
    a, b = container("a" * 64), container("b" * 64, pid=77)
    for _ in range(500):
        rlog.record("chute", "POST", "/v1/rint/nonce", 200, 0.4, a)
    for _ in range(3):
        rlog.record("chute", "GET", "/v1/evidence", 200, 12.5, b)
    rlog.record("compat", "GET", "/attest", 200, 30.0, HOST)
    assert rec.lines == []  # 504 requests, not one line yet
    clock.t += 60.0
    assert rlog.seconds_until_due() <= 0
    fields = rlog.flush()
    assert rec.lines == [("info", "serve.request_summary", fields)]
    assert fields == {
        "interval_s": 60.0, "requests": 504, "errors": 0, "slow": 0, "max_duration_ms": 30.0,
        "counts": {"chute /v1/evidence 200 container": 3, "chute /v1/rint/nonce 200 container": 500,
                   "compat /attest 200 host": 1},
        "by_class": {"container": 503, "host": 1},
    }
    assert rlog.flush() is None and len(rec.lines) == 1  # an empty window writes nothing


def test_refusals_errors_and_slow_requests_get_their_own_line() -> None:
    rlog, rec, _ = make()
    a = container("c" * 64)
    rlog.record("chute", "POST", "/v1/rint/nonce", 429, 0.2, a)
    rlog.record("chute", "GET", "/v1/evidence", 400, 0.3, a)
    rlog.record("compat", "GET", "/attest", 200, 1500.0, HOST)  # slow success
    rlog.record("chute", "GET", "/v1/evidence", 499, 3.0, a)  # the caller went away
    rlog.record("chute", "POST", "/v1/rint/nonce", 200, 0.2, a)  # routine: summed only
    assert [(lvl, ev, kw["route"], kw["status"]) for lvl, ev, kw in rec.lines] == [
        ("info", "serve.request", "/v1/rint/nonce", 429), ("info", "serve.request", "/v1/evidence", 400),
        ("info", "serve.request", "/attest", 200), ("info", "serve.request", "/v1/evidence", 499)]
    first = rec.lines[0][2]
    assert first == {"socket": "chute", "method": "POST", "route": "/v1/rint/nonce", "status": 429,
                     "duration_ms": 0.2, "peer_pid": 4242, "peer_uid": 0, "container": "c" * 64,
                     "caller_class": "container"}
    assert rec.lines[2][2]["slow"] is True and "slow" not in first
    summary = rlog.flush()
    assert summary is not None
    assert (summary["requests"], summary["errors"], summary["slow"]) == (5, 3, 1)
    assert summary["counts"]["chute /v1/rint/nonce 429 container"] == 1


def test_one_flooding_caller_cannot_bury_another_callers_refusal() -> None:
    rlog, rec, clock = make()
    flood, other = container("f" * 64), container("0" * 64, pid=99)
    for _ in range(1000):
        rlog.record("chute", "GET", "/v1/evidence", 429, 0.1, flood)
    rlog.record("chute", "GET", "/v1/evidence", 400, 0.1, other)
    lines = [kw for _, ev, kw in rec.lines if ev == "serve.request"]
    assert len(lines) == LINES_PER_CALLER_PER_S + 1 == 11
    assert lines[-1]["container"] == "0" * 64  # the neighbour's line is there
    clock.t += 1.0  # a new second: the flooder gets lines again
    rlog.record("chute", "GET", "/v1/evidence", 429, 0.1, flood)
    assert len([1 for _, ev, _ in rec.lines if ev == "serve.request"]) == 12
    summary = rlog.flush()
    assert summary is not None
    assert summary["lines_suppressed"] == {"container": 990}
    assert summary["errors"] == 1002 and summary["counts"]["chute /v1/evidence 429 container"] == 1001
    assert rlog.status()["suppressed"] == 990 and rlog.status()["logged"] == 12


def test_each_mode_logs_every_request() -> None:
    rlog, rec, _ = make(mode="each")
    for i in range(30):
        rlog.record("chute", "POST", "/v1/rint/nonce", 200 if i % 2 else 429, 0.1, HOST)
    assert len(rec.lines) == 30  # no per-caller cap either: the operator asked for every line
    assert rlog.status()["logged"] == 30


def test_debug_level_logs_routine_requests_at_debug() -> None:
    rlog, rec, _ = make(level=logging.DEBUG)
    rlog.record("chute", "POST", "/v1/rint/nonce", 200, 0.1, HOST)
    assert [(lvl, ev) for lvl, ev, _ in rec.lines] == [("debug", "serve.request")]


def test_unknown_mode_and_bad_config_are_refused() -> None:
    with pytest.raises(ValueError, match="request log mode 'every'"):
        RequestLog(mode="every")
    with pytest.raises(config.ConfigError, match=r"serve\.request_log"):
        config.load(None, ["serve.request_log=every"], environ={})
    with pytest.raises(config.ConfigError, match=r"serve\.request_summary_interval_s: must be > 0"):
        config.load(None, ["serve.request_summary_interval_s=0"], environ={})
    assert config.load(None, environ={}).serve.request_log == "summary"  # the production default


async def test_a_real_service_at_load_logs_refusals_and_summaries_not_each_request(service_factory) -> None:
    """Real HTTP over the real chute socket: 600 routine requests and 2 refusals make 2 request lines and
    summaries whose counts add up to exactly what was sent; /v1/status carries the same counters."""
    import asyncio

    from structlog.testing import capture_logs

    from tests.serve.helpers import unix_client
    from tests.waiting import async_wait_until

    with capture_logs() as logs:
        svc = await service_factory(request_summary_interval_s=0.2)
        async with unix_client(svc.cfg.serve.chute_socket, limit=20) as c:
            async def nonce() -> int:
                async with c.post("/v1/rint/nonce") as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(nonce() for _ in range(600)))
            async with c.get("/v1/no-such-route") as r:
                assert r.status == 404
            async with c.get("/v1/evidence?nonce=12") as r:
                assert r.status == 400

            def summed() -> dict[str, int]:
                out: dict[str, int] = {}
                for e in logs:
                    if e.get("event") == "serve.request_summary":
                        for k, n in e["counts"].items():
                            out[k] = out.get(k, 0) + n
                return out

            await async_wait_until(lambda: summed().get("chute /v1/evidence 400 host") == 1,
                                   "a summary counting the last request")
            async with c.get("/v1/status") as r:
                status = await r.json()
    assert statuses == [200] * 600
    # (no logging configuration in tests: everything down to debug is on, so routine ones come at debug)
    lines = [e for e in logs if e.get("event") == "serve.request" and e["log_level"] != "debug"]
    assert [(e["route"], e["status"]) for e in lines] == [("unmatched", 404), ("/v1/evidence", 400)]
    assert {e["log_level"] for e in logs if e.get("event") == "serve.request" and e["status"] == 200} == {"debug"}
    counts = summed()
    assert counts["chute /v1/rint/nonce 200 host"] == 600
    assert counts["chute unmatched 404 host"] == 1
    assert status["counters"]["requests"]["chute /v1/rint/nonce 200"] == 600
