"""Per-caller token buckets: a busy container slows itself down, not its neighbours.

One :class:`KeyedLimiter` per resource class (evidence, nonces, relay calls; and each socket's request
pacing), keyed by the caller scope (:attr:`agent.serve.peer.Peer.scope`). Two ways to use one:

- ``check(key)``: refuse over the rate (0 = allowed, else the Retry-After in seconds);
- ``charge(key)`` then ``debt_s(key)``: never refuse, but say how long the caller is over its rate, so
  its next bytes can wait unread until the debt is paid back (request pacing, :mod:`agent.serve.gate`).

The key table is bounded and evicts the least recently *used* key (every check or charge moves its key
to the end), so a flood of distinct callers cannot grow memory without limit, and an active caller's
bucket (a debtor's debt included) is never the one dropped; a dropped bucket starts again full.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Classic token bucket; ``take()`` returns 0 when allowed, else seconds until a token is available."""

    __slots__ = ("_clock", "_last", "burst", "rate", "tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def charge(self, n: float = 1.0) -> None:
        """Take ``n`` tokens even if there are not enough (the balance may go negative: a debt)."""
        self._refill()
        self.tokens -= n

    def debt_s(self) -> float:
        """Seconds until the balance is back to zero (0: no debt)."""
        self._refill()
        if self.tokens >= 0:
            return 0.0
        return math.inf if self.rate <= 0 else -self.tokens / self.rate

    def take(self, n: float = 1.0) -> float:
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (n - self.tokens) / self.rate


class KeyedLimiter:
    """Token buckets per key; ``check(key)`` -> 0 (allowed) or the Retry-After in seconds."""

    def __init__(
        self, rate_per_s: float, burst: int, *, max_keys: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._max = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.rejected = 0

    def _bucket(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, self._clock)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)  # the least recently used
        else:
            self._buckets.move_to_end(key)
        return bucket

    def charge(self, key: str) -> None:
        """One unit used by ``key``, allowed or not (see :meth:`debt_s`)."""
        self._bucket(key).charge()

    def debt_s(self, key: str) -> float:
        """Seconds ``key`` is over its rate (0: within it; a key not seen is within it)."""
        bucket = self._buckets.get(key)
        return bucket.debt_s() if bucket is not None else 0.0

    def check(self, key: str) -> float:
        wait = self._bucket(key).take()
        if wait:
            self.rejected += 1
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    """Retry-After is whole seconds (RFC 9110); round up and never say 0 for a refusal."""
    if math.isinf(wait_s):
        return "3600"
    return str(max(1, math.ceil(wait_s)))
