"""Shared fixtures and the three test tiers.

Tiers (README, "Tests"):
- ``unit``: pure tests; run as any user on any Linux with only the venv (``pytest -m unit``).
- ``integration``: needs root and real system parts (loop devices, FUSE, cryptsetup, nginx, network
  namespaces, swtpm); a module opts in with ``pytestmark = pytest.mark.integration``.
- ``vm``: boots a real kernel + initramfs under qemu; ``pytestmark = pytest.mark.vm``.
A test without a tier marker is a unit test. Tests never skip: selecting a tier whose prerequisites are
missing stops the run at once and names what is missing.

The unit tier cannot flake (pyproject.toml, [tool.pytest.ini_options]): warnings are errors, markers are
strict (the three tiers below are the only ones), an xfail that passes fails. A test waits for a state
by polling it under a deadline (tests/waiting.py) or drives an injected clock; it never sleeps and then
checks, and never asserts on wall-clock durations.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: The real sample data, copied into the repository with its provenance (tests/data/*/README.md).
TESTDATA = REPO / "tests" / "data"
QUOTES_DIR = TESTDATA / "tdx-quotes"
GPU_DIR = TESTDATA / "gpu-evidence"

TIERS = ("unit", "integration", "vm")

#: Commands each tier needs from the machine; scripts/test.sh (as root) installs all of them.
INTEGRATION_COMMANDS = ("cryptsetup", "mkfs.ext4", "ip", "unshare", "nginx", "systemd-analyze", "swtpm",
                        "swtpm_setup", "losetup", "blkid", "mount", "chattr", "openssl", "debugfs",
                        "dpkg-buildpackage", "lintian", "pesign")
VM_COMMANDS = ("qemu-system-x86_64", "mkinitramfs", "mmdebstrap", "cryptsetup", "mkfs.ext4")


def pytest_configure(config: pytest.Config) -> None:
    # The test suite is a composition root too: it may run the simulations the CLI can enable.
    from agent.commands.wiring import install_simulations

    install_simulations()
    config.addinivalue_line("markers", "unit: pure test, any user, only the venv")
    config.addinivalue_line("markers", "integration: needs root + real system parts (loop, FUSE, cryptsetup, "
                                       "nginx, netns, swtpm)")
    config.addinivalue_line("markers", "vm: boots a real kernel + initramfs under qemu (slow)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test gets exactly one tier marker (before ``-m`` deselects), unmarked tests are unit."""
    for item in items:
        if item.get_closest_marker("vm") is None and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


def missing_prerequisites(tiers: set[str]) -> list[str]:
    """What this machine lacks for the given tiers (empty: all present)."""
    problems: list[str] = []
    needs_root = tiers & {"integration", "vm"}
    if needs_root and os.geteuid() != 0:
        problems.append("not root (loop devices, FUSE, cryptsetup, network namespaces, qemu images)")
    if "integration" in tiers and not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse")
    commands: list[str] = []
    if "integration" in tiers:
        commands += INTEGRATION_COMMANDS
    if "vm" in tiers:
        commands += [c for c in VM_COMMANDS if c not in commands]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    problems += [f"command {c!r} not found" for c in commands if shutil.which(c, path=path) is None]
    return problems


def pytest_collection_finish(session: pytest.Session) -> None:
    """No test skips for a missing prerequisite (a skipped test proves nothing): stop with the reason."""
    selected = {t for item in session.items for t in TIERS if item.get_closest_marker(t) is not None}
    problems = missing_prerequisites(selected)
    if problems:
        pytest.exit(f"test prerequisites missing for tier(s) {', '.join(sorted(selected & {'integration', 'vm'}))}: "
                    + "; ".join(problems) + " -- run ./scripts/test.sh as root, or select `-m unit`",
                    returncode=4)


@pytest.fixture(autouse=True)
def _restore_logging_config() -> Iterator[None]:
    """A test that calls ``agent.log.configure`` must not change the log level of the tests after it."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def quotes_dir() -> Path:
    assert QUOTES_DIR.is_dir(), f"real TDX quote samples missing: {QUOTES_DIR}"
    return QUOTES_DIR


@pytest.fixture(scope="session")
def gpu_dir() -> Path:
    assert GPU_DIR.is_dir(), f"real GPU evidence samples missing: {GPU_DIR}"
    return GPU_DIR
