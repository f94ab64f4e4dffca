"""FUSE emulator of the TDX measurement-register sysfs (``/sys/class/misc/tdx_guest/measurements``).

Reproduces the "tsm-mr" ABI (tdx-quote.md §2.5) so :class:`agent.evidence.rtmr.RtmrExtender` runs
unmodified through real ``open``/``write``/``read`` calls: ``rtmr0:sha384`` … ``rtmr3:sha384`` read back
the current 48-byte value; a write of exactly 48 bytes at offset 0 extends the register,
``new = SHA-384(old ‖ digest)``, synchronously (sysfs stores return their result); any other size or
offset is EINVAL. ``mrtd:sha384`` is read-only. Registers start at zero and live in shared memory, so a
test can read them independently of the code under test. ``fail_writes`` makes the next N writes EIO.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import multiprocessing
import stat
import threading
import time
from collections.abc import Iterator
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

from fuse import FuseOSError, Operations

from agent.sim.tsm_fuse import fuse_mounted

DIGEST_LEN = 48
RTMR_FILES = tuple(f"rtmr{i}:sha384" for i in range(4))
MRTD_FILE = "mrtd:sha384"


class MrState:
    """The four RTMRs and a write-fault counter, in shared memory (parent steers, child serves)."""

    def __init__(self, mr_td: bytes = bytes(DIGEST_LEN)) -> None:
        ctx = multiprocessing.get_context("fork")
        self._lock = ctx.Lock()
        # Raw* == ctx.Value/Array(lock=False) (the lock above guards them), typed as the ctypes objects they are
        self._regs = RawArray(ctypes.c_char, 4 * DIGEST_LEN)
        self._mrtd = bytes(mr_td)
        self._fail = RawValue(ctypes.c_int64, 0)
        self._extends = RawValue(ctypes.c_int64, 0)

    def reset_td(self, rtmrs: tuple[bytes, ...]) -> None:
        """A new TD: RTMRs as firmware and kernel leave them at launch (the only time a register is *set*)."""
        if len(rtmrs) > 4 or any(len(r) != DIGEST_LEN for r in rtmrs):
            raise ValueError("reset_td: up to four 48-byte register values")
        values = b"".join(rtmrs) + bytes(DIGEST_LEN * (4 - len(rtmrs)))
        with self._lock:
            self._regs[:] = values  # type: ignore[call-overload]  # typeshed: c_char arrays take bytes slices

    @property
    def mr_td(self) -> bytes:
        return self._mrtd

    def rtmr(self, index: int) -> bytes:
        with self._lock:
            return bytes(self._regs.raw[index * DIGEST_LEN : (index + 1) * DIGEST_LEN])

    def extend(self, index: int, digest: bytes) -> bytes:
        with self._lock:
            old = bytes(self._regs.raw[index * DIGEST_LEN : (index + 1) * DIGEST_LEN])
            new = hashlib.sha384(old + digest).digest()
            self._regs[index * DIGEST_LEN : (index + 1) * DIGEST_LEN] = new  # type: ignore[call-overload]  # typeshed: c_char arrays take bytes slices
            self._extends.value += 1
            return new

    @property
    def extends(self) -> int:
        return int(self._extends.value)

    def fail_writes(self, n: int) -> None:
        with self._lock:
            self._fail.value = n

    def take_failure(self) -> bool:
        with self._lock:
            if self._fail.value > 0:
                self._fail.value -= 1
                return True
            return False


class MeasurementsFs(Operations):
    """fusepy operations for the ``measurements/`` directory of the tdx_guest misc device."""

    #: fusepy: times are integer nanoseconds (st_*time here), not float seconds (deprecated).
    use_ns = True

    def __init__(self, state: MrState) -> None:
        self.state = state
        self._t = time.time_ns()
        self._lock = threading.Lock()

    def _name(self, path: str) -> str:
        name = path.strip("/")
        if name and name not in (*RTMR_FILES, MRTD_FILE):
            raise FuseOSError(errno.ENOENT)
        return name

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        name = self._name(path)
        if not name:
            mode = stat.S_IFDIR | 0o755
        else:
            mode = stat.S_IFREG | (0o444 if name == MRTD_FILE else 0o644)
        return {"st_mode": mode, "st_nlink": 2 if not name else 1, "st_size": DIGEST_LEN if name else 0,
                "st_mtime": self._t, "st_ctime": self._t, "st_atime": self._t}

    def readdir(self, path: str, fh: int) -> list[str]:
        if self._name(path):
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", MRTD_FILE, *RTMR_FILES]

    def open(self, path: str, flags: int) -> int:
        name = self._name(path)
        if not name:
            raise FuseOSError(errno.EISDIR)
        if name == MRTD_FILE and (flags & 3) != 0:
            raise FuseOSError(errno.EACCES)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        return 0  # sysfs ignores O_TRUNC

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        name = self._name(path)
        value = self.state.mr_td if name == MRTD_FILE else self.state.rtmr(RTMR_FILES.index(name))
        return value[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        name = self._name(path)
        if name not in RTMR_FILES:
            raise FuseOSError(errno.EACCES)
        if offset != 0 or len(data) != DIGEST_LEN:
            raise FuseOSError(errno.EINVAL)
        if self.state.take_failure():
            raise FuseOSError(errno.EIO)
        self.state.extend(RTMR_FILES.index(name), bytes(data))
        return len(data)


@contextlib.contextmanager
def mounted_measurements(state: MrState | None = None) -> Iterator[tuple[str, MrState]]:
    """Mount the emulator at a temp dir; yield ``(dir, state)``; RTMR3 file is ``dir/rtmr3:sha384``."""
    state = state or MrState()
    with fuse_mounted(lambda: MeasurementsFs(state), fsname="tdx-measurements-emulator") as mnt:
        yield mnt, state


class LiveRtmrQuoteSource:
    """Simulated quotes carrying the emulator's *current* registers, as TDG.MR.REPORT reads them.

    Pairs the measurement emulator with the simulated quote source, so a test can show that an
    extension (rootfs chain, runtime event) is what a later quote reports. Thread-safe.
    """

    name = "simulated"
    tee = "tdx"

    def __init__(self, state: MrState, state_dir: str) -> None:
        from agent.sim.quote_sim import SimulatedQuoteSource

        self.state = state
        self._inner = SimulatedQuoteSource(state_dir)
        self._lock = threading.Lock()

    @property
    def root_ca_pem(self) -> bytes:
        return self._inner.root_ca_pem

    def get_quote(self, report_data: bytes) -> bytes:
        with self._lock:
            self._inner.rtmrs = tuple(self.state.rtmr(i) for i in range(4))
            return self._inner.get_quote(report_data)
