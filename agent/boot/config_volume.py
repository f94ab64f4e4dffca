"""The host-supplied config volume (label ``tdx-config``): VM name, miner hotkey, netplan.

Mounted read-only, read with size limits, unmounted before anything else happens; the names are
validated here (:mod:`agent.boot.names`) so later stages only see clean values.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.boot import blockdev
from agent.boot.names import InvalidNameError, sanitize_vm_name, validate_hotkey
from agent.errors import BadInputError
from agent.exitcodes import EXIT_UNAVAILABLE
from agent.validator.proof import Hotkey, ProofError, check_cross

MAX_FILE = 64 * 1024
FILES = ("hostname", "miner-ss58", "network-config.yaml", "miner-seed", "miner-private-key")


class ConfigVolumeError(BadInputError):
    """The config volume is missing, unreadable, or holds invalid values (message names the file)."""

    reason = "config_volume"

    def __init__(self, message: str, *, missing: bool = False) -> None:
        # A missing volume is an unavailable device (exit 5); a bad value is malformed input (exit 4).
        super().__init__(message, exit_code=EXIT_UNAVAILABLE if missing else None)
        self.missing = missing


@dataclass(frozen=True)
class BootIdentity:
    vm_name: str
    miner_hotkey: str
    #: Raw netplan text, or None when the file is absent (initramfs-managed network).
    network_yaml: str | None
    device: str
    #: The sr25519 miner key from ``miner-seed`` / ``miner-private-key`` (≥1.4.0), else None. Wipe it
    #: after the last signed call.
    signer: Hotkey | None = None


def _read(path: Path, name: str, required: bool) -> str | None:
    raw = _read_raw(path, name, required)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigVolumeError(f"config volume: file {name!r} is not UTF-8") from None


def _read_raw(path: Path, name: str, required: bool) -> bytearray | None:
    """The file's bytes in a wipeable buffer (key files), bounded, regular files only, never blocking."""
    try:
        # O_NONBLOCK: a FIFO planted on the host-supplied volume must not hang the boot in open().
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        if required:
            raise ConfigVolumeError(f"config volume: file {name!r} missing") from None
        return None
    except OSError as exc:
        raise ConfigVolumeError(f"config volume: cannot open {name!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigVolumeError(f"config volume: {name!r} is not a regular file")
        buf = bytearray(MAX_FILE + 1)
        n = os.readv(fd, [buf])
    finally:
        os.close(fd)
    if n > MAX_FILE:
        buf[:] = bytes(len(buf))
        raise ConfigVolumeError(f"config volume: file {name!r} larger than {MAX_FILE} bytes")
    out = bytearray(buf[:n])
    buf[:] = bytes(len(buf))
    return out


def _signer(root: Path) -> Hotkey | None:
    """``miner-seed`` (64 hex) or ``miner-private-key`` (128 hex): at most one of them (reference §2)."""
    seed = _read_raw(root / "miner-seed", "miner-seed", False)
    priv = _read_raw(root / "miner-private-key", "miner-private-key", False)
    try:
        if seed is not None and priv is not None:
            raise ConfigVolumeError("config volume: both 'miner-seed' and 'miner-private-key' present; "
                                    "exactly one may be")
        if seed is not None:
            return Hotkey.from_seed_hex(seed)
        if priv is not None:
            return Hotkey.from_private_key_hex(priv)
        return None
    except ProofError as exc:
        raise ConfigVolumeError(f"config volume: {exc}") from None
    finally:
        for b in (seed, priv):
            if b is not None:
                b[:] = bytes(len(b))


def read_identity_from_dir(root: Path, device: str = "") -> BootIdentity:
    """Read and validate the three files from a mounted config volume."""
    hostname = _read(root / "hostname", "hostname", True) or ""
    net = _read(root / "network-config.yaml", "network-config.yaml", False)
    signer = _signer(root)
    # >= 1.4.0 the key-derived hotkey wins and miner-ss58 is only a cross-check; before, it is the hotkey.
    ss58_text = _read(root / "miner-ss58", "miner-ss58", signer is None)
    try:
        vm_name = sanitize_vm_name(hostname)
        if signer is None:
            return BootIdentity(vm_name, validate_hotkey(ss58_text or ""), net, device)
        check_cross(signer, ss58_text)
        return BootIdentity(vm_name, signer.ss58, net, device, signer)
    except InvalidNameError as exc:
        if signer is not None:
            signer.wipe()
        raise ConfigVolumeError(f"config volume: {exc}") from None
    except ProofError as exc:
        if signer is not None:
            signer.wipe()
        raise ConfigVolumeError(f"config volume: {exc}") from None


def read_config_volume(device: str, label: str, mountpoint: str, wait_s: float) -> BootIdentity:
    """Find (explicit ``device`` or by ``label``), mount read-only, read, unmount."""
    dev = blockdev.resolve(device, label, wait_s)
    if dev is None:
        what = f"device {device}" if device else f"a volume labelled {label!r}"
        raise ConfigVolumeError(f"config volume: {what} not found", missing=True)
    try:
        blockdev.mount_ro(dev, mountpoint)
    except blockdev.DeviceError as exc:
        raise ConfigVolumeError(f"config volume: {exc}") from None
    try:
        return read_identity_from_dir(Path(mountpoint), dev)
    finally:
        try:
            blockdev.umount(mountpoint)
        except blockdev.DeviceError as exc:
            raise ConfigVolumeError(f"config volume: {exc}") from None
        finally:
            try:
                os.rmdir(mountpoint)
            except OSError:
                pass
