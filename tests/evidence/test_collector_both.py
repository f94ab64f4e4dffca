"""Quote and GPU evidence run at once, and a failure of one never leaves the other running unowned
(a CLI that exited while an NVML call was still in flight aborted the interpreter: exit -6, 1 run in 20)."""

from __future__ import annotations

import asyncio

import pytest

from agent.evidence.base import EvidenceError
from agent.evidence.collector import both


async def test_a_quote_failure_waits_for_the_gpus_before_it_is_raised() -> None:
    gpu_done = asyncio.Event()

    async def quote() -> bytes:
        raise EvidenceError("configfs-tsm report directory not found")

    async def gpu() -> list[dict[str, str]]:
        for _ in range(5):  # still working when the quote has already failed
            await asyncio.sleep(0)
        gpu_done.set()
        return [{"arch": "HOPPER"}]

    with pytest.raises(EvidenceError, match="report directory not found"):
        await both(quote(), gpu())
    assert gpu_done.is_set()


async def test_both_failing_reports_the_quote_error_and_success_returns_both() -> None:
    async def bad_quote() -> bytes:
        raise EvidenceError("quote")

    async def bad_gpu() -> list[dict[str, str]]:
        raise EvidenceError("gpu")

    with pytest.raises(EvidenceError, match=r"^quote$"):
        await both(bad_quote(), bad_gpu())

    async def good_quote() -> bytes:
        return b"q"

    async def good_gpu() -> list[dict[str, str]]:
        return [{"arch": "BLACKWELL"}]

    with pytest.raises(EvidenceError, match=r"^gpu$"):
        await both(good_quote(), bad_gpu())
    assert await both(good_quote(), good_gpu()) == (b"q", [{"arch": "BLACKWELL"}])
