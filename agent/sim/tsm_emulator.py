"""FUSE emulator of the Linux configfs-tsm report interface (``/sys/kernel/config/tsm/report``).

It reproduces the kernel behaviour the production collector depends on (tdx-quote.md §2.1–2.2), so
:class:`agent.evidence.configfs_tsm.ConfigfsTsmSource` runs against it unmodified, through real
``mkdir``/``open``/``write``/``close``/``read``/``rmdir`` system calls on a real mount:

- ``mkdir NAME`` creates an entry with ``inblob`` (write-only, ≤ 64 B), ``outblob`` (read-only),
  ``generation`` and ``provider`` (``tdx_guest``); ``rmdir`` removes it (with its attribute files).
- Writes to ``inblob`` are buffered per open file and applied when the file is closed; the store bumps
  ``generation`` and any error from it is dropped, as configfs does. (FUSE sends RELEASE
  asynchronously after close(2) returns, so the buffer is applied at FLUSH, the synchronous part of
  close(2); the caller observes exactly the kernel's ordering.)
- ``outblob`` is computed on the first read of a fresh file descriptor: EINVAL unless the inblob is
  64 bytes; regenerated only when ``generation`` moved since the last quote (else the cached blob);
  generation is serialised across entries like the kernel's ``quote_lock``. Quotes come from
  :class:`agent.sim.quote_sim.SimulatedQuoteSource`.

With ``provider="sev_guest"`` (AMD SEV-SNP, sev-snp.md §2.1–2.2) entries also have ``auxblob`` (0444:
the certificate table of the same request, empty unless the emulator was started with ``aux=True``,
like upstream KVM), ``privlevel_floor`` (0444, "0" unless set) and ``privlevel`` (0644 text: its store
runs at write(2) and its errors come back from it; floor..3, else EINVAL; a store bumps ``generation``);
reading ``outblob`` or ``auxblob`` generates the report (:class:`agent.sim.snp_sim.SimulatedSnpSource`,
1184 bytes at VMPL = ``privlevel``) for an inblob of exactly 64 bytes, else EINVAL.

Injectable faults (:class:`TsmFaults`, shared with the parent through shared memory): EBUSY on outblob
reads (N times), empty outblob (QGS failure), a concurrent writer bumping generation after our write or
between our write and read, a dropped inblob store, a wrong report_data in the quote, a slow quote, a
different provider; SEV-SNP also ETIMEDOUT (host throttled, N times), a wiped VMPCK (``wipe_vmpck``: this
and every later outblob/auxblob read fails ENOTTY, as after the driver's ``snp_disable_vmpck``) and a
report cut by one byte (``truncate``); plus counters of quotes generated and entries created.

Run standalone for the demo: ``python -m agent.sim.tsm_emulator MOUNTPOINT --state-dir DIR`` (TDX) or
``python -m agent.sim.tsm_emulator MOUNTPOINT --state-dir DIR --provider sev_guest [--aux] [--product P]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import multiprocessing
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

from fuse import FuseOSError, Operations

from agent.evidence.base import QuoteSource
from agent.log import get_logger
from agent.sim.tsm_fuse import fuse_mounted, serve

log = get_logger(__name__)

ATTRS = ("inblob", "outblob", "generation", "provider")
#: sev_guest entries: the TDX set plus the SEV-SNP attributes (sev-snp.md §2.1; no SVSM ``service_*``).
SNP_ATTRS = (*ATTRS, "auxblob", "privlevel", "privlevel_floor")
PROVIDERS = ("tdx_guest", "sev_guest")
INBLOB_MAX = 64
PRIVLEVEL_MAX = 3
_MODES = {"inblob": 0o200, "outblob": 0o444, "generation": 0o444, "provider": 0o444, "auxblob": 0o444,
          "privlevel": 0o644, "privlevel_floor": 0o444}
_COUNTERS = (
    "ebusy", "empty", "concurrent_write_at_close", "concurrent_write_on_read", "drop_write", "wrong_report_data",
    "etimedout", "wipe_vmpck", "truncate",
)


class TsmFaults:
    """Fault switches and counters, in shared memory so a parent can steer an emulator child process.

    Count-type faults fire on the next N occasions and then switch themselves off, so a test can check
    both the error and the successful retry.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._lock = ctx.Lock()
        # Raw* == ctx.Value/Array(lock=False) (the lock above guards them), typed as the ctypes objects they are
        self._counts = {name: RawValue(ctypes.c_int64, 0) for name in _COUNTERS}
        self._delay = RawValue(ctypes.c_double, 0.0)
        self._provider = RawArray(ctypes.c_char, 64)  # empty: the emulator's own provider
        self._vmpck_wiped = RawValue(ctypes.c_bool, False)
        self._quotes = RawValue(ctypes.c_int64, 0)
        self._entries_created = RawValue(ctypes.c_int64, 0)

    # -- steering (parent) ----------------------------------------------------------------------------

    def set(self, **counts: int) -> None:
        """Arm count-type faults, e.g. ``set(ebusy=2)``; names: see ``_COUNTERS``."""
        with self._lock:
            for name, value in counts.items():
                if name not in self._counts:
                    raise KeyError(f"unknown fault {name!r} (known: {', '.join(_COUNTERS)})")
                self._counts[name].value = int(value)

    def remaining(self, name: str) -> int:
        with self._lock:
            return int(self._counts[name].value)

    @property
    def delay_s(self) -> float:
        return float(self._delay.value)

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._delay.value = float(value)

    @property
    def provider(self) -> str:
        """The provider every entry shows instead of the emulator's own ("" = its own)."""
        return self._provider.value.decode()

    @provider.setter
    def provider(self, value: str) -> None:
        self._provider.value = value.encode()[:63]

    @property
    def vmpck_wiped(self) -> bool:
        """SEV-SNP: the (emulated) driver disabled the VMPCK; every report request fails ENOTTY from now on."""
        return bool(self._vmpck_wiped.value)

    def wipe_vmpck(self) -> None:
        self._vmpck_wiped.value = True

    @property
    def quotes_generated(self) -> int:
        return int(self._quotes.value)

    @property
    def entries_created(self) -> int:
        return int(self._entries_created.value)

    # -- used by the emulator (child) ---------------------------------------------------------------

    def take(self, name: str) -> bool:
        """Consume one occurrence of a count-type fault; True if it fires now."""
        with self._lock:
            v = self._counts[name]
            if v.value > 0:
                v.value -= 1
                return True
            return False

    def count_quote(self) -> None:
        with self._lock:
            self._quotes.value += 1

    def count_entry(self) -> None:
        with self._lock:
            self._entries_created.value += 1


@dataclass
class _Entry:
    inblob: bytes = b""
    write_gen: int = 0
    read_gen: int = -1  # forces generation on the first outblob read
    outblob: bytes = b""
    auxblob: bytes = b""
    privlevel: int = 0
    ctime: int = field(default_factory=time.time_ns)  # ns (use_ns)


@dataclass
class _Open:
    entry: _Entry
    attr: str
    wbuf: bytearray = field(default_factory=bytearray)
    dirty: bool = False
    rbuf: bytes | None = None


class TsmReportFs(Operations):
    """fusepy operations emulating ``/sys/kernel/config/tsm/report`` for a TDX guest (``provider="tdx_guest"``)
    or an SEV-SNP guest (``provider="sev_guest"``: reports from :class:`agent.sim.snp_sim.SimulatedSnpSource`
    of ``product``; ``aux``: ``auxblob`` holds its certificate table, else it is empty)."""

    #: fusepy: times are integer nanoseconds (st_*time here, utimens' arguments), not float seconds.
    use_ns = True

    def __init__(self, state_dir: str, faults: TsmFaults | None = None, source: QuoteSource | None = None, *,
                 provider: str = "tdx_guest", aux: bool = False, product: str = "Genoa",
                 privlevel_floor: int = 0) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider: must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        if not 0 <= privlevel_floor <= PRIVLEVEL_MAX:
            raise ValueError(f"privlevel_floor: must be 0..{PRIVLEVEL_MAX}, got {privlevel_floor}")
        self.provider = provider
        self.snp = provider == "sev_guest"
        self.attrs = SNP_ATTRS if self.snp else ATTRS
        self.privlevel_floor = privlevel_floor
        self.faults = faults or TsmFaults()
        if source is None:
            if self.snp:
                from agent.sim.snp_sim import SimulatedSnpSource

                source = SimulatedSnpSource(state_dir, product)
            else:
                from agent.sim.quote_sim import SimulatedQuoteSource

                source = SimulatedQuoteSource(state_dir)
        self.source: QuoteSource = source
        self.aux = b""
        if self.snp and aux:
            table = getattr(source, "cert_table", None)
            if not isinstance(table, bytes):
                raise ValueError("aux=True needs a source with a cert_table (agent.sim.snp_sim.SimulatedSnpSource)")
            self.aux = table
        self.entries: dict[str, _Entry] = {}
        self.files: dict[int, _Open] = {}
        self._lock = threading.Lock()  # entries, files, generation counters
        self._quote_lock = threading.Lock()  # one GetQuote at a time per VM, like the driver's quote_lock
        self._next_fh = 1
        self._mtime = time.time_ns()

    # -- path helpers -----------------------------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str]:
        parts = [p for p in path.split("/") if p]
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in self.attrs):
            raise FuseOSError(errno.ENOENT)
        return (parts[0] if parts else "", parts[1] if len(parts) == 2 else "")

    def _entry(self, name: str) -> _Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise FuseOSError(errno.ENOENT)
        return entry

    # -- metadata ---------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        name, attr = self._split(path)
        with self._lock:
            if not name:
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2 + len(self.entries),
                        "st_mtime": self._mtime, "st_ctime": self._mtime, "st_atime": self._mtime}
            entry = self._entry(name)
        if not attr:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_mtime": entry.ctime,
                    "st_ctime": entry.ctime, "st_atime": entry.ctime}
        return {"st_mode": stat.S_IFREG | _MODES[attr], "st_nlink": 1, "st_size": 4096,
                "st_mtime": entry.ctime, "st_ctime": entry.ctime, "st_atime": entry.ctime}

    def readdir(self, path: str, fh: int) -> list[str]:
        name, attr = self._split(path)
        if attr:
            raise FuseOSError(errno.ENOTDIR)
        with self._lock:
            if not name:
                return [".", "..", *sorted(self.entries)]
            self._entry(name)
        return [".", "..", *self.attrs]

    def mkdir(self, path: str, mode: int) -> int:
        name, attr = self._split(path)
        if not name or attr:
            raise FuseOSError(errno.EPERM)
        with self._lock:
            if name in self.entries:
                raise FuseOSError(errno.EEXIST)
            self.entries[name] = _Entry(privlevel=self.privlevel_floor)
            self._mtime = time.time_ns()
        self.faults.count_entry()
        return 0

    def rmdir(self, path: str) -> int:
        name, attr = self._split(path)
        if not name or attr:
            raise FuseOSError(errno.EPERM if not name else errno.ENOTDIR)
        with self._lock:
            self._entry(name)
            del self.entries[name]  # open files keep their entry alive, like configfs item refs
            self._mtime = time.time_ns()
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise FuseOSError(errno.EACCES)

    def unlink(self, path: str) -> int:
        raise FuseOSError(errno.EPERM)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        _name, attr = self._split(path)
        if attr not in ("inblob", "privlevel"):
            raise FuseOSError(errno.EACCES)
        return 0  # O_TRUNC on inblob/privlevel is harmless: the write buffer starts empty per open

    def chmod(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EPERM)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise FuseOSError(errno.EPERM)

    def utimens(self, path: str, times: Any = None) -> int:
        return 0

    # -- files ------------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        name, attr = self._split(path)
        if not attr:
            raise FuseOSError(errno.EISDIR)
        acc = flags & os.O_ACCMODE
        if attr == "privlevel":
            pass  # 0644 text attribute: read and write
        elif (attr == "inblob" and acc != os.O_WRONLY) or (attr != "inblob" and acc != os.O_RDONLY):
            raise FuseOSError(errno.EACCES)
        with self._lock:
            entry = self._entry(name)
            fh = self._next_fh
            self._next_fh += 1
            self.files[fh] = _Open(entry, attr)
        return fh

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            f = self.files.get(fh)
            if f is not None and f.attr == "privlevel":
                return self._store_privlevel(f.entry, data)
            if f is None or f.attr != "inblob":
                raise FuseOSError(errno.EBADF)
            if offset + len(data) > INBLOB_MAX:
                raise FuseOSError(errno.EFBIG)
            if len(f.wbuf) < offset:
                f.wbuf.extend(bytes(offset - len(f.wbuf)))
            f.wbuf[offset : offset + len(data)] = data
            f.dirty = True
        return len(data)

    def _store_privlevel(self, entry: _Entry, data: bytes) -> int:
        """A configfs text store (caller holds the lock): runs at write(2), its error is the write's."""
        try:
            value = int(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise FuseOSError(errno.EINVAL) from None
        if value > PRIVLEVEL_MAX or value < self.privlevel_floor:
            raise FuseOSError(errno.EINVAL)
        entry.privlevel = value
        entry.write_gen += 1
        return len(data)

    def flush(self, path: str, fh: int) -> int:
        """close(2): apply a pending inblob write; like configfs, the store's result is not reported."""
        with self._lock:
            f = self.files.get(fh)
            if f is None or f.attr != "inblob" or not f.dirty:
                return 0
            f.dirty = False
            if self.faults.take("drop_write"):
                return 0  # e.g. the generation wrap guard's EBUSY, swallowed by configfs
            f.entry.inblob = bytes(f.wbuf)
            f.entry.write_gen += 1
            if self.faults.take("concurrent_write_at_close"):
                f.entry.inblob = secrets.token_bytes(INBLOB_MAX)
                f.entry.write_gen += 1
        return 0

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self.files.pop(fh, None)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            f = self.files.get(fh)
            if f is None:
                raise FuseOSError(errno.EBADF)
            entry, attr = f.entry, f.attr
            if attr == "generation":
                return f"{entry.write_gen}\n".encode()[offset : offset + size]
            if attr == "provider":
                return f"{self.faults.provider or self.provider}\n".encode()[offset : offset + size]
            if attr == "privlevel":
                return f"{entry.privlevel}\n".encode()[offset : offset + size]
            if attr == "privlevel_floor":
                return f"{self.privlevel_floor}\n".encode()[offset : offset + size]
            if attr not in ("outblob", "auxblob"):
                raise FuseOSError(errno.EBADF)
            buf = f.rbuf
        if buf is None:  # first read on this fd: ask the provider (may block, may fail)
            out = self._generate(entry)
            buf = entry.auxblob if attr == "auxblob" else out
            with self._lock:
                f.rbuf = buf
        return buf[offset : offset + size]

    def _generate(self, entry: _Entry) -> bytes:
        with self._quote_lock:
            if self.snp and self.faults.vmpck_wiped:
                raise FuseOSError(errno.ENOTTY)  # the driver refuses every request once the VMPCK is gone
            if self.faults.take("concurrent_write_on_read"):
                with self._lock:
                    entry.inblob = secrets.token_bytes(INBLOB_MAX)
                    entry.write_gen += 1
            with self._lock:
                inblob, gen, vmpl = entry.inblob, entry.write_gen, entry.privlevel
                if entry.read_gen == gen:
                    return entry.outblob
            if len(inblob) != INBLOB_MAX:
                raise FuseOSError(errno.EINVAL)
            if self.faults.take("ebusy"):
                raise FuseOSError(errno.EBUSY)
            if self.snp and self.faults.take("etimedout"):
                raise FuseOSError(errno.ETIMEDOUT)  # host throttled the request for more than 60 s
            if self.snp and self.faults.take("wipe_vmpck"):
                self.faults.wipe_vmpck()
                raise FuseOSError(errno.ENOTTY)
            delay = self.faults.delay_s
            if delay > 0:
                time.sleep(delay)
            if self.faults.take("empty"):
                blob = b""
            else:
                rd = inblob
                if self.faults.take("wrong_report_data"):
                    rd = bytes([inblob[0] ^ 0x01]) + inblob[1:]
                report = getattr(self.source, "report", None) if self.snp else None
                blob = report(rd, vmpl=vmpl) if report is not None else self.source.get_quote(rd)
                if self.faults.take("truncate"):
                    blob = blob[:-1]
            self.faults.count_quote()
            with self._lock:
                entry.outblob, entry.read_gen = blob, gen
                entry.auxblob = self.aux if self.snp else b""
            return blob


@contextlib.contextmanager
def mounted_tsm(
    state_dir: str, *, mountpoint: str | None = None, faults: TsmFaults | None = None,
    provider: str = "tdx_guest", aux: bool = False, product: str = "Genoa", privlevel_floor: int = 0,
) -> Iterator[tuple[str, TsmFaults]]:
    """Mount the emulator (in a child process) and yield ``(mountpoint, faults)``; always unmounts.

    Use the mountpoint as ``ConfigfsTsmSource(root=...)`` (``tee="snp"`` with ``provider="sev_guest"``).
    The simulated PKI (TDX) or AMD hierarchy of ``product`` (SEV-SNP) is created here first so the parent
    can read the roots from the same ``state_dir``.
    """
    if provider == "sev_guest":
        from agent.sim.snp_sim import load_or_create_sim_amd

        load_or_create_sim_amd(state_dir, product)
    else:
        from agent.sim.quote_sim import load_or_create_sim_pki

        load_or_create_sim_pki(state_dir)
    faults = faults or TsmFaults()

    def make() -> TsmReportFs:
        return TsmReportFs(state_dir, faults, provider=provider, aux=aux, product=product,
                           privlevel_floor=privlevel_floor)

    with fuse_mounted(make, fsname="configfs-tsm-emulator", mountpoint=mountpoint) as mnt:
        yield mnt, faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.sim.tsm_emulator",
        description="Mount a configfs-tsm emulator (simulated TDX quotes or SEV-SNP reports; never trusted) and "
                    "serve until unmounted.",
    )
    parser.add_argument("mountpoint", help="directory to mount on (use it as quote.configfs_root)")
    parser.add_argument("--state-dir", required=True, help="simulated PKI / AMD hierarchy state directory")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each quote takes (default 0)")
    parser.add_argument("--provider", choices=PROVIDERS, default="tdx_guest",
                        help="tdx_guest (Intel TDX quotes, default) or sev_guest (AMD SEV-SNP reports)")
    parser.add_argument("--aux", action="store_true",
                        help="sev_guest: auxblob carries the simulated certificate table (VCEK, ASK, ARK); "
                             "default empty, like upstream KVM")
    parser.add_argument("--product", choices=("Milan", "Genoa", "Turin"), default="Genoa",
                        help="sev_guest: the simulated chip's product line (default Genoa)")
    args = parser.parse_args(argv)
    if args.provider != "sev_guest" and (args.aux or args.product != "Genoa"):
        parser.error("--aux and --product need --provider sev_guest")
    os.makedirs(args.mountpoint, exist_ok=True)
    faults = TsmFaults()
    faults.delay_s = args.delay
    what = "simulated SEV-SNP reports" if args.provider == "sev_guest" else "simulated quotes"
    log.warning("sim.tsm_emulator", mountpoint=args.mountpoint, provider=args.provider,
                reason=f"emulated configfs-tsm, {what}")
    serve(TsmReportFs(args.state_dir, faults, provider=args.provider, aux=args.aux, product=args.product),
          args.mountpoint, "configfs-tsm-emulator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
