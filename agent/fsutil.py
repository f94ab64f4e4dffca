"""Crash-safe file writes: a reader sees the old file or the whole new one, never half a key."""

from __future__ import annotations

import os


def write_atomic(path: str | os.PathLike[str], data: bytes | bytearray, mode: int) -> None:
    """Write ``data`` to a temp file with ``mode`` (set before any byte lands), fsync, rename over ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
