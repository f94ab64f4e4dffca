"""The hardware quote queue: one owner of the (slow, serial) quote source, shared fairly by all callers.

A TDX quote takes about a second and the kernel serialises them per VM (tdx-quote.md §2.2), so
callers must not each block a thread on the source. This queue:

- runs the blocking ``source.get_quote`` on one dedicated thread, one request at a time;
- serves callers round-robin (one job per caller per turn), so a chatty caller cannot starve others;
- is bounded: with ``max_len`` distinct requests waiting, new ones get :class:`QueueFullError` with a
  ``retry_after_s`` estimate (one average quote time: when the next slot frees up) → HTTP 429;
- gives each caller a bounded share: one caller has at most ``max_per_caller`` requests waiting;
- keeps ``reserved`` of the ``max_len`` slots for the reserved lane (the compat socket: the validator's
  own evidence pull), whose requests are also served first: shared-lane callers (chute containers) can
  fill at most ``max_len - reserved`` slots and can never make the validator's path wait behind them;
- gives each request a deadline: a waiter gets :class:`DeadlineExceeded` when it passes, and a request
  whose waiters all gave up or expired is dropped before it reaches the hardware;
- coalesces identical report_data (queued or in flight) into one quote: the quote binds the same
  64 bytes, so sharing it is exactly as fresh as generating it twice;
- is cancellation-safe: a cancelled waiter only leaves its own request; the shared future is shielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from agent.evidence.base import REPORT_DATA_LEN, DeadlineExceeded, QueueFullError, QuoteSource, QuoteSourceError
from agent.log import get_logger

log = get_logger(__name__)

_EWMA_ALPHA = 0.3
SHARED_LANE = "shared"
RESERVED_LANE = "reserved"
#: Which lane a request uses, set by whoever knows where the request came from (the serve middleware
#: sets RESERVED_LANE for the compat socket); a context variable so it follows the request's task.
queue_lane: ContextVar[str] = ContextVar("quote_queue_lane", default=SHARED_LANE)
_STATS = (
    "submitted", "coalesced", "rejected_full", "rejected_caller_share", "served", "deadline_exceeded", "cancelled",
    "failed", "expired_skipped", "abandoned", "source_calls", "source_errors",
)


@dataclass(eq=False)
class _Job:
    report_data: bytes
    caller: str
    future: asyncio.Future[bytes]
    deadline: float  # loop time; the latest deadline among its waiters
    lane: str = SHARED_LANE
    state: str = "queued"  # queued -> running -> done
    waiters: int = 0
    callers: set[str] = field(default_factory=set)


def _mark_retrieved(fut: asyncio.Future[bytes]) -> None:
    if not fut.cancelled():
        fut.exception()  # nobody may be left to await it; keep asyncio from warning


class QuoteQueue:
    """Async front of a blocking :class:`QuoteSource`; see the module docstring for the guarantees."""

    def __init__(self, source: QuoteSource, *, max_len: int, default_deadline_s: float,
                 max_per_caller: int | None = None, reserved: int = 0) -> None:
        if max_len <= 0:
            raise ValueError(f"max_len: must be > 0, got {max_len}")
        if not 0 <= reserved < max_len:
            raise ValueError(f"reserved: must be 0..max_len-1 ({max_len - 1}), got {reserved}")
        if default_deadline_s <= 0:
            raise ValueError(f"default_deadline_s: must be > 0, got {default_deadline_s}")
        self._source = source
        self._max_len = max_len
        self._max_per_caller = max_per_caller or max_len
        self._reserved = reserved
        self._default_deadline_s = default_deadline_s
        self._jobs: dict[bytes, _Job] = {}  # queued or running, by report_data
        # per lane: per-caller FIFO, round-robin order; the reserved lane is served first
        self._lanes: dict[str, OrderedDict[str, deque[_Job]]] = {RESERVED_LANE: OrderedDict(),
                                                                 SHARED_LANE: OrderedDict()}
        self._queued = 0
        self._queued_shared = 0
        self._running: _Job | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quote-source")
        self._avg_s: float | None = None
        self._closed = False
        self.stats: dict[str, Any] = dict.fromkeys(_STATS, 0)

    # -- introspection ----------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Distinct requests waiting for the source (not counting the one in flight)."""
        return self._queued

    def queued_for(self, caller: str) -> int:
        """Requests this caller has waiting (both lanes)."""
        return sum(len(lane.get(caller, ())) for lane in self._lanes.values())

    @property
    def in_flight(self) -> bool:
        return self._running is not None

    @property
    def avg_source_s(self) -> float | None:
        """Moving average of the source's time per quote (None before the first quote)."""
        return self._avg_s

    def retry_after_s(self) -> float:
        """When a refused caller should try again: about one quote time, when the next slot frees."""
        return round(self._avg_s if self._avg_s is not None else 1.0, 3)

    # -- the caller side --------------------------------------------------------------------------

    async def get(self, report_data: bytes, *, caller: str = "", deadline_s: float | None = None) -> bytes:
        """A quote for ``report_data`` (64 bytes), waiting at most ``deadline_s`` (default from init)."""
        if self._closed:
            raise QuoteSourceError("quote queue is closed")
        if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
            got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data).__name__
            raise ValueError(f"report_data: expected {REPORT_DATA_LEN} bytes, got {got}")
        budget = self._default_deadline_s if deadline_s is None else deadline_s
        if budget <= 0:
            raise ValueError(f"deadline_s: must be > 0, got {deadline_s}")
        loop = asyncio.get_running_loop()
        self._ensure_worker()
        deadline = loop.time() + budget
        key = bytes(report_data)
        self.stats["submitted"] += 1
        job = self._jobs.get(key)
        if job is not None:
            self.stats["coalesced"] += 1
            job.deadline = max(job.deadline, deadline)
        else:
            lane = RESERVED_LANE if queue_lane.get() == RESERVED_LANE else SHARED_LANE
            self._admit(caller, lane)
            job = _Job(key, caller, loop.create_future(), deadline, lane)
            job.future.add_done_callback(_mark_retrieved)
            self._jobs[key] = job
            self._lanes[lane].setdefault(caller, deque()).append(job)
            self._queued += 1
            if lane == SHARED_LANE:
                self._queued_shared += 1
            assert self._wakeup is not None
            self._wakeup.set()
        job.waiters += 1
        job.callers.add(caller)
        try:
            quote = await asyncio.wait_for(asyncio.shield(job.future), deadline - loop.time())
        except TimeoutError:
            self.stats["deadline_exceeded"] += 1
            raise DeadlineExceeded(
                f"no quote within the {budget:.3g} s deadline (queue depth {self._queued})"
            ) from None
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        except Exception:
            self.stats["failed"] += 1
            raise
        finally:
            job.waiters -= 1
            if job.waiters == 0 and job.state == "queued":
                self._unqueue(job)
                self.stats["abandoned"] += 1
        self.stats["served"] += 1
        return quote

    def _admit(self, caller: str, lane: str) -> None:
        """Raise QueueFullError unless the queue, this lane and this caller's share all have room."""
        if self._queued >= self._max_len:
            why = f"quote queue full ({self._queued} requests waiting)"
        elif lane == SHARED_LANE and self._queued_shared >= self._max_len - self._reserved:
            why = f"quote queue full for callers of this socket ({self._queued_shared} requests waiting)"
        elif len(self._lanes[lane].get(caller, ())) >= self._max_per_caller:
            self.stats["rejected_caller_share"] += 1
            why = f"this caller already has {self._max_per_caller} quote requests waiting"
        else:
            return
        self.stats["rejected_full"] += 1
        raise QueueFullError(why, retry_after_s=self.retry_after_s())

    def _dequeued(self, job: _Job) -> None:
        self._queued -= 1
        if job.lane == SHARED_LANE:
            self._queued_shared -= 1

    def _unqueue(self, job: _Job) -> None:
        """Remove a job nobody waits for any more, before it reaches the hardware."""
        queues = self._lanes[job.lane]
        dq = queues.get(job.caller)
        if dq is not None:
            with contextlib.suppress(ValueError):
                dq.remove(job)
            if not dq:
                del queues[job.caller]
        self._dequeued(job)
        job.state = "done"
        self._jobs.pop(job.report_data, None)
        job.future.cancel()

    # -- the worker side --------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="quote-queue-worker")

    def _next_job(self) -> _Job | None:
        """Reserved lane first; within a lane round-robin: the head of the first caller's queue, and that
        caller then goes to the back."""
        for queues in (self._lanes[RESERVED_LANE], self._lanes[SHARED_LANE]):
            if queues:
                caller, dq = next(iter(queues.items()))
                del queues[caller]
                job = dq.popleft()
                if dq:
                    queues[caller] = dq
                self._dequeued(job)
                return job
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            job = self._next_job()
            if job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if loop.time() >= job.deadline:  # every waiter has timed out: never touch the hardware
                self.stats["expired_skipped"] += 1
                job.state = "done"
                self._jobs.pop(job.report_data, None)
                job.future.cancel()
                continue
            job.state = "running"
            self._running = job
            self.stats["source_calls"] += 1
            t0 = time.perf_counter()
            try:
                quote = await loop.run_in_executor(self._executor, self._source.get_quote, job.report_data)
            except Exception as exc:
                self.stats["source_errors"] += 1
                error = exc if isinstance(exc, QuoteSourceError) else QuoteSourceError(
                    f"quote source {getattr(self._source, 'name', '?')} failed: {exc}"
                )
                log.warning("quote.queue_source_error", callers=len(job.callers), reason=str(error))
                self._finish(job, error=error)
            else:
                self._finish(job, quote=quote)
            finally:
                took = time.perf_counter() - t0
                self._avg_s = took if self._avg_s is None else (1 - _EWMA_ALPHA) * self._avg_s + _EWMA_ALPHA * took

    def _finish(self, job: _Job, *, quote: bytes | None = None, error: BaseException | None = None) -> None:
        job.state = "done"
        self._running = None
        self._jobs.pop(job.report_data, None)
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            assert quote is not None
            job.future.set_result(quote)

    async def aclose(self) -> None:
        """Stop the worker; waiting callers get QuoteSourceError. A quote in flight is abandoned."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job in list(self._jobs.values()):
            if not job.future.done():
                job.future.set_exception(QuoteSourceError("quote queue is closed"))
        self._jobs.clear()
        for queues in self._lanes.values():
            queues.clear()
        self._queued = self._queued_shared = 0
        self._running = None
        self._executor.shutdown(wait=False, cancel_futures=True)
