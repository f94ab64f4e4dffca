"""Run a fusepy filesystem in a child process and mount it, for the kernel-interface emulators.

Why a child process: the code under test must reach the emulator through real system calls, exactly
as it reaches the kernel, and a separate process keeps a hung or crashed emulator from taking the test
process with it (fusepy also wants the main thread for its signal handling). Shared state with the
parent (fault switches, counters) lives in ``multiprocessing`` shared memory created before the fork.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

#: FUSE options every emulator needs: reads and writes reach the handlers (no page cache, so sizes do
#: not matter and every read regenerates like the kernel), and no attribute/lookup caching, so mkdir,
#: rmdir and generation changes are seen at once.
BASE_OPTIONS: dict[str, Any] = {
    "direct_io": True,
    "attr_timeout": 0,
    "entry_timeout": 0,
    "negative_timeout": 0,
}


def serve(ops: Any, mountpoint: str, fsname: str) -> None:
    """Mount ``ops`` at ``mountpoint`` and serve until unmounted (blocks; call from a main thread)."""
    from fuse import FUSE

    FUSE(ops, mountpoint, foreground=True, nothreads=False, fsname=fsname, **BASE_OPTIONS)


def _child(make_ops: Callable[[], Any], mountpoint: str, fsname: str) -> None:
    serve(make_ops(), mountpoint, fsname)


def unmount(mountpoint: str) -> None:
    """Unmount a FUSE mount (fusermount first, then umount -l as a last resort)."""
    for cmd in (["fusermount", "-u", mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(cmd, capture_output=True, check=False, timeout=10).returncode == 0:
                return
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue


@contextlib.contextmanager
def fuse_mounted(
    make_ops: Callable[[], Any], *, fsname: str, mountpoint: str | None = None, timeout_s: float = 10.0
) -> Iterator[str]:
    """Mount ``make_ops()`` (built in the child) at a temp dir (or ``mountpoint``); always unmount."""
    created = mountpoint is None
    mnt = mountpoint or tempfile.mkdtemp(prefix=f"{fsname}-")
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(make_ops, mnt, fsname), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not os.path.ismount(mnt):
            if not proc.is_alive():
                raise RuntimeError(f"FUSE emulator {fsname} exited before mounting (code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"FUSE emulator {fsname} did not mount {mnt} within {timeout_s} s")
            time.sleep(0.01)
        yield mnt
    finally:
        if os.path.ismount(mnt):
            unmount(mnt)
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
