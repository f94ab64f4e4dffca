"""Fail closed: one reason line on the console and /dev/kmsg, then power off.

The marker ``TDX-LUKS-UNLOCK-FAILED`` is what operators and the VM tests grep for (sek8s used the
same one). Power-off is refused outside an initramfs/initrd unless forced, so running ``boot`` by
mistake on a workstation prints the reason instead of switching the machine off.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from typing import TextIO

from agent.errors import AgentError
from agent.log import get_logger

log = get_logger(__name__)

MARKER = "TDX-LUKS-UNLOCK-FAILED"
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


class BootFailure(AgentError):
    """A boot stage failed for good. ``stage`` names it; ``detail`` (= ``str()``) is the operator-readable text.

    Its stable reason code is ``boot_<stage>`` (``boot-status.json``, logs); ``exit_code`` what ``boot`` exits with.
    """

    def __init__(self, stage: str, detail: str, exit_code: int = 1, marker: str = MARKER) -> None:
        super().__init__(detail, exit_code=exit_code, reason=f"boot_{stage}")
        self.stage = stage
        self.detail = detail
        #: The reference's marker for the failing step (§3.7), e.g. STORAGE-SETUP-FAILED after the unlock.
        self.marker = marker


def failure_line(reason: str, marker: str = MARKER) -> str:
    """The single line written on failure (newlines folded so the marker stays greppable)."""
    return f"{marker}: " + " ".join(reason.split())


def in_initramfs() -> bool:
    """True inside an initramfs-tools initramfs (/conf/initramfs.conf) or a systemd initrd (/etc/initrd-release)."""
    return os.path.exists("/conf/initramfs.conf") or os.path.exists("/etc/initrd-release")


def announce(reason: str, kmsg_path: str = "/dev/kmsg", console: TextIO | None = None,
             marker: str = MARKER) -> str:
    """Write the failure line to the console and, when writable, the kernel log; returns the line."""
    line = failure_line(reason, marker)
    out = console if console is not None else sys.stderr
    print(line, file=out, flush=True)
    try:
        fd = os.open(kmsg_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except OSError:
        return line
    try:
        # "<2>" = KERN_CRIT, so the line also reaches the console at the default loglevel.
        os.write(fd, f"<2>chutes-attest: {line}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)
    return line


def power_off(force_outside_initramfs: bool = False, console: TextIO | None = None) -> None:
    """``poweroff -f``, falling back to reboot(2) POWER_OFF. Returns only if both were impossible."""
    out = console if console is not None else sys.stderr
    if not (in_initramfs() or force_outside_initramfs):
        print("chutes-attest: NOT powering off: not running in an initramfs/initrd "
              "(use --force-poweroff to override)", file=out, flush=True)
        log.error("boot.poweroff_refused", reason="not in an initramfs")
        return
    os.sync()
    tool = shutil.which("poweroff")
    if tool:
        subprocess.run([tool, "-f"], check=False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_POWER_OFF))
    log.error("boot.poweroff_failed", errno=ctypes.get_errno())
