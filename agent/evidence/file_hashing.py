"""SHA-384 of many files' contents, using every CPU: the hot loop of the rootfs measurement.

Kept apart from the measurement rules (``rootfs_measure``) so the rules stay readable and the speed
work stays in one place. Contract: :func:`hash_files` returns, for each :class:`HashJob` in order,
(SHA-384 of the content, bytes read); a job whose path is no longer a regular file, or cannot be
opened or read, raises :class:`FileHashError` naming it (``cannot open: …``, ``no longer a regular
file``, ``cannot read: …``).

Two ways, chosen per call:

* **In-process** (``workers=1``, or a small input: under :data:`PROCESS_MIN_COST`): files of 64 KiB
  and more on a thread pool (hashlib releases the GIL on large updates), smaller ones meanwhile on the
  calling thread. Per-file Python work holds the GIL, so this uses about one core on small files.
* **Helper processes** (otherwise): ``workers`` copies of the same interpreter, started as
  ``sys.executable -I -S -c WORKER_CODE`` (no site, no environment, no agent import: only ``os`` and
  ``hashlib``, so it runs unchanged from the initramfs' trimmed runtime). The calling thread only
  dispatches: it hands out batches of paths over each helper's stdin, largest files first (so the
  small ones even out the tail), keeps :data:`QUEUE_DEPTH` batches in flight per helper (pull-based:
  a helper that finishes gets the next batch, so they all finish together whatever the sizes), and
  reads 56-byte records back (48-byte digest + 8-byte signed count; a negative count is an error kind
  and its errno), which it puts back in job order. It leaves the GIL free for the boot's other threads.

Why processes, and why started this way: threads cannot hash small files in parallel (GIL), and
``os.fork``/``multiprocessing`` in a process whose other threads may hold OpenSSL or allocator locks
(the boot generates RSA keys meanwhile) can deadlock the child; ``subprocess`` execs at once
(vfork + exec, no Python code in between). Nothing needs ``/dev/shm`` or semaphores (plain pipes).

A helper refuses non-regular files and opens with ``O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC|O_NOCTTY``
exactly as :func:`hash_one`. A helper that cannot start (no interpreter, exec refused) is logged and
left out: the work goes to the others, or in-process when none started. One that dies mid-run, or
reports nothing for :data:`STALL_SECONDS` (plus its current file's size at :data:`MIN_RATE`), fails
the call with :class:`FileHashError` naming the file it held; every helper is killed and reaped on
the way out, so neither a crash nor a hang can hold the boot.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import stat
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from agent.log import get_logger

log = get_logger(__name__)

CHUNK = 1 << 20
#: Files at least this large are hashed on the pool; smaller ones by the calling thread (in-process way).
POOL_MIN_BYTES = 64 << 10
#: The fixed cost of one file (open, fstat, close, a hash object, a record), in bytes of SHA-384 it is
#: worth (~10 µs at ~700 MiB/s, measured on small files): how batches and the in-process threshold weigh
#: a file besides its size.
FILE_COST_BYTES = 8 << 10
#: Below this estimated cost (bytes + FILE_COST_BYTES per file) everything stays in-process: starting
#: helpers (~20 ms each, in parallel) would cost about what they save.
PROCESS_MIN_COST = 48 << 20
#: A batch closes when its cost reaches this or it holds BATCH_MAX_FILES paths (one large file alone).
BATCH_COST = 4 << 20
BATCH_MAX_FILES = 256
#: Batches in flight per helper (the one it hashes and the ones queued in its stdin).
QUEUE_DEPTH = 2
#: Most helper processes, whatever ``workers`` says (beyond ~16 the largest file, which one helper hashes
#: alone, bounds the time anyway; each helper costs ~12 MiB of memory).
MAX_PROCESSES = 32
#: A helper must announce itself within this many seconds of its start, else it is left out.
START_SECONDS = 30.0
#: A helper holding work that reports nothing for this long, plus its current file at MIN_RATE bytes/s,
#: is considered hung: killed, and the call fails.
STALL_SECONDS = 60.0
MIN_RATE = 4 << 20

_HELLO = b"SHA3"
_RECORD = struct.Struct("<q48s")
_ERRORS = {1: "cannot open", 2: "no longer a regular file", 3: "cannot read"}

#: The helper: only os and hashlib, so it runs under ``-I -S`` from any staged runtime. Reads batches
#: (4-byte little-endian length + NUL-separated paths) from stdin until EOF; writes _HELLO once, then
#: one 56-byte record per path, in order: bytes read (int64 LE) + digest, or -kind + errno (LE) on error.
#: It reports every 32 files and after every file of CHUNK bytes or more (the dispatcher's sign of life),
#: and looks ``os.write`` up at each call (a test wraps it to inject a crash or a hang).
WORKER_CODE = r'''
import hashlib
import os


def main():
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    chunk = 1 << 20
    buf = bytearray(chunk)
    view = memoryview(buf)
    sha384 = hashlib.sha384

    def recv(n):
        parts = []
        while n:
            got = os.read(0, n)
            if not got:
                return None
            parts.append(got)
            n -= len(got)
        return b"".join(parts)

    def send(data):
        data = memoryview(data)
        while data:
            data = data[os.write(1, data):]

    def failed(kind, err):
        return (-kind).to_bytes(8, "little", signed=True) + (err or 0).to_bytes(48, "little")

    def one(path):
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            return failed(1, exc.errno), 0
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o170000 != 0o100000:
                return failed(2, 0), 0
            h = sha384()
            n = 0
            if st.st_size < chunk:
                want = st.st_size + 1
                while True:
                    data = os.read(fd, want)
                    if not data:
                        break
                    h.update(data)
                    n += len(data)
                    if len(data) < want and n >= st.st_size:
                        break
                    want = chunk
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while True:
                    got = os.readv(fd, [buf])
                    if not got:
                        break
                    h.update(view[:got])
                    n += got
            return n.to_bytes(8, "little", signed=True) + h.digest(), n
        except OSError as exc:
            return failed(3, exc.errno), 0
        finally:
            os.close(fd)

    send(b"SHA3")
    while True:
        head = recv(4)
        if head is None:
            return
        body = recv(int.from_bytes(head, "little"))
        if body is None:
            return
        out = []
        for path in body.split(b"\0"):
            rec, n = one(path)
            out.append(rec)
            if n >= chunk or len(out) >= 32:
                send(b"".join(out))
                out = []
        if out:
            send(b"".join(out))


main()
'''


@dataclass(frozen=True)
class HashJob:
    """One file to hash: where to open it and its size when planned (a scheduling hint only)."""

    full: bytes
    size: int


class FileHashError(Exception):
    """A file could not be hashed; ``index`` is its position in the job list."""

    def __init__(self, index: int, detail: str) -> None:
        self.index = index
        self.detail = detail
        super().__init__(detail)


def hash_one(job: HashJob, buf: bytearray | None = None) -> tuple[bytes, int]:
    """(SHA-384 of the content, bytes read); refuses anything that is no longer a regular file."""
    try:
        fd = os.open(job.full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise FileHashError(-1, f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileHashError(-1, "no longer a regular file")
        h = hashlib.sha384()
        n = 0
        if st.st_size < CHUNK:  # one read of size+1 normally returns everything and shows EOF
            want = st.st_size + 1
            while chunk := os.read(fd, want):
                h.update(chunk)
                n += len(chunk)
                if len(chunk) < want and n >= st.st_size:
                    break
                want = CHUNK
            return h.digest(), n
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = buf if buf is not None else bytearray(CHUNK)
        view = memoryview(buf)
        while got := os.readv(fd, [buf]):
            h.update(view[:got])  # releases the GIL: other files hash meanwhile
            n += got
        return h.digest(), n
    except OSError as exc:
        raise FileHashError(-1, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """One per usable CPU, at least 2 (I/O overlaps), at most 64."""
    return max(2, min(64, cpu_count()))


def helper_command() -> list[str]:
    """The argv of one helper process (a test may replace this function)."""
    return [sys.executable, "-I", "-S", "-c", WORKER_CODE]


def hash_files(jobs: Sequence[HashJob], workers: int | None = None) -> list[tuple[bytes, int]]:
    """(digest, bytes read) for every job, in the order of ``jobs`` (see the module doc for how)."""
    n = min(workers or default_workers(), MAX_PROCESSES)
    if n > 1 and sys.executable and _cost(jobs) >= PROCESS_MIN_COST:
        done = _hash_in_helpers(jobs, n)
        if done is not None:
            return done
    return _hash_in_process(jobs, workers)


def _cost(jobs: Sequence[HashJob]) -> int:
    return sum(j.size for j in jobs) + FILE_COST_BYTES * len(jobs)


# -- in-process -----------------------------------------------------------------------------------


def _indexed(i: int, job: HashJob) -> tuple[bytes, int]:
    try:
        return hash_one(job, bytearray(CHUNK))
    except FileHashError as exc:
        raise FileHashError(i, exc.detail) from None


def _hash_in_process(jobs: Sequence[HashJob], workers: int | None) -> list[tuple[bytes, int]]:
    results: list[tuple[bytes, int] | None] = [None] * len(jobs)
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="rootfs-hash")
    try:
        pooled = [(i, pool.submit(_indexed, i, j)) for i, j in enumerate(jobs) if j.size >= POOL_MIN_BYTES]
        buf = bytearray(CHUNK)
        for i, j in enumerate(jobs):
            if j.size < POOL_MIN_BYTES:
                try:
                    results[i] = hash_one(j, buf)
                except FileHashError as exc:
                    raise FileHashError(i, exc.detail) from None
        for i, fut in pooled:
            results[i] = fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


# -- helper processes -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Helper:
    proc: subprocess.Popen[bytes]
    rfd: int
    wfd: int
    efd: int
    started: bool = False
    closed: bool = False  # its stdin was closed: no more work, EOF from it is expected
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    pending: deque[int] = field(default_factory=deque)  # job indices sent, not yet reported, in order
    batches: deque[int] = field(default_factory=deque)  # unreported paths per batch in flight
    last: float = 0.0  # when it last reported


def _batches(jobs: Sequence[HashJob]) -> Iterator[list[int]]:
    """Job indices in batches, largest files first (the small ones, last, even out the helpers' tails)."""
    batch: list[int] = []
    cost = 0
    for i in sorted(range(len(jobs)), key=lambda i: jobs[i].size, reverse=True):
        if b"\0" in jobs[i].full:
            raise FileHashError(i, "cannot open: the path holds a NUL byte")
        batch.append(i)
        cost += jobs[i].size + FILE_COST_BYTES
        if cost >= BATCH_COST or len(batch) >= BATCH_MAX_FILES:
            yield batch
            batch, cost = [], 0
    if batch:
        yield batch


def _spawn(count: int) -> list[_Helper]:
    helpers: list[_Helper] = []
    for _ in range(count):
        try:
            proc = subprocess.Popen(helper_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, bufsize=0, close_fds=True)
        except (OSError, ValueError) as exc:
            log.warning("rootfs.hash_helper_unavailable", error=str(exc), started=len(helpers))
            break
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        os.set_blocking(proc.stdin.fileno(), False)
        helpers.append(_Helper(proc, proc.stdout.fileno(), proc.stdin.fileno(), proc.stderr.fileno(),
                               last=time.monotonic()))
    return helpers


def _describe_exit(h: _Helper) -> str:
    try:
        code = h.proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return "closed its output"
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    tail = bytes(h.err).decode("utf-8", "replace").strip().splitlines()
    return how + (f" ({tail[-1].strip()[:200]})" if tail else "")


def _close_helpers(helpers: list[_Helper], sel: selectors.BaseSelector, kill: bool) -> None:
    """Close every pipe, kill the helpers when ``kill`` (or when they do not exit soon), reap them all."""
    for h in helpers:
        for stream in (h.proc.stdin, h.proc.stdout, h.proc.stderr):
            if stream is not None:
                try:
                    sel.unregister(stream.fileno())
                except (KeyError, ValueError):
                    pass
                stream.close()
        if kill and h.proc.poll() is None:
            h.proc.kill()
    deadline = time.monotonic() + 5.0
    for h in helpers:
        try:
            h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait()
    sel.close()


def _hash_in_helpers(jobs: Sequence[HashJob], count: int) -> list[tuple[bytes, int]] | None:
    """Hash ``jobs`` in ``count`` helper processes; None when no helper could start (caller goes in-process)."""
    work = list(_batches(jobs))
    helpers = _spawn(min(count, len(work)))
    sel = selectors.DefaultSelector()
    failed = True
    try:
        if not helpers:
            return None
        helpers = _await_start(helpers, sel)
        if not helpers:
            return None
        results = _dispatch(jobs, iter(work), helpers, sel)
        failed = False
        return results
    finally:
        _close_helpers(helpers, sel, kill=failed)


def _await_start(helpers: list[_Helper], sel: selectors.BaseSelector) -> list[_Helper]:
    """The helpers that announced themselves in time; the others are killed, reaped and logged."""
    for h in helpers:
        sel.register(h.rfd, selectors.EVENT_READ, h)
        sel.register(h.efd, selectors.EVENT_READ, h)
    deadline = time.monotonic() + START_SECONDS
    waiting = set(helpers)
    lost: list[tuple[_Helper, str]] = []
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            lost += [(h, f"did not start within {START_SECONDS:.0f} s") for h in waiting]
            break
        for key, _ in sel.select(left):
            h = key.data
            if key.fd == h.efd:
                _keep_err(h, _read(key.fd), sel)
                continue
            if h not in waiting:
                continue
            data = _read(key.fd)
            h.rbuf += data
            if not data:
                lost.append((h, _describe_exit(h)))
                waiting.discard(h)
            elif not _HELLO.startswith(bytes(h.rbuf[:len(_HELLO)])):
                lost.append((h, "sent something else than its greeting"))
                waiting.discard(h)
            elif len(h.rbuf) >= len(_HELLO):
                del h.rbuf[:len(_HELLO)]
                h.started = True
                h.last = time.monotonic()
                waiting.discard(h)
    if lost:
        for h, _ in lost:
            for fd in (h.rfd, h.efd):
                if sel.get_map().get(fd) is not None:
                    sel.unregister(fd)
        _close_helpers([h for h, _ in lost], selectors.DefaultSelector(), kill=True)
        log.warning("rootfs.hash_helper_failed_to_start", helpers=len(lost), started=len(helpers) - len(lost),
                    reason=lost[0][1])
    return [h for h in helpers if h.started]


def _keep_err(h: _Helper, data: bytes, sel: selectors.BaseSelector) -> None:
    """The tail of a helper's stderr (its traceback, if it crashed), for the error message."""
    h.err += data
    del h.err[:-4096]
    if not data:
        sel.unregister(h.efd)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return b""


def _send(h: _Helper, sel: selectors.BaseSelector) -> None:
    """Write what ``h`` still has to receive; waits for writability through the selector, never blocks."""
    try:
        while h.wbuf:
            del h.wbuf[:os.write(h.wfd, h.wbuf)]
    except BlockingIOError:
        pass
    except OSError:  # the helper is gone: its output's EOF reports it
        h.wbuf.clear()
    want = selectors.EVENT_WRITE if h.wbuf else 0
    registered = sel.get_map().get(h.wfd) is not None
    if want and not registered:
        sel.register(h.wfd, selectors.EVENT_WRITE, h)
    elif not want and registered:
        sel.unregister(h.wfd)


def _dispatch(jobs: Sequence[HashJob], work: Iterator[list[int]], helpers: list[_Helper],
              sel: selectors.BaseSelector) -> list[tuple[bytes, int]]:
    results: list[tuple[bytes, int] | None] = [None] * len(jobs)
    left = len(jobs)
    exhausted = False

    def feed(h: _Helper) -> None:
        nonlocal exhausted
        if h.closed:
            return
        while not exhausted and len(h.batches) < QUEUE_DEPTH:
            batch = next(work, None)
            if batch is None:
                exhausted = True
                break
            payload = b"\0".join(jobs[i].full for i in batch)
            h.wbuf += len(payload).to_bytes(4, "little") + payload
            h.pending.extend(batch)
            h.batches.append(len(batch))
        _send(h, sel)
        if exhausted and not h.batches and not h.wbuf:
            h.closed = True  # nothing more for it: its stdin's EOF lets it exit now
            if sel.get_map().get(h.wfd) is not None:
                sel.unregister(h.wfd)
            assert h.proc.stdin is not None
            h.proc.stdin.close()

    for h in helpers:
        h.last = time.monotonic()
        feed(h)
    live = set(helpers)
    while left:
        now = time.monotonic()
        deadline = None
        for h in live:
            if h.pending:
                due = h.last + STALL_SECONDS + jobs[h.pending[0]].size / MIN_RATE
                if due <= now:
                    h.proc.kill()
                    raise FileHashError(h.pending[0], f"hashing helper {h.proc.pid} reported nothing for "
                                                      f"{now - h.last:.0f} s (killed)")
                deadline = due if deadline is None else min(deadline, due)
        if deadline is None:  # files are left, yet no helper holds any: every helper is gone
            raise FileHashError(next(_unfinished(results)), "no hashing helper left")
        for key, mask in sel.select(deadline - now):
            h = key.data
            if mask & selectors.EVENT_WRITE:
                _send(h, sel)
                continue
            data = _read(key.fd)
            if key.fd == h.efd:
                _keep_err(h, data, sel)
                continue
            if not data:
                sel.unregister(h.rfd)
                live.discard(h)
                if h.pending:
                    raise FileHashError(h.pending[0], f"hashing helper {h.proc.pid} {_describe_exit(h)} "
                                                      "before reporting this file")
                continue
            h.rbuf += data
            usable = len(h.rbuf) - len(h.rbuf) % _RECORD.size
            if not usable:
                continue
            h.last = time.monotonic()
            records = bytes(h.rbuf[:usable])
            del h.rbuf[:usable]
            for count, digest in _RECORD.iter_unpack(records):
                if not h.pending:
                    raise FileHashError(next(_unfinished(results)),
                                        f"hashing helper {h.proc.pid} reported more files than it was sent")
                i = h.pending.popleft()
                if count < 0:
                    raise FileHashError(i, _error_detail(-count, int.from_bytes(digest, "little")))
                results[i] = (digest, count)
                left -= 1
                h.batches[0] -= 1
                if not h.batches[0]:
                    h.batches.popleft()
            feed(h)
    return [r for r in results if r is not None]


def _unfinished(results: list[tuple[bytes, int] | None]) -> Iterator[int]:
    return (i for i, r in enumerate(results) if r is None)


def _error_detail(kind: int, err: int) -> str:
    what = _ERRORS.get(kind, f"hashing helper error {kind}")
    return what if kind == 2 else f"{what}: {os.strerror(err)}"
