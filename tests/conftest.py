"""Shared fixtures: where the real sample data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent



def _find_shared() -> Path:
    """The shared data folder: $CHUTES_ATTEST_SHARED, else ../shared next to the checkout, else /work/shared."""
    env = os.environ.get("CHUTES_ATTEST_SHARED")
    candidates = [Path(env)] if env else [REPO.parent / "shared", Path("/work/shared")]
    for c in candidates:
        if (c / "testdata").is_dir():
            return c
    return candidates[0]


SHARED = _find_shared()
TESTDATA = SHARED / "testdata"
QUOTES_DIR = TESTDATA / "tdx-quotes"
GPU_DIR = TESTDATA / "gpu-evidence"


#: What the suite needs from the machine; scripts/test.sh (as root) installs all of it.
REQUIRED_COMMANDS = ("cryptsetup", "mkfs.ext4", "ip", "unshare", "nginx", "systemd-analyze", "swtpm", "swtpm_setup",
                     "qemu-system-x86_64", "mkinitramfs", "mmdebstrap")


def pytest_sessionstart(session: pytest.Session) -> None:
    """No test skips for a missing prerequisite (a skipped test proves nothing): stop with the reason."""
    import shutil

    problems = []
    if os.geteuid() != 0:
        problems.append("not root (loop mounts, FUSE, cryptsetup, network namespaces, qemu images)")
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    problems += [f"command {c!r} not found" for c in REQUIRED_COMMANDS if shutil.which(c, path=path) is None]
    if problems:
        pytest.exit("test prerequisites missing: " + "; ".join(problems) + " -- run ./scripts/test.sh as root",
                    returncode=4)


@pytest.fixture(scope="session")
def quotes_dir() -> Path:
    assert QUOTES_DIR.is_dir(), f"real TDX quote samples missing: {QUOTES_DIR}"
    return QUOTES_DIR


@pytest.fixture(scope="session")
def gpu_dir() -> Path:
    assert GPU_DIR.is_dir(), f"real GPU evidence samples missing: {GPU_DIR}"
    return GPU_DIR
