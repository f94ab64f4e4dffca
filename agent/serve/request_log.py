"""What the journal gets per request, so an operator can still read it at thousands of requests a second.

- A refusal or error (status >= 400, 499 for a caller that went away) and a slow request (over
  ``serve.slow_request_ms``) are logged as they happen, one ``serve.request`` line each, capped per
  caller (:data:`LINES_PER_CALLER_PER_S`) so one flooding caller cannot bury the others; what the cap
  drops is counted and named in the next summary.
- A routine success (2xx/3xx, not slow) is counted, never logged on its own: every
  ``serve.request_summary_interval_s`` one ``serve.request_summary`` line gives the counts per socket,
  route, status and caller class, the slow and error counts and the largest duration. At debug level
  each routine request is logged too (``serve.request`` at debug).
- ``serve.request_log = "each"`` restores one ``serve.request`` line per request at info.

The MESSAGE_IDs are those of the event names (``serve.request``, ``serve.request_summary``), stable across
versions. The same counters since start are in ``/v1/status`` (``counters.request_log``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.log import get_logger
from agent.serve.peer import Peer

log = get_logger("agent.serve.request")

#: Lines one caller (scope) may cause per second as refusals, errors or slow requests; the rest are counted.
LINES_PER_CALLER_PER_S = 10
#: Callers whose line budget is tracked at once (a caller can mint unidentified keys by forking).
MAX_TRACKED_CALLERS = 4096
MODES = ("summary", "each")


class RequestLog:
    """Decides, per finished request, between a line now and a count in the next summary."""

    def __init__(self, *, mode: str = "summary", interval_s: float = 60.0, slow_ms: float = 1000.0,
                 clock: Callable[[], float] = time.monotonic,
                 logger: Any = None) -> None:
        if mode not in MODES:
            raise ValueError(f"request log mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.interval_s = interval_s
        self.slow_ms = slow_ms
        self._clock = clock
        # bound once: a concrete logger, not the lazy proxy that re-binds per call (configure logging first)
        self._log = (logger if logger is not None else log).bind()
        self._info = self._log.info
        self._debug_each = mode == "summary" and _enabled(self._log, logging.DEBUG)
        self._window: Counter[tuple[str, str, int, str]] = Counter()  # (socket, route, status, class) -> n
        self._slow = 0
        self._errors = 0
        self._suppressed: Counter[str] = Counter()  # caller class -> lines dropped by the per-caller cap
        self._max_ms = 0.0
        self._window_start = clock()
        self._budget: dict[str, tuple[float, int]] = {}  # scope -> (second it counts for, lines in it)
        self.totals: Counter[str] = Counter(requests=0, logged=0, summarised=0, suppressed=0, summaries=0)

    def record(self, socket: str, method: str, route: str, status: int, duration_ms: float, peer: Peer) -> None:
        """Account one finished request (called by the middleware, once per request)."""
        klass = peer.caller_class
        self._window[(socket, route, status, klass)] += 1
        if duration_ms > self._max_ms:
            self._max_ms = duration_ms
        totals = self.totals
        totals["requests"] += 1
        slow = duration_ms > self.slow_ms
        if self.mode == "each" or status >= 400 or slow:
            if slow:
                self._slow += 1
            if status >= 400:
                self._errors += 1
            if self.mode == "summary" and not self._take_line(peer.scope):
                self._suppressed[klass] += 1
                totals["suppressed"] += 1
                return
            totals["logged"] += 1
            self._info("serve.request", socket=socket, method=method, route=route, status=status,
                       duration_ms=duration_ms, peer_pid=peer.pid, peer_uid=peer.uid,
                       container=peer.container or peer.pod or "", caller_class=klass,
                       **({"slow": True} if slow else {}))
            return
        totals["summarised"] += 1
        if self._debug_each:
            self._log.debug("serve.request", socket=socket, method=method, route=route, status=status,
                            duration_ms=duration_ms, peer_pid=peer.pid, peer_uid=peer.uid,
                            container=peer.container or peer.pod or "", caller_class=klass)

    def _take_line(self, scope: str) -> bool:
        second = int(self._clock())
        seen = self._budget.get(scope)
        if seen is None or seen[0] != second:
            if seen is None and len(self._budget) >= MAX_TRACKED_CALLERS:
                self._budget.clear()  # forget every budget rather than grow without bound
            self._budget[scope] = (second, 1)
            return True
        if seen[1] >= LINES_PER_CALLER_PER_S:
            return False
        self._budget[scope] = (second, seen[1] + 1)
        return True

    def seconds_until_due(self) -> float:
        """How long until the current window's summary is due (<= 0: now)."""
        return self._window_start + self.interval_s - self._clock()

    def flush(self) -> dict[str, Any] | None:
        """Log the summary of the window that ends now (nothing when no request came); return its fields."""
        now = self._clock()
        elapsed = now - self._window_start
        self._window_start = now
        self._budget.clear()
        if not self._window:
            return None
        counts = {f"{s} {r} {st} {k}": n for (s, r, st, k), n in sorted(self._window.items())}
        fields: dict[str, Any] = {
            "interval_s": round(elapsed, 1), "requests": sum(self._window.values()), "counts": counts,
            "by_class": dict(sorted(_by_class(self._window).items())),
            "errors": self._errors, "slow": self._slow, "max_duration_ms": self._max_ms,
        }
        if self._suppressed:
            fields["lines_suppressed"] = dict(sorted(self._suppressed.items()))
        self._window.clear()
        self._suppressed.clear()
        self._slow = self._errors = 0
        self._max_ms = 0.0
        self.totals["summaries"] += 1
        self._info("serve.request_summary", **fields)
        return fields

    def status(self) -> dict[str, Any]:
        """Counters for ``/v1/status`` (whole-service view)."""
        return {"mode": self.mode, "interval_s": self.interval_s, "slow_ms": self.slow_ms, **self.totals,
                "pending_in_window": sum(self._window.values())}


def _by_class(window: Counter[tuple[str, str, int, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_s, _r, _st, klass), n in window.items():
        out[klass] += n
    return out


def _enabled(logger: Any, level: int) -> bool:
    """Whether ``logger`` would emit at ``level`` (structlog's filtering loggers know; a lazy proxy binds)."""
    check = getattr(logger, "is_enabled_for", None)
    return bool(check(level)) if check is not None else False
