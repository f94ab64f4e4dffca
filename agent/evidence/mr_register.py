"""One runtime measurement register (RTMR) behind the kernel's tsm-mr sysfs file.

Why one object: the boot's rootfs chain, its kubeconfig event, the RTMR event log and the runtime
event all read and extend the same register, and the ABI has sharp edges (exactly one 48-byte write
at offset 0 per extension; every read re-runs TDG.MR.REPORT on hardware). The kernel file
(``/sys/class/misc/tdx_guest/measurements/rtmr3:sha384``) and the FUSE emulator of it used by the
demo and the VM suite are two instances of this class, pointed at two paths; nothing else in the
agent opens the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from agent.errors import UnavailableError

DIGEST_LEN = 48
ZERO = bytes(DIGEST_LEN)


class RegisterError(UnavailableError):
    """The register could not be read or extended (missing interface, short read/write, I/O error)."""

    reason = "rtmr_register"


def extend_value(value: bytes, digest: bytes) -> bytes:
    """What the TDX module computes on an extension: SHA-384(old ‖ digest)."""
    return hashlib.sha384(value + digest).digest()


def chain(digests: Iterable[bytes], start: bytes = ZERO) -> bytes:
    """The register value after extending ``start`` with ``digests`` in order."""
    value = start
    for d in digests:
        value = extend_value(value, d)
    return value


class MeasurementRegister:
    """Read and extend one RTMR through its sysfs file (``path``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"MeasurementRegister({self.path!r})"

    def read(self) -> bytes:
        """The register's current 48-byte value (a fresh open: the kernel reports the live value)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RegisterError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            data = b""
            while chunk := os.read(fd, 4096):
                data += chunk
                if len(data) > DIGEST_LEN:
                    break
        except OSError as exc:
            raise RegisterError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) != DIGEST_LEN:
            raise RegisterError(f"{self.path}: expected {DIGEST_LEN} bytes, read {len(data)}")
        return data

    def extend(self, digests: Iterable[bytes]) -> int:
        """Extend with each digest in order, one ``pwrite`` of 48 bytes at offset 0 each, through one open.

        Returns how many were written. Stops at the first failure (the error names its position), so
        the caller knows the register holds a prefix of the chain.
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RegisterError(f"cannot open {self.path} for writing: {exc.strerror}") from None
        n = 0
        try:
            for d in digests:
                if len(d) != DIGEST_LEN:
                    raise RegisterError(f"extending {self.path}: digest {n + 1} is {len(d)} bytes, not {DIGEST_LEN}")
                try:
                    wrote = os.pwrite(fd, d, 0)
                except OSError as exc:
                    raise RegisterError(f"extending {self.path} failed at digest {n + 1}: {exc.strerror}") from None
                if wrote != DIGEST_LEN:
                    raise RegisterError(f"extending {self.path}: short write ({wrote} of {DIGEST_LEN} bytes)")
                n += 1
        finally:
            os.close(fd)
        return n
