"""Connection timeouts alone: the verdict for one connection at a given time, and the sweep's schedule."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from agent.serve import timeouts
from agent.serve.timeouts import ANSWERED, IDLE, SLOW_BODY, SLOW_HEAD, Sweeper, sweep_interval, verdict


class _Body:
    def __init__(self, done: bool) -> None:
        self.done = done

    def is_eof(self) -> bool:
        return self.done


@dataclass
class _St:
    busy: bool = False
    eof: bool = False
    phase: str = "idle"
    since: float = 100.0
    payload: Any = None


def _v(st: _St, now: float, pending: bool = False) -> str | None:
    return verdict(st, now, idle_s=10.0, header_s=2.0, pending=lambda: pending)


@pytest.mark.parametrize(("st", "now", "pending", "want"), [
    (_St(), 110.0, False, None),  # idle, exactly at the limit
    (_St(), 110.1, False, IDLE),
    (_St(phase="head"), 102.0, False, None),
    (_St(phase="head"), 102.1, False, SLOW_HEAD),  # a head dribbled past the receive window
    (_St(busy=True, payload=_Body(False)), 102.1, False, SLOW_BODY),
    (_St(busy=True, payload=_Body(True)), 999.0, False, None),  # body in: the handler may take its time
    (_St(busy=True), 999.0, False, None),  # no body stream
    (_St(eof=True), 101.0, True, None),  # half-closed, an answer still on its way
    (_St(eof=True), 101.0, False, ANSWERED),  # half-closed and answered: close
    (_St(eof=True), 110.1, True, ANSWERED),  # half-closed, pending too long
])
def test_verdict(st: _St, now: float, pending: bool, want: str | None) -> None:
    assert _v(st, now, pending) == want


def test_pending_only_asked_for_half_closed() -> None:
    def boom() -> bool:
        raise AssertionError("pending() asked")

    assert verdict(_St(), 105.0, idle_s=10, header_s=2, pending=boom) is None


def test_sweep_interval_bounds() -> None:
    assert sweep_interval(75.0, 10.0) == 1.0
    assert sweep_interval(0.8, 0.4) == pytest.approx(0.1)
    assert sweep_interval(0.01, 0.01) == 0.05


async def test_sweeper_runs_while_there_is_something_to_watch() -> None:
    left = [3]
    done = asyncio.Event()

    def sweep() -> bool:
        left[0] -= 1
        if not left[0]:
            done.set()
        return left[0] > 0

    s = Sweeper(0.001, sweep)
    s.schedule()
    s.schedule()  # already scheduled: one timer
    await asyncio.wait_for(done.wait(), 10)
    assert left[0] == 0 and s._handle is None  # stopped by itself
    s.schedule()
    s.cancel()
    assert s._handle is None and timeouts.IDLE == "idle"
