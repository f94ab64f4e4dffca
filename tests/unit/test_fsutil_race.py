"""fsutil.ensure_dir against a symlink swapped in between its check and its chmod (issue 20 item 6)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import fsutil


class _SwapOnce:
    """Replace ``target`` (a directory) by a symlink to ``victim``, the first time it is called."""

    def __init__(self, target: Path, victim: Path) -> None:
        self.target, self.victim, self.swapped = target, victim, False

    def __call__(self) -> None:
        if not self.swapped:
            self.swapped = True
            os.rmdir(self.target)
            os.symlink(self.victim, self.target)


def test_symlink_swapped_in_after_the_check_is_never_followed(tmp_path: Path, monkeypatch: Any) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    os.chmod(victim, 0o700)
    target = tmp_path / "handoff"
    target.mkdir()
    swap = _SwapOnce(target, victim)
    real_lstat, real_mkdir = os.lstat, os.mkdir

    def lstat(path: Any, *a: Any, **kw: Any) -> os.stat_result:  # the old check-then-chmod window
        st = real_lstat(path, *a, **kw)
        if os.fspath(path) == str(target) and sys._getframe(1).f_globals["__name__"] == "agent.fsutil":
            swap()
        return st

    def mkdir(path: Any, *a: Any, **kw: Any) -> None:  # the same window for a mkdir-first check
        try:
            real_mkdir(path, *a, **kw)
        finally:
            if os.fspath(path) == str(target):
                swap()

    monkeypatch.setattr(fsutil.os, "lstat", lstat)
    monkeypatch.setattr(fsutil.os, "mkdir", mkdir)
    with pytest.raises(NotADirectoryError, match="not a directory"):
        fsutil.ensure_dir(target, 0o777)
    assert swap.swapped
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o700  # the symlink's target was not re-moded


def test_ensure_dir_sets_mode_and_refuses_a_symlink(tmp_path: Path) -> None:
    d = tmp_path / "d"
    fsutil.ensure_dir(d, 0o750)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o750
    fsutil.ensure_dir(d, 0o700)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    os.symlink(d, tmp_path / "link")
    with pytest.raises(NotADirectoryError):
        fsutil.ensure_dir(tmp_path / "link", 0o777)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        fsutil.ensure_dir(tmp_path / "f", 0o700)
