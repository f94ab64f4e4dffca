"""Compat socket: the sek8s attestation-service routes and JSON shapes (chutes-protocol.md §4.1)."""

from __future__ import annotations

import base64
import json
import re
import secrets

import pytest

from agent.evidence.gpu_verify import verify_evidence_entry
from agent.quote import parse_quote
from agent.serve.server import Service
from agent.sim.gpu_sim import SimulatedDeviceCA
from tests.serve.helpers import report_data_of, spki_sha256_of, unix_client

DEVICE_KEYS = {"uuid", "name", "memory", "major", "minor", "clock_rate", "ecc", "model_short_ref"}


async def test_health_is_json_pong(service: Service) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/health")
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.text() == '"pong"'


async def test_attest_shape_and_binding(service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/attest", params={"nonce": nonce})
        assert r.status == 200
        body = await r.json()
    assert set(body) == {"tdx_quote", "nvtrust_evidence"}
    assert isinstance(body["nvtrust_evidence"], str)  # double-encoded, like the old service
    evidence = json.loads(body["nvtrust_evidence"])
    assert isinstance(evidence, list) and len(evidence) == 2
    for item in evidence:
        assert set(item) >= {"certificate", "evidence", "arch"}
        assert item["arch"] == "HOPPER"
        base64.b64decode(item["evidence"], validate=True)
        # the GPUs signed the same nonce (verified against the simulated device root only)
        result = verify_evidence_entry(item, bytes.fromhex(nonce), root_pem=SimulatedDeviceCA().root_pem)
        assert result.ok, result
    quote = base64.b64decode(body["tdx_quote"], validate=True)
    expected = bytes.fromhex(nonce) + spki_sha256_of(service.cfg.serve.cert_path)
    assert report_data_of(quote) == expected
    assert bytes(parse_quote(quote).report_data) == expected


async def test_attest_gpu_ids_filter_forms(service: Service) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        devices = await (await c.get("/devices")).json()
        uuids = [d["uuid"] for d in devices]
        nonce = secrets.token_hex(32)
        one = await (await c.get("/attest", params={"nonce": nonce, "gpu_ids": uuids[1]})).json()
        assert len(json.loads(one["nvtrust_evidence"])) == 1
        dashed = f"GPU-{uuids[0][:8]}-{uuids[0][8:12]}-{uuids[0][12:16]}-{uuids[0][16:20]}-{uuids[0][20:]}"
        both = await c.get("/attest", params=[("nonce", nonce), ("gpu_ids", dashed), ("gpu_ids", uuids[1])])
        assert len(json.loads((await both.json())["nvtrust_evidence"])) == 2
        comma = await c.get("/attest", params={"nonce": nonce, "gpu_ids": f"{uuids[0]},{uuids[1]}"})
        assert len(json.loads((await comma.json())["nvtrust_evidence"])) == 2


async def test_devices_shape(service: Service) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/devices")
        assert r.status == 200
        devices = await r.json()
    assert isinstance(devices, list) and len(devices) == 2
    for d in devices:
        assert set(d) == DEVICE_KEYS
        assert re.fullmatch(r"[0-9a-f]{32}", d["uuid"])  # GPU- prefix and hyphens removed
        assert isinstance(d["clock_rate"], float) and d["clock_rate"] >= 1000 * 1000  # MHz x1000 quirk
        assert isinstance(d["ecc"], bool) and isinstance(d["memory"], int)
        assert d["model_short_ref"] == d["name"].split()[-1].lower()


async def test_tdx_quote_is_a_json_string(service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/tdx/quote", params={"nonce": nonce})
        assert r.status == 200
        value = await r.json()
    assert isinstance(value, str)
    quote = base64.b64decode(value, validate=True)
    assert report_data_of(quote)[:32] == bytes.fromhex(nonce)
    assert report_data_of(quote)[32:] == spki_sha256_of(service.cfg.serve.cert_path)


async def test_nvtrust_evidence_is_a_json_string_of_a_list(service: Service) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/nvtrust/evidence", params={"name": "vm1", "nonce": secrets.token_hex(32)})
        assert r.status == 200
        outer = await r.json()
    assert isinstance(outer, str)
    inner = json.loads(outer)  # what old SDKs do: json.loads(resp.json())
    assert isinstance(inner, list) and len(inner) == 2


@pytest.mark.parametrize("route", ["/attest", "/tdx/quote", "/quote", "/nvtrust/evidence"])
@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"nonce": "ab" * 31}, "Nonce must be exactly 64 hex characters (32 bytes), got 62 characters"),
        ({"nonce": "ab" * 33}, "Nonce must be exactly 64 hex characters (32 bytes), got 66 characters"),
        ({"nonce": " " + "ab" * 31 + "a "}, "got 63 characters"),  # trimmed first
        ({"nonce": "zz" * 32}, "Nonce must contain only hexadecimal characters (0-9, a-f)"),
        ({"nonce": "  "}, "Nonce cannot be empty"),
    ],
)
async def test_bad_nonce_is_400_with_the_reference_detail(service: Service, route: str, params: dict,
                                                          needle: str) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get(route, params=params)
        assert r.status == 400
        body = await r.json()
    assert set(body) == {"detail"}
    assert needle in body["detail"]


@pytest.mark.parametrize("route", ["/attest", "/tdx/quote", "/quote"])
async def test_missing_nonce_is_400_where_required(service: Service, route: str) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get(route)
        assert r.status == 400
        assert "nonce: required" in (await r.json())["detail"]


async def test_nonce_is_trimmed_and_lower_cased(service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/tdx/quote", params={"nonce": f"  {nonce.upper()}\t"})
        assert r.status == 200, await r.text()
        quote = base64.b64decode(await r.json())
    assert report_data_of(quote)[:32] == bytes.fromhex(nonce)


@pytest.mark.parametrize("gpu_ids", ["not-a-uuid", "all", "0", "0,1"])
async def test_malformed_gpu_ids_is_400(service: Service, gpu_ids: str) -> None:
    """Not a UUID and not GPU-prefixed: the reference fails (500); here a 400 naming the value."""
    async with unix_client(service.cfg.serve.compat_socket) as c:
        for route, extra in (("/devices", {}), ("/attest", {"nonce": secrets.token_hex(32)})):
            r = await c.get(route, params={"gpu_ids": gpu_ids, **extra})
            assert r.status == 400, route
            assert "gpu_ids" in (await r.json())["detail"]


async def test_unknown_route_and_method_are_json_4xx(service: Service) -> None:
    async with unix_client(service.cfg.serve.compat_socket) as c:
        r = await c.get("/nope")
        assert r.status == 404 and set(await r.json()) == {"detail"}
        r = await c.post("/attest", data=b"{}")
        assert r.status == 405 and set(await r.json()) == {"detail"}
        r = await c.get("/v1/health")  # chute routes are not on the compat socket
        assert r.status == 404
