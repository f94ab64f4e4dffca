"""Crash-safe file writes: a reader sees the old file or the whole new one, never half a key."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat


def ensure_dir(path: str | os.PathLike[str], mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """A real directory (never a symlink) at ``path`` with exactly ``mode`` and, if given, owner; parents must exist.

    Owner and mode are set through an ``O_NOFOLLOW | O_DIRECTORY`` descriptor, never by name: a symlink
    swapped in after the check can neither be followed nor have its target re-moded.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotADirectoryError(f"{os.fspath(path)}: exists and is not a directory") from None
        raise
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):  # O_DIRECTORY guarantees it; belt and braces
            raise NotADirectoryError(f"{os.fspath(path)}: exists and is not a directory")
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes | bytearray, mode: int) -> None:
    """Write ``data`` to a fresh temp file with ``mode`` (set before any byte lands), fsync, rename over ``path``.

    The temp name is unpredictable and created with ``O_EXCL | O_NOFOLLOW``, so a planted file or symlink in
    the directory can neither receive the bytes nor redirect them. On any failure the temp file is
    overwritten with zeros and removed: a cut write never leaves part of a key behind under another name.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    done = False
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            _shred(fd, tmp, len(data))


def _shred(fd: int, tmp: str, size: int) -> None:
    """Best effort: zero what may have landed in the temp file, then unlink it."""
    with contextlib.suppress(OSError):
        if fd < 0:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
