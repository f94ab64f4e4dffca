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

from agent.fsutil import write_atomic
from agent.log import Secret


def write_handoff(handoff_dir: str, vm_name: str, hotkey: str, boot_token: Secret | None) -> list[str]:
    """Write the hand-off files (mode 0600); returns their paths."""
    os.makedirs(handoff_dir, mode=0o755, exist_ok=True)
    paths = []
    for name, data in (("vm-name", vm_name.encode()), ("hotkey", hotkey.encode())):
        p = os.path.join(handoff_dir, name)
        write_atomic(p, data, 0o600)
        paths.append(p)
    if boot_token is not None:
        p = os.path.join(handoff_dir, "boot-token")
        write_atomic(p, boot_token.reveal(), 0o600)
        paths.append(p)
    return paths


def write_status(path: str, status: dict[str, Any]) -> None:
    """``boot-status.json`` (0644: readable by the runtime service's user)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    write_atomic(path, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode(), 0o644)
