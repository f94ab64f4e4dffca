"""write_atomic: all or nothing, and a failed write leaves no copy of the secret behind."""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

from agent.fsutil import write_atomic


def test_writes_whole_file_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_atomic(target, b"secret-bytes", 0o600)
    assert target.read_bytes() == b"secret-bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_planted_symlink_at_a_guessable_temp_name_is_not_followed(tmp_path: Path) -> None:
    """The old temp name was f"{path}.tmp-{pid}": a planted symlink there made the write fail or leak."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    os.symlink(victim, tmp_path / f"key.tmp-{os.getpid()}")
    write_atomic(tmp_path / "key", b"secret", 0o600)
    assert victim.read_bytes() == b"untouched"
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_cut_write_leaves_no_scratch_copy(tmp_path: Path) -> None:
    """A write cut by RLIMIT_FSIZE (a full disk stands in the same way) leaves neither target nor scratch file."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, (4096, {resource.RLIM_INFINITY}))\n"
        "from agent.fsutil import write_atomic\n"
        "try:\n"
        f"    write_atomic({str(tmp_path / 'key')!r}, b'S' * 100000, 0o600)\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 3, p.stderr
    assert list(tmp_path.iterdir()) == []
