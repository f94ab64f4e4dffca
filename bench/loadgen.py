"""Keep-alive HTTP/1.1 load over unix sockets from worker processes, for the serve benchmarks.

Each worker process runs ``clients`` bare :class:`asyncio.Protocol` connections, each sending its next
request as soon as the previous response is complete (no streams, no coroutine per request), so the
generator takes as little CPU from the server it measures as it can on a shared machine; workers run as
``SCHED_BATCH``. Every response is parsed (status line, Content-Length) and its body checked.

The parent never waits on a worker blindly: it waits on every worker's result pipe *and* its process
sentinel at once, so a worker that dies (killed, crashed, out of memory) is noticed when it exits, its
exit code named in :class:`WorkerDied`; the other workers are stopped. A worker whose load fails (a
connection lost mid-run, a refused connect) reports the error over its pipe instead of dying silently.
``timeout_s`` bounds the whole run (:class:`LoadTimeout`), for a server that stops answering.

    from loadgen import run_load
    result = run_load("/run/x.sock", total=100_000, clients=200, workers=2)
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

NONCE_REQUEST = b"POST /v1/rint/nonce HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_HEX32 = re.compile(r"[0-9a-f]{32}")


class LoadError(RuntimeError):
    """The load run failed; the message says which worker and why."""


class WorkerDied(LoadError):
    """A worker process exited without reporting its results (killed, crashed)."""


class LoadTimeout(LoadError):
    """The run did not finish within its ``timeout_s``."""


def valid_nonce_body(body: bytes) -> bool:
    """``{"nonce": <32 hex>, "expires_at": ...}``: the answer of ``POST /v1/rint/nonce``."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    nonce = data.get("nonce") if isinstance(data, dict) else None
    return isinstance(nonce, str) and _HEX32.fullmatch(nonce) is not None and "expires_at" in data


@dataclass
class LoadResult:
    elapsed_s: float
    latencies_s: list[float] = field(default_factory=list)
    #: Status of each response that was not 200 or whose body failed the check (0: no status line).
    errors: list[int] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct_ms(self, p: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000 if ordered else 0.0


class _Client(asyncio.Protocol):
    """One keep-alive connection: send, parse the whole response, send the next, ``n`` times."""

    def __init__(self, n: int, request: bytes, check: Callable[[bytes], bool], lat: list[float],
                 errors: list[int], done: asyncio.Future[None]) -> None:
        self.left = n
        self.request = request
        self.check = check
        self.lat = lat
        self.errors = errors
        self.done = done
        self.buf = b""
        self.t0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            if len(buf) < end + 4 + length:
                break
            body = buf[end + 4:end + 4 + length]
            buf = buf[end + 4 + length:]
            self.lat.append(time.perf_counter() - self.t0)
            status = int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0
            if status != 200 or not self.check(body):
                self.errors.append(status)
            self.left -= 1
            if self.left > 0:
                self._send()
            else:
                assert self.transport is not None
                self.transport.close()
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.left > 0:
                self.done.set_exception(ConnectionError(f"connection lost with {self.left} requests to go: {exc}"))
            else:
                self.done.set_result(None)


async def _client(path: str, n: int, request: bytes, check: Callable[[bytes], bool], lat: list[float],
                  errors: list[int]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_unix_connection(lambda: _Client(n, request, check, lat, errors, done), path)
    await done


def _worker(conn: Connection, path: str, clients: int, per_client: int, start_at: float, request: bytes,
            check: Callable[[bytes], bool]) -> None:
    if hasattr(os, "SCHED_BATCH"):
        # A batch job to the kernel: its wake-ups don't preempt the server mid-batch of responses (same
        # CPU share as before, fewer context switches), as if the load came from another machine.
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass

    async def main() -> tuple[list[float], list[int], float]:
        lat: list[float] = []
        errors: list[int] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*(_client(path, per_client, request, check, lat, errors) for _ in range(clients)))
        return lat, errors, time.time()

    try:
        result = asyncio.run(main())
    except BaseException as exc:  # reported, not raised: the parent names it instead of a bare exit code
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("ok", result))
    finally:
        conn.close()


class Load:
    """One load run: :meth:`start` forks the workers (their pids in :attr:`pids`), :meth:`wait` collects.

    ``total`` requests are split over ``clients`` connections (``total // clients`` each), the clients
    over ``workers`` processes; the clock starts ``start_delay_s`` after :meth:`start`, once all workers
    are up, and stops when the last response arrives.
    """

    def __init__(self, path: str, total: int, clients: int, workers: int, *, request: bytes = NONCE_REQUEST,
                 check: Callable[[bytes], bool] = valid_nonce_body, start_delay_s: float = 1.0,
                 context: Any = None) -> None:
        if clients < 1 or workers < 1 or total < clients:
            raise ValueError(f"need clients >= 1, workers >= 1, total >= clients; got {total}/{clients}/{workers}")
        self.path = path
        self.per_client = total // clients
        self.per_worker = [c for c in (clients // workers + (1 if i < clients % workers else 0)
                                       for i in range(workers)) if c]
        self.request = request
        self.check = check
        self.start_delay_s = start_delay_s
        self._ctx = context or mp.get_context()
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self.start_at = 0.0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def start(self) -> Load:
        self.start_at = time.time() + self.start_delay_s
        for clients in self.per_worker:
            parent_end, child_end = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_worker, daemon=True, args=(
                child_end, self.path, clients, self.per_client, self.start_at, self.request, self.check))
            proc.start()
            child_end.close()  # the parent keeps only its read end: EOF once the worker is gone
            self._procs.append(proc)
            self._conns.append(parent_end)
        return self

    def stop(self) -> None:
        """Kill whatever workers are still running and reap them (idempotent)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=10)
        for conn in self._conns:
            conn.close()

    def wait(self, timeout_s: float | None = None) -> LoadResult:
        """Every worker's results; :class:`WorkerDied` / :class:`LoadError` / :class:`LoadTimeout` otherwise
        (the remaining workers are stopped before it is raised)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = dict(enumerate(self._procs))
        results: dict[int, tuple[list[float], list[int], float]] = {}
        try:
            while pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise LoadTimeout(f"load did not finish within {timeout_s:g}s; workers still running: "
                                      + ", ".join(f"{i} (pid {p.pid})" for i, p in pending.items()))
                ready = set(wait([self._conns[i] for i in pending] + [p.sentinel for p in pending.values()],
                                 timeout=left))
                for i, proc in list(pending.items()):
                    conn = self._conns[i]
                    if conn not in ready and proc.sentinel not in ready:
                        continue
                    if proc.sentinel in ready and not conn.poll():
                        proc.join(timeout=10)
                        raise WorkerDied(f"load worker {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                                         "before reporting its results")
                    try:
                        kind, payload = conn.recv()
                    except EOFError:  # its pipe closed first: it died (or is dying) without results
                        proc.join(timeout=10)
                        raise WorkerDied(f"load worker {i} (pid {proc.pid}) exited with code {proc.exitcode} "
                                         "before reporting its results (its pipe closed)") from None
                    if kind != "ok":
                        raise LoadError(f"load worker {i} (pid {proc.pid}) failed: {payload}")
                    results[i] = payload
                    del pending[i]
        finally:
            if pending:
                self.stop()
        elapsed = max(r[2] for r in results.values()) - self.start_at  # the last response, not the transfer
        for proc in self._procs:
            proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        return LoadResult(elapsed, [x for i in sorted(results) for x in results[i][0]],
                          [x for i in sorted(results) for x in results[i][1]])


def run_load(path: str, total: int, clients: int, workers: int, *, timeout_s: float | None = None,
             **kwargs: Any) -> LoadResult:
    """:class:`Load` started and waited for."""
    return Load(path, total, clients, workers, **kwargs).start().wait(timeout_s)
