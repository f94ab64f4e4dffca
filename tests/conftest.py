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


@pytest.fixture(scope="session")
def quotes_dir() -> Path:
    assert QUOTES_DIR.is_dir(), f"real TDX quote samples missing: {QUOTES_DIR}"
    return QUOTES_DIR


@pytest.fixture(scope="session")
def gpu_dir() -> Path:
    assert GPU_DIR.is_dir(), f"real GPU evidence samples missing: {GPU_DIR}"
    return GPU_DIR
