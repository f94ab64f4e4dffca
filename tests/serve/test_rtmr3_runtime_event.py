"""≤1.2 images, ``rtmr.runtime_event``: RTMR3 carries the fixed runtime event before any quote is answered.

The service runs in-process against the FUSE measurement-register emulator; its quotes come from a
simulated source that reports the emulator's current registers (as TDG.MR.REPORT does), so the RTMR3
in a quote fetched over the compat socket is the register's real value at that moment.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.evidence import sources
from agent.evidence.rtmr3_runtime import RUNTIME_RTMR3, RuntimeEventError
from agent.quote import parse_quote
from tests.serve.helpers import unix_client

if TYPE_CHECKING:  # the FUSE emulator needs fusepy + libfuse: imported where a test runs, not at collection
    from agent.sim.tsm_mr_emulator import MrState

pytestmark = pytest.mark.integration


@pytest.fixture
def registers(monkeypatch: pytest.MonkeyPatch, sim_dir: Path) -> Iterator[tuple[str, MrState]]:
    from agent.sim.tsm_mr_emulator import LiveRtmrQuoteSource, mounted_measurements

    with mounted_measurements() as (mnt, state):
        monkeypatch.setattr(sources, "make_quote_source", lambda cfg: LiveRtmrQuoteSource(state, str(sim_dir)))
        yield os.path.join(mnt, "rtmr3:sha384"), state


def rtmr_cfg(sysfs: str, tmp: Path, enabled: bool) -> dict[str, Any]:
    return {"rtmr__runtime_event": enabled, "rtmr__sysfs_path": sysfs,
            "rtmr__event_log": str(tmp / "rtmr" / "rtmr3-events.jsonl")}


async def attest_rtmr3(socket_path: str) -> bytes:
    async with unix_client(socket_path) as c:
        r = await c.get("/attest", params={"nonce": secrets.token_hex(32)})
        assert r.status == 200
        body = await r.json()
    return bytes(parse_quote(base64.b64decode(body["tdx_quote"])).rtmr3)


def test_runtime_rtmr3_is_the_documented_constant() -> None:
    digest = hashlib.sha384(b"chutes-attest:runtime:v1").digest()
    assert RUNTIME_RTMR3 == hashlib.sha384(bytes(48) + digest).digest()
    assert RUNTIME_RTMR3.hex().startswith("1b31ace1f0e9bf7d")  # the value the README tells operators


async def test_quotes_after_start_carry_the_runtime_event(
    service_factory: Callable[..., Any], registers: tuple[str, MrState], short_tmp: Path
) -> None:
    sysfs, state = registers
    svc = await service_factory(**rtmr_cfg(sysfs, short_tmp, True))
    assert state.rtmr(3) == RUNTIME_RTMR3 and state.extends == 1
    assert bytes.fromhex(svc.ctx.measurements["rtmr3"]) == RUNTIME_RTMR3  # even the self-check quote
    quoted = await attest_rtmr3(svc.cfg.serve.compat_socket)
    assert quoted == RUNTIME_RTMR3 != bytes(48)  # a boot measurement (RTMR3 = 0) cannot match it


async def test_off_by_default_leaves_rtmr3_zero(
    service_factory: Callable[..., Any], registers: tuple[str, MrState], short_tmp: Path
) -> None:
    sysfs, state = registers
    svc = await service_factory(**rtmr_cfg(sysfs, short_tmp, False))
    assert await attest_rtmr3(svc.cfg.serve.compat_socket) == bytes(48)
    assert state.extends == 0


async def test_restart_does_not_extend_again(
    service_factory: Callable[..., Any], registers: tuple[str, MrState], short_tmp: Path
) -> None:
    sysfs, state = registers
    first = await service_factory(**rtmr_cfg(sysfs, short_tmp, True))
    await first.stop()
    second = await service_factory(**rtmr_cfg(sysfs, short_tmp, True))
    assert state.extends == 1
    assert await attest_rtmr3(second.cfg.serve.compat_socket) == RUNTIME_RTMR3


async def test_unexplained_rtmr3_fails_start(
    service_factory: Callable[..., Any], registers: tuple[str, MrState], short_tmp: Path
) -> None:
    sysfs, state = registers
    state.extend(3, hashlib.sha384(b"rootfs chain of a 1.3 image").digest())
    with pytest.raises(RuntimeEventError, match="already extended"):
        await service_factory(**rtmr_cfg(sysfs, short_tmp, True))
    assert state.extends == 1
