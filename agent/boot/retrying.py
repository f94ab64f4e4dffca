"""One retry helper for every retried validator call, bounded by the boot's total time budget.

Why one: the boot exchange (nonce → quote → attestation) and the legacy cache-key call used to repeat
the same loop; now each passes one attempt as a coroutine factory and :meth:`CallBudget.retried`
decides, logs, sleeps (as a timed ``backoff`` stage) and gives up the same way (reference §3.6).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.boot.failure import BootFailure
from agent.boot.stages import StageTimer
from agent.evidence.base import QuoteSourceError
from agent.exitcodes import EXIT_UNAVAILABLE
from agent.log import get_logger
from agent.validator.errors import ValidatorError, ValidatorTransportError
from agent.validator.retry import Action, RetryPolicy

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class CallBudget:
    """The retry policy, the total time budget and the sleep function shared by every validator call."""

    policy: RetryPolicy
    timer: StageTimer
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.policy.total_timeout_s - self.elapsed()

    async def bounded(self, endpoint: str, coro: Awaitable[T]) -> T:
        """Bound one request by the remaining total budget (on top of the per-request timeout)."""
        left = self.remaining()
        if left <= 0:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise ValidatorTransportError(endpoint, "total time budget exhausted")
        try:
            return await asyncio.wait_for(coro, timeout=left)
        except TimeoutError:
            raise ValidatorTransportError(endpoint, "total time budget exhausted") from None

    async def retried(self, what: str, stage: str, attempt: Callable[[int], Awaitable[T]],
                      on_attempt: Callable[[int], Any] | None = None) -> T:
        """Run ``attempt(n)`` until it returns; :class:`BootFailure` (stage ``stage``) when the policy stops.

        ``attempt`` raises :class:`ValidatorError` (decided by the policy), a retryable
        :class:`QuoteSourceError` (treated like a transport failure), or :class:`BootFailure` (final).
        """
        n = 0
        while True:
            n += 1
            if on_attempt is not None:
                on_attempt(n)
            try:
                return await attempt(n)
            except QuoteSourceError as exc:
                if not exc.retryable:
                    raise BootFailure("quote", f"quote: {exc}", EXIT_UNAVAILABLE) from None
                err_text = f"quote: {exc}"
                decision = self.policy.decide(ValidatorTransportError("quote", str(exc)), n, self.elapsed())
            except ValidatorError as exc:
                if getattr(exc, "final", False):
                    raise BootFailure(stage, f"{what}: {exc}") from None
                err_text, decision = str(exc), self.policy.decide(exc, n, self.elapsed())
            log.warning("boot.retry", call=what, attempt=n, error=err_text, action=decision.action.value,
                        delay_s=round(decision.delay_s, 3), why=decision.why)
            if decision.action is Action.STOP:
                raise BootFailure(stage, f"{what} failed after {n} attempt(s): {err_text}; {decision.why}")
            with self.timer.stage("backoff", attempt=n) as st, st.waiting("backoff"):
                st.detail = f"{decision.delay_s:.2f}s ({decision.why})"
                await self.sleep(decision.delay_s)
