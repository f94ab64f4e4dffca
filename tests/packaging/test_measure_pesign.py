"""The Authenticode digest of a real Debian EFI-stub kernel equals pesign's (independent implementation).

pesign computes SHA-256 only; the ranges are the same for every hash, and production uses SHA-384.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.commands.measure import authenticode_digest

pytestmark = pytest.mark.integration


def test_kernel_authenticode_matches_pesign() -> None:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    assert kernels, "no /boot/vmlinuz-* (linux-image-amd64, scripts/install-deps.sh)"
    pesign = shutil.which("pesign")
    assert pesign, "pesign missing (scripts/install-deps.sh)"
    out = subprocess.run([pesign, "-h", "-d", "sha256", "-i", str(kernels[-1])],
                         capture_output=True, text=True, check=True).stdout
    expected = out.split("hash:", 1)[1].strip()
    assert authenticode_digest(kernels[-1].read_bytes(), "sha256").hex() == expected
