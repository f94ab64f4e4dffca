"""Shared fixtures: where the real sample data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(__import__("os").environ.get("CHUTES_ATTEST_SHARED", REPO.parent / "shared"))
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
