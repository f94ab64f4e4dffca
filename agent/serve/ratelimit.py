"""Per-caller token buckets: a busy container slows itself down, not its neighbours.

One :class:`KeyedLimiter` per resource class (evidence, nonces), keyed by the caller scope
(:attr:`agent.serve.peer.Peer.scope`). The key table is a bounded LRU so a flood of distinct
callers cannot grow memory without limit.
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

    def take(self, n: float = 1.0) -> float:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
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

    def check(self, key: str) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, self._clock)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        wait = bucket.take()
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
