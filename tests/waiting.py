"""Waiting in tests without guessing: poll a condition until it holds, under a generous deadline.

A test never sleeps and then checks (a busy machine makes any fixed delay too short) and never asserts on
wall-clock durations; it waits for the state it needs and fails, naming what it waited for, only when that
state does not come within the deadline (which is a hang guard, not a timing claim).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Long enough that a loaded CI machine never reaches it for a condition that is going to hold.
DEADLINE_S = 30.0
POLL_S = 0.01


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = DEADLINE_S) -> T:
    """Call ``condition`` until it returns something true, and return that; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g}s for {what}; last value {value!r}")
        time.sleep(POLL_S)


async def async_wait_until(condition: Callable[[], T | Awaitable[T]], what: str,
                           timeout_s: float = DEADLINE_S) -> T:
    """:func:`wait_until` on the event loop (the loop runs between polls); ``condition`` may be async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"waited {timeout_s:g}s for {what}; last value {value!r}")
        await asyncio.sleep(POLL_S)
