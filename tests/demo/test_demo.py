"""The README's main job, end to end: `chutes-attest demo` boots, serves, and every route answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--work-dir", str(tmp_path / "w"), *args],
                          capture_output=True, text=True, timeout=600)


def test_demo_boots_and_serves_every_route(tmp_path: Path) -> None:
    res = demo(tmp_path, "--once")
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "demo: boot outcome=unlocked" in out
    assert "READY" not in res.stderr  # readiness travels over NOTIFY_SOCKET, not stderr
    passes = [line for line in out.splitlines() if line.startswith("demo: PASS")]
    assert len(passes) == 10, out
    assert "demo: FAIL" not in out
    assert "curl -s --unix-socket" in out
    handoff = tmp_path / "w" / "run" / "chutes"
    for name in ("vm-name", "hotkey", "boot-token"):
        assert (handoff / name).stat().st_mode & 0o777 == 0o600


def test_demo_fails_closed_on_tampered_header(tmp_path: Path) -> None:
    res = demo(tmp_path, "--boot-only", "--fail", "cipher-null")
    assert res.returncode != 0
    assert "TDX-LUKS-UNLOCK-FAILED:" in res.stdout + res.stderr
    assert "cipher_null" in res.stdout + res.stderr
    assert not (tmp_path / "w" / "run" / "chutes" / "boot-token").exists()
