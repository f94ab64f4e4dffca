"""``gpu_ids`` on the compat socket as the reference service treats it (issue 14 item 2), with the forms
the SDK's ``CHUTES_NVIDIA_DEVICES`` holds (the miner sets it to ``",".join(gpu_uuids)``; its own tests use
``GPU-a,GPU-b``): repeats and comma lists, filter only when fewer ids than GPUs, unknown ids dropped
(possibly ``[]``), never a 400 for an id that is merely unknown. The chute socket stays strict."""

from __future__ import annotations

import json
import secrets

import pytest

from agent.serve.server import Service
from tests.serve.helpers import unix_client

GPUS = 4


def nvml_form(u: str) -> str:
    return f"GPU-{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"


@pytest.fixture
async def svc(service_factory) -> Service:
    return await service_factory(gpu__emulate=f"h100x{GPUS}", evidence_burst=1000, evidence_rate_per_s=1000.0)


async def _all(c) -> tuple[list[str], list[str]]:
    uuids = [d["uuid"] for d in await (await c.get("/devices")).json()]
    ev = json.loads(await (await c.get("/nvtrust/evidence", params={"nonce": "ab" * 32})).json())
    return uuids, [e["certificate"] for e in ev]


async def _pick(c, params: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    r = await c.get("/devices", params=params)
    assert r.status == 200, await r.text()
    devs = [d["uuid"] for d in await r.json()]
    r = await c.get("/attest", params=[("nonce", "ab" * 32), *params])
    assert r.status == 200, await r.text()
    body = await r.json()
    assert list(body) == ["tdx_quote", "nvtrust_evidence"]
    ev = json.loads(body["nvtrust_evidence"])
    r = await c.get("/nvtrust/evidence", params=[("nonce", "ab" * 32), *params])
    assert r.status == 200
    assert [e["certificate"] for e in json.loads(await r.json())] == [e["certificate"] for e in ev]
    return devs, [e["certificate"] for e in ev]


async def test_sdk_env_forms(svc: Service) -> None:
    async with unix_client(svc.cfg.serve.compat_socket) as c:
        u, certs = await _all(c)
        assert len(u) == GPUS and len(set(certs)) == GPUS

        def want(*idx: int) -> tuple[list[str], list[str]]:
            return [u[i] for i in idx], [certs[i] for i in idx]

        cases: list[tuple[list[tuple[str, str]], tuple[list[str], list[str]]]] = [
            ([("gpu_ids", f"{nvml_form(u[1])},{nvml_form(u[2])}")], want(1, 2)),  # miner: NVML UUIDs
            ([("gpu_ids", f"{u[2]},{u[1]}")], want(1, 2)),  # /devices form, any order -> NVML order
            ([("gpu_ids", f"{nvml_form(u[1])}, {nvml_form(u[3])} ")], want(1, 3)),  # spaces
            ([("gpu_ids", nvml_form(u[1])), ("gpu_ids", u[3])], want(1, 3)),  # repeated parameter
            ([("gpu_ids", f"{u[0]},,")], want(0)),  # empty parts dropped
            ([("gpu_ids", "{" + nvml_form(u[0])[4:] + "}")], want(0)),  # what uuid.UUID accepts
            ([("gpu_ids", "")], want(0, 1, 2, 3)),  # CHUTES_NVIDIA_DEVICES="" -> all
            ([("gpu_ids", "GPU-a,GPU-b")], ([], [])),  # unknown ids: dropped, down to []
            ([("gpu_ids", f"{nvml_form(u[0])},00000000-0000-0000-0000-000000000000")], want(0)),
            ([("gpu_ids", ",".join(["GPU-x"] * GPUS))], want(0, 1, 2, 3)),  # as many ids as GPUs: no filter
            ([("gpu_ids", ",".join([u[0]] * GPUS))], want(0, 1, 2, 3)),  # duplicates count too
            ([("gpu_ids", ",".join(u))], want(0, 1, 2, 3)),
        ]
        for params, expected in cases:
            assert await _pick(c, params) == expected, params


async def test_chute_socket_stays_strict(svc: Service) -> None:
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        for gpu_ids in ("GPU-a", "00000000-0000-0000-0000-000000000000"):
            r = await c.get("/v1/devices", params={"gpu_ids": gpu_ids})
            assert r.status == 400, gpu_ids
            assert (await r.json())["error"] == "bad_gpu_ids"
            r = await c.get("/v1/evidence", params={"gpu_ids": gpu_ids, "nonce": secrets.token_hex(32)})
            assert r.status == 400, gpu_ids


async def test_dropped_ids_logged_at_debug() -> None:
    """The filter itself, on a stand-in GPU list: the dropped ids are logged at debug, kept ones are not."""
    from structlog.testing import capture_logs

    from agent.config import AgentConfig
    from agent.evidence.collector import Collector

    class Gpus:
        async def devices(self, ids):
            return [{"uuid": nvml_form(u)} for u in ("a" * 32, "b" * 32, "c" * 32)]

    col = Collector(AgentConfig(), None, None, Gpus())  # type: ignore[arg-type]
    with capture_logs() as logs:
        assert await col.compat_gpu_selection(["GPU-a", "B" * 32]) == ["b" * 32]
    dropped = [e for e in logs if e["event"] == "compat.gpu_ids_dropped"]
    assert len(dropped) == 1 and dropped[0]["log_level"] == "debug" and dropped[0]["dropped"] == ["GPU-a"]
    with capture_logs() as logs:
        assert await col.compat_gpu_selection(["a" * 32]) == ["a" * 32]
        assert await col.compat_gpu_selection(None) is None
    assert not [e for e in logs if e["event"] == "compat.gpu_ids_dropped"]
