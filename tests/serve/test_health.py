"""The health check alone: a pure function of the state the health loop samples."""

from __future__ import annotations

import pytest

from agent.serve.status import HealthState, health, responsive


@pytest.mark.parametrize(("state", "status", "source", "watchdog"), [
    (HealthState(0.01, 5.0, wedged=False), "ok", "ok", True),
    (HealthState(6.0, 5.0, wedged=False), "degraded", "ok", False),  # the loop lags
    (HealthState(0.0, 5.0, wedged=True), "degraded", "wedged", False),
    (HealthState(0.0, 5.0, wedged=False, consecutive_failures=2, last_error="EIO"), "degraded", "failing: EIO",
     True),  # failing, but responsive: the watchdog is still pinged (a restart would not help)
    (HealthState(0.0, 5.0, wedged=True, consecutive_failures=1, last_error="x"), "degraded", "wedged", False),
])
def test_health(state: HealthState, status: str, source: str, watchdog: bool) -> None:
    got, body = health(state)
    assert got == status and body == {"status": status, "loop_lag_ms": round(state.loop_lag_s * 1000, 1),
                                      "quote_source": source}
    assert responsive(state) is watchdog
    assert health(state) == (got, body)  # pure: same state, same answer
