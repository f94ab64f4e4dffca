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

from agent.fsutil import ensure_dir, write_atomic
from agent.log import Secret


def write_handoff(handoff_dir: str, vm_name: str, hotkey: str, boot_token: Secret | None = None,
                  extra: dict[str, bytes | bytearray] | None = None) -> list[str]:
    """Write the hand-off files (mode 0600; reference §7); returns their paths.

    ``vm-name`` and ``hotkey`` are text + newline; ``boot-token`` (≤1.2) and the ``extra`` files
    (``luks-quote-nonce``, ``cert-hash``: ≥1.3) carry no newline.
    """
    ensure_handoff_dir(handoff_dir)
    paths = []
    files: list[tuple[str, bytes | bytearray]] = [("vm-name", vm_name.encode() + b"\n"),
                                                  ("hotkey", hotkey.encode() + b"\n")]
    if boot_token is not None:
        files.append(("boot-token", boot_token.reveal()))
    files += list((extra or {}).items())
    for name, data in files:
        p = os.path.join(handoff_dir, name)
        write_atomic(p, data, 0o600)
        paths.append(p)
    return paths


def ensure_handoff_dir(handoff_dir: str) -> None:
    """``handoff_dir`` (``/run/chutes``) a real directory, mode exactly 0700 (reference §7, §12.6: nothing
    reaches its files by traversal; each service gets its own subtree read-only through its unit)."""
    os.makedirs(os.path.dirname(os.path.abspath(handoff_dir)), mode=0o755, exist_ok=True)
    ensure_dir(handoff_dir, 0o700)


def remove_handoff_file(handoff_dir: str, name: str) -> bool:
    """Delete one hand-off file (``cert-hash`` after the last quote that needs it); True if it existed."""
    try:
        os.unlink(os.path.join(handoff_dir, name))
    except FileNotFoundError:
        return False
    return True


def write_status(path: str, status: dict[str, Any]) -> None:
    """``boot-status.json`` (0644: the runtime service's unit binds it read-only into its namespace). A
    directory it has to create is private (0700), like ``/run/chutes`` itself."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    write_atomic(path, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode(), 0o644)
