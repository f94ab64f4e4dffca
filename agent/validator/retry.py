"""What to do after a failed validator call, by status code (chutes-vm-generations.md §3.6).

200 done; 401/403/404 give up; 400 (nonce refused, §12.5) retries with a fresh nonce; 429 backs off
(honouring ``Retry-After``); 5xx, redirects, connection failures, timeouts and incomplete bodies retry.
Attempts and total time are bounded (reference §3.6).
Pure logic, no I/O: the caller sleeps.
"""

from __future__ import annotations

import email.utils
import enum
import re
import time
from dataclasses import dataclass

from agent.validator.errors import ValidatorError, ValidatorHTTPError


class Action(enum.Enum):
    RETRY = "retry"
    STOP = "stop"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float
    why: str


_DELTA_SECONDS = re.compile(r"[0-9]{1,9}")  # ASCII digits only ("²".isdigit() is True)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unparseable."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds and delays of the boot retry loop (reference §3.6); ``attempt`` counts from 1.

    401/403/404 stop at once (hotkey proof refused; certificate, quote, measurement or subnet refused;
    unknown VM: a retry cannot change that); 400 (a bad, expired or used nonce, §12.5) waits
    ``backoff_s`` and retries with a fresh nonce; 429 waits ``Retry-After`` when sent, else
    ``2 × attempt + backoff_s``; every other failure (5xx, a redirect, no connection, a timeout, a 200
    without the required fields) waits ``backoff_s`` and retries with a fresh nonce, until
    ``max_attempts`` or the total budget runs out.
    """

    max_attempts: int = 3
    total_timeout_s: float = 300.0
    backoff_s: float = 2.0
    backoff_max_s: float = 30.0

    def decide(self, exc: ValidatorError, attempt: int, elapsed_s: float) -> Decision:
        """Retry or stop after ``exc`` ended attempt number ``attempt``."""
        if isinstance(exc, ValidatorHTTPError):
            status = exc.status
            if status in (401, 403, 404):
                # Newest validator (reference §12.5): 401 = the hotkey proof (or a blacklisted hotkey); 403 =
                # client certificate, quote, quote signature, measurement, route/front or subnet; 404 = unknown VM.
                what = {401: "refused (hotkey proof, signature or blacklisted hotkey)",
                        403: "forbidden (client certificate, quote, signature, measurement, front or subnet)",
                        404: "not known to the validator"}[status]
                return Decision(Action.STOP, 0.0, f"{status}: {what}, giving up")
            if status == 400:
                # "Nonce is invalid, expired, or already used. Fetch a fresh one …" (§12.5): the next attempt
                # starts with GET /servers/nonce, so it carries a fresh nonce.
                delay, why = min(self.backoff_s, self.backoff_max_s), "400: nonce refused, retrying with a fresh nonce"
            elif status == 429:
                delay = exc.retry_after_s if exc.retry_after_s is not None else 2.0 * attempt + self.backoff_s
                # Honoured in full (not capped by backoff_max_s); the total time budget still bounds it.
                why = "429: rate limited" + (" (Retry-After honoured)" if exc.retry_after_s is not None else "")
            else:
                delay, why = min(self.backoff_s, self.backoff_max_s), f"{status}: retrying"
        else:
            delay, why = min(self.backoff_s, self.backoff_max_s), "no usable answer, retrying"
        if attempt >= self.max_attempts:
            return Decision(Action.STOP, 0.0, f"{why}; attempts exhausted ({attempt}/{self.max_attempts})")
        if elapsed_s + delay >= self.total_timeout_s:
            return Decision(Action.STOP, 0.0, f"{why}; total time budget {self.total_timeout_s:g}s exhausted")
        return Decision(Action.RETRY, delay, why)
