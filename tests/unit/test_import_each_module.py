"""Every module under ``agent/`` imports on its own, in a fresh interpreter (issue 20 item 6).

A module that only works because another one was imported first (a submodule reached as an attribute of
its package, a name bound by someone else's import, a cycle that resolves in one order only) passes every
test that happens to import in the right order; here each module is the first and only thing imported, in
its own ``python`` process, with warnings as errors.

A module that needs a system library the integration tier provides (libfuse for the FUSE emulators) may
fail to import on a machine without it, with exactly that library's error and nothing else.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "agent"

#: System library -> the last traceback line its Python binding raises when the library is missing.
SYSTEM_LIBRARIES = {"fuse": "OSError: Unable to find libfuse"}


def agent_modules() -> list[str]:
    """Dotted names of every ``.py`` module and package under ``agent/``."""
    out = []
    for path in sorted(AGENT.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def import_alone(module: str, root: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``import module`` as the first and only import of a fresh interpreter, warnings as errors."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([sys.executable, "-W", "error", "-c", "import importlib, sys; "
                           "importlib.import_module(sys.argv[1])", module],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def missing_library_error(stderr: str) -> str | None:
    """The system library whose absence (on this machine) explains this failed import, if any."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    for lib, error in SYSTEM_LIBRARIES.items():
        if last == error and ctypes.util.find_library(lib) is None:
            return lib
    return None


def test_every_module_is_found() -> None:
    mods = agent_modules()
    assert {"agent", "agent.cli", "agent.errors", "agent.serve.server", "agent.boot.flow"} <= set(mods)
    assert len(mods) == len(set(mods))


@pytest.mark.parametrize("module", agent_modules())
def test_module_imports_alone(module: str) -> None:
    p = import_alone(module)
    if p.returncode != 0 and missing_library_error(p.stderr):
        return  # the integration tier's library is absent here; any other failure still fails
    assert p.returncode == 0, f"`import {module}` alone, in a fresh interpreter, failed:\n{p.stderr}"
    assert p.stdout == "", f"importing {module} printed: {p.stdout!r}"


def test_a_module_that_depends_on_import_order_is_caught(tmp_path: Path) -> None:
    """The check itself: a package whose module uses a sibling it never imports fails alone."""
    pkg = tmp_path / "orderpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("VALUE = 1\n")
    (pkg / "user.py").write_text("import orderpkg\nX = orderpkg.helper.VALUE\n")  # works only after helper
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path)}
    after = subprocess.run([sys.executable, "-c", "import orderpkg.helper, orderpkg.user"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    alone = import_alone("orderpkg.user", tmp_path)
    assert after.returncode == 0, after.stderr  # in the "right" order it works, so only the check finds it
    assert alone.returncode != 0 and "has no attribute 'helper'" in alone.stderr
    assert missing_library_error(alone.stderr) is None
