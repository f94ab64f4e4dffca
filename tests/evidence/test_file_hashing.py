"""file_hashing.hash_files, unit tier: same digests as hashlib, in job order, both ways (in-process and
helper processes), per-file errors by index with the same messages, and helpers that crash or hang fail
the call quickly instead of holding it.

``PROCESS_MIN_COST`` is set to 0 where a test needs the helper processes on a small input.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.evidence import file_hashing as fh
from agent.evidence.file_hashing import CHUNK, FileHashError, HashJob

#: Sizes around every boundary the code has: empty, the one-read path, the pool threshold, CHUNK.
EDGE_SIZES = (0, 1, 4095, 4096, fh.POOL_MIN_BYTES - 1, fh.POOL_MIN_BYTES, CHUNK - 1, CHUNK, CHUNK + 1,
              3 * CHUNK + 12345)


def make_files(root: Path, sizes: list[int], seed: int = 7) -> list[HashJob]:
    rng = random.Random(seed)
    jobs = []
    for i, size in enumerate(sizes):
        p = root / f"d{i % 7}" / f"f{i:05d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))
        jobs.append(HashJob(os.fsencode(p), size))
    return jobs


def expected(jobs: list[HashJob]) -> list[tuple[bytes, int]]:
    out = []
    for j in jobs:
        data = Path(os.fsdecode(j.full)).read_bytes()
        out.append((hashlib.sha384(data).digest(), len(data)))
    return out


@pytest.fixture
def processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Force the helper processes on any input; yields the Popen objects of every helper started."""
    monkeypatch.setattr(fh, "PROCESS_MIN_COST", 0)
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real(*args, **kwargs)
        started.append(proc)
        return proc

    monkeypatch.setattr(fh.subprocess, "Popen", recording)
    yield started
    for proc in started:  # every helper was reaped by hash_files itself, whatever happened
        assert proc.returncode is not None, f"helper {proc.pid} left running"


def wrapped_worker(monkeypatch: pytest.MonkeyPatch, prelude: str) -> None:
    """Helpers run ``prelude`` (which may wrap os.write) before the real worker code."""
    monkeypatch.setattr(fh, "helper_command", lambda: [sys.executable, "-I", "-S", "-c", prelude + fh.WORKER_CODE])


# os.write of anything but the greeting: the helper dies / hangs when it reports its first file.
KILL_AT_FIRST_REPORT = '''
import os, signal
_write = os.write
def _w(fd, data):
    if fd == 1 and bytes(data[:4]) != b"SHA3":
        os.kill(os.getpid(), signal.SIGKILL)
    return _write(fd, data)
os.write = _w
'''
HANG_AT_FIRST_REPORT = KILL_AT_FIRST_REPORT.replace("os.kill(os.getpid(), signal.SIGKILL)", "signal.pause()")


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_digests_equal_hashlib_in_job_order(tmp_path: Path, processes: list[Any], workers: int) -> None:
    rng = random.Random(workers)
    sizes = [rng.choice(EDGE_SIZES) if i % 40 == 0 else rng.randrange(0, 50_000) for i in range(1500)]
    jobs = make_files(tmp_path, sizes)
    assert fh.hash_files(jobs, workers) == expected(jobs)
    assert len(processes) == (0 if workers == 1 else workers)  # workers=1: no helper processes


def test_default_workers_and_small_input_stays_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = fh.helper_command
    monkeypatch.setattr(fh, "helper_command", lambda: calls.append(1) or real())
    jobs = make_files(tmp_path, [100] * 50 + [CHUNK + 3])
    assert fh.hash_files(jobs) == expected(jobs)
    assert calls == []  # below PROCESS_MIN_COST: a helper's start would cost more than it saves
    assert fh.default_workers() >= 2


def test_order_kept_with_mixed_sizes_and_wrong_hints(tmp_path: Path, processes: list[Any]) -> None:
    """Helpers take the largest files first; results still come back in job order, whatever the hints."""
    sizes = [*EDGE_SIZES, *reversed(EDGE_SIZES)] * 3 + [10] * 300
    jobs = make_files(tmp_path, sizes)
    want = expected(jobs)
    lying = [HashJob(j.full, (len(jobs) - i) * 1000) for i, j in enumerate(jobs)]  # size: a hint only
    assert fh.hash_files(lying, 2) == want
    assert fh.hash_files(jobs, 3) == want


def test_big_files_chunked(tmp_path: Path, processes: list[Any]) -> None:
    jobs = make_files(tmp_path, [5 * CHUNK + 1, 2 * CHUNK, CHUNK, CHUNK - 1, 7])
    for workers in (1, 2):
        got = fh.hash_files(jobs, workers)
        assert got == expected(jobs)
        assert [n for _, n in got] == [5 * CHUNK + 1, 2 * CHUNK, CHUNK, CHUNK - 1, 7]


def test_file_grown_after_planning(tmp_path: Path, processes: list[Any]) -> None:
    """The planned size is only a hint: a small file that grew past CHUNK is read to its end."""
    jobs = make_files(tmp_path, [100, 200])
    with open(jobs[0].full, "ab") as f:
        f.write(b"x" * (2 * CHUNK))
    for workers in (1, 2):
        assert fh.hash_files(jobs, workers) == expected(jobs)


def swap_for_symlink(job: HashJob) -> None:
    os.unlink(job.full)
    os.symlink(b"/etc/hostname", job.full)


def swap_for_fifo(job: HashJob) -> None:
    os.unlink(job.full)
    os.mkfifo(job.full)


def swap_for_directory(job: HashJob) -> None:
    os.unlink(job.full)
    os.mkdir(job.full)


def remove(job: HashJob) -> None:
    os.unlink(job.full)


@pytest.mark.parametrize(("swap", "detail"), [
    (swap_for_symlink, "cannot open: Too many levels of symbolic links"),  # O_NOFOLLOW
    (swap_for_fifo, "no longer a regular file"),  # O_NONBLOCK: the open itself does not wait for a writer
    (swap_for_directory, "no longer a regular file"),
    (remove, "cannot open: No such file or directory"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_error_by_index(tmp_path: Path, processes: list[Any], swap: Any, detail: str, workers: int) -> None:
    jobs = make_files(tmp_path, [1000] * 200 + [CHUNK + 1] * 3)
    swap(jobs[137])
    with pytest.raises(FileHashError) as err:
        fh.hash_files(jobs, workers)
    assert (err.value.index, err.value.detail) == (137, detail)


@pytest.mark.parametrize("workers", [1, 2])
def test_read_error_by_index(tmp_path: Path, processes: list[Any], workers: int) -> None:
    """/proc/self/mem is a regular file whose read at offset 0 fails (EIO), even as root."""
    jobs = make_files(tmp_path, [1000] * 50)
    jobs.insert(20, HashJob(b"/proc/self/mem", 0))
    with pytest.raises(FileHashError) as err:
        fh.hash_files(jobs, workers)
    assert (err.value.index, err.value.detail) == (20, "cannot read: Input/output error")


def test_nul_in_path(tmp_path: Path, processes: list[Any]) -> None:
    jobs = make_files(tmp_path, [10] * 5)
    jobs[3] = HashJob(jobs[3].full + b"\0x", 10)
    with pytest.raises(FileHashError) as err:
        fh.hash_files(jobs, 2)
    assert err.value.index == 3
    assert processes == []  # refused before any helper started


def test_helper_killed_mid_run_fails_fast(tmp_path: Path, processes: list[Any], monkeypatch: pytest.MonkeyPatch,
                                          ) -> None:
    wrapped_worker(monkeypatch, KILL_AT_FIRST_REPORT)
    jobs = make_files(tmp_path, [1000] * 300)
    with pytest.raises(FileHashError) as err:
        fh.hash_files(jobs, 2)
    assert 0 <= err.value.index < len(jobs)
    assert "was killed by signal 9 before reporting this file" in err.value.detail
    assert len(processes) == 2


def test_helper_hung_is_killed(tmp_path: Path, processes: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped_worker(monkeypatch, HANG_AT_FIRST_REPORT)
    monkeypatch.setattr(fh, "STALL_SECONDS", 1.0)
    jobs = make_files(tmp_path, [1000] * 300)
    with pytest.raises(FileHashError) as err:
        fh.hash_files(jobs, 2)
    assert 0 <= err.value.index < len(jobs)
    assert "reported nothing for" in err.value.detail and "(killed)" in err.value.detail


@pytest.mark.parametrize("command", [
    ["/nonexistent/python3"],  # cannot exec: Popen raises
    [sys.executable, "-I", "-S", "-c", "import sys; sys.exit(3)"],  # starts, exits before its greeting
    [sys.executable, "-I", "-S", "-c", "import os; os.write(1, b'nope'); os.read(0, 1)"],  # wrong greeting
])
def test_helper_that_cannot_start_falls_back_in_process(tmp_path: Path, processes: list[Any],
                                                        monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.setattr(fh, "helper_command", lambda: command)
    jobs = make_files(tmp_path, [1000] * 100 + [CHUNK * 2])
    assert fh.hash_files(jobs, 2) == expected(jobs)


def test_helper_that_starts_late_is_left_out(tmp_path: Path, processes: list[Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fh, "START_SECONDS", 0.5)
    monkeypatch.setattr(fh, "helper_command",
                        lambda: [sys.executable, "-I", "-S", "-c", "import time; time.sleep(60)"])
    jobs = make_files(tmp_path, [1000] * 100)
    assert fh.hash_files(jobs, 2) == expected(jobs)


def test_worker_code_is_self_contained() -> None:
    """The helper imports nothing but os and hashlib (it runs under -I -S from the trimmed initramfs runtime)."""
    tree = ast.parse(fh.WORKER_CODE)
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"os", "hashlib"}
    argv = fh.helper_command()
    assert argv[:4] == [sys.executable, "-I", "-S", "-c"]
    # isolated: a hostile PYTHONPATH / PYTHONSTARTUP in the environment changes nothing
    env = {**os.environ, "PYTHONPATH": "/nonexistent", "PYTHONSTARTUP": "/nonexistent"}
    out = subprocess.run(argv, input=b"", env=env, capture_output=True, check=True)
    assert out.stdout == b"SHA3" and out.stderr == b""
