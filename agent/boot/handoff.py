"""Hand-off to the booted system: ``/run/chutes/{vm-name,hotkey,boot-token}`` and boot-status.json.

The three files keep the names and contents the sek8s scripts used (later units read them), but
are created 0600 (sek8s left them at the default umask). ``boot-status.json`` is non-secret: outcome,
stage timings, measurements from the agent's own quote, and the names (never values) of the
validator's response fields; the runtime service shows it under /v1/status.
"""

from __future__ import annotations

import json
import os
from typing import Any

from agent.log import Secret


def _write(path: str, data: bytes | bytearray, mode: int) -> None:
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


def write_handoff(handoff_dir: str, vm_name: str, hotkey: str, boot_token: Secret | None) -> list[str]:
    """Write the hand-off files (mode 0600); returns their paths."""
    os.makedirs(handoff_dir, mode=0o755, exist_ok=True)
    paths = []
    for name, data in (("vm-name", vm_name.encode()), ("hotkey", hotkey.encode())):
        p = os.path.join(handoff_dir, name)
        _write(p, data, 0o600)
        paths.append(p)
    if boot_token is not None:
        p = os.path.join(handoff_dir, "boot-token")
        _write(p, boot_token.reveal(), 0o600)
        paths.append(p)
    return paths


def write_status(path: str, status: dict[str, Any]) -> None:
    """``boot-status.json`` (0644: readable by the runtime service's user)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    _write(path, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode(), 0o644)
