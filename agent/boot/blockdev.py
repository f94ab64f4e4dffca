"""Finding block devices by label and mounting them read-only (util-linux ``blkid``/``mount``).

The device can also be named explicitly (config ``boot.config_device`` / ``boot.cache_device``):
a block device, or a regular image file, which is attached through a read-only loop device by
``mount -o loop`` (tests and the demo use that).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

from agent.errors import UnavailableError


class DeviceError(UnavailableError):
    """A device is missing or cannot be mounted."""


def find_by_label(label: str, wait_s: float = 0.0, poll_s: float = 0.2) -> str | None:
    """The device carrying filesystem/LUKS2 label ``label``, polling up to ``wait_s`` for udev."""
    deadline = time.monotonic() + wait_s
    while True:
        proc = subprocess.run(["blkid", "-L", label], capture_output=True, text=True, check=False)
        dev = proc.stdout.strip()
        if proc.returncode == 0 and dev:
            return dev.splitlines()[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def resolve(explicit: str, label: str, wait_s: float) -> str | None:
    """The explicit device/image if configured (None when it does not exist), else the labelled one."""
    if explicit:
        return explicit if os.path.exists(explicit) else None
    return find_by_label(label, wait_s)


def list_devices() -> list[str]:
    """Every device ``blkid`` knows (``blkid -o device``), for the LUKS-label fallback scan."""
    proc = subprocess.run(["blkid", "-o", "device"], capture_output=True, text=True, check=False)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


#: First-use volumes are zeroed this far (sek8s: ``dd bs=1M count=10``) so no old header survives.
ZERO_HEAD_BYTES = 10 * 1024 * 1024


def wipe_signatures(device: str) -> str:
    """``wipefs -a``: erase filesystem/RAID/partition signatures. Returns '' or wipefs' error text
    (not fatal: the head is zeroed and luksFormat writes a new header anyway)."""
    proc = subprocess.run(["wipefs", "-a", device], capture_output=True, text=True, check=False)
    return "" if proc.returncode == 0 else (proc.stderr.strip() or f"wipefs exit {proc.returncode}")


def zero_head(device: str, length: int = ZERO_HEAD_BYTES) -> int:
    """Overwrite the first ``length`` bytes (or the whole device, if smaller) with zeros, fsync; returns
    the byte count. Raises :class:`DeviceError`."""
    try:
        fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"cannot open {device} to zero it: {exc.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        todo = min(size, length)
        os.lseek(fd, 0, os.SEEK_SET)
        chunk = bytes(1024 * 1024)
        done = 0
        while done < todo:
            done += os.write(fd, memoryview(chunk)[: min(len(chunk), todo - done)])
        os.fsync(fd)
        return done
    except OSError as exc:
        raise DeviceError(f"zeroing the head of {device} failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def mount_rw(device: str, mountpoint: str, fstype: str) -> None:
    """Mount read-write with nosuid,nodev,noexec and a pinned filesystem type (kubeconfig purge)."""
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    proc = subprocess.run(["mount", "-t", fstype, "-o", "rw,nosuid,nodev,noexec", device, mountpoint],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeviceError(f"mount {device} at {mountpoint} failed: {proc.stderr.strip() or proc.returncode}")


def is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def mount_ro(device: str, mountpoint: str, fstype: str = "ext4") -> None:
    """Mount read-only with nosuid,nodev,noexec (a loop device for an image file).

    The filesystem type is pinned: the volume is host-supplied, so the kernel must not be invited to
    probe and parse whatever filesystem the host chose to present.
    """
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    opts = "ro,nosuid,nodev,noexec" + (",loop" if is_regular_file(device) else "")
    proc = subprocess.run(["mount", "-t", fstype, "-o", opts, device, mountpoint], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise DeviceError(f"mount {device} read-only at {mountpoint} failed: {proc.stderr.strip() or proc.returncode}")


def umount(mountpoint: str) -> None:
    proc = subprocess.run(["umount", mountpoint], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeviceError(f"umount {mountpoint} failed: {proc.stderr.strip() or proc.returncode}")
