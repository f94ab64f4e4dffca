"""The faithful validator itself: nonce binding, client-cert handling through nginx, volume keys,
launch-config rint nonces, provenance, faults."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.boot.client_cert import ssl_context
from agent.boot.vm_ca import self_signed_rsa
from agent.evidence.report_data import build_report_data
from agent.sim.luks_image import random_hotkey
from agent.sim.quote_sim import SimulatedQuoteSource
from agent.sim.validator import FaithfulValidator, Fault
from agent.sim.validator_routes import INVALID_CLIENT_CERT, INVALID_QUOTE, NO_CLIENT_CERT, NONCE_ERROR

pytestmark = pytest.mark.integration


@pytest.fixture
async def v(tmp_path: Path, sim_source: SimulatedQuoteSource) -> Any:
    val = FaithfulValidator(tmp_path / "v", root_ca_pem=sim_source.root_ca_pem)
    await val.start()
    yield val
    await val.stop()


def _session(v: FaithfulValidator, ident: Any = None, local_ip: str | None = None) -> aiohttp.ClientSession:
    ctx = ssl_context(ident, v.ca_bundle) if ident else ssl.create_default_context(cafile=v.ca_bundle)
    conn = aiohttp.TCPConnector(ssl=ctx, local_addr=(local_ip, 0) if local_ip else None, force_close=True)
    return aiohttp.ClientSession(connector=conn)


async def _nonce(s: aiohttp.ClientSession, v: FaithfulValidator, hotkey: str) -> str:
    async with s.get(f"{v.url}/servers/nonce", params={"miner_hotkey": hotkey}) as r:
        assert r.status == 200
        body = await r.json()
    assert len(body["nonce"]) == 64 and body["expires_at"].endswith("Z")
    return body["nonce"]


async def _attest(s: aiohttp.ClientSession, v: FaithfulValidator, nonce: str, quote: bytes, vm: str,
                  hotkey: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = {"quote": base64.b64encode(quote).decode(), "vm_name": vm, "miner_hotkey": hotkey}
    async with s.post(f"{v.url}/servers/boot/attestation", json=body,
                      headers={"X-Chutes-Nonce": nonce, **(headers or {})}) as r:
        return r.status, await r.json()


async def test_happy_then_reuse(v: FaithfulValidator, sim_source: SimulatedQuoteSource) -> None:
    hk, ident = random_hotkey(), self_signed_rsa(2048)
    key = v.add_vm("vm1", hk)
    async with _session(v, ident) as s:
        n = await _nonce(s, v, hk)
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        status, body = await _attest(s, v, n, q, "vm1", hk)
        assert status == 200 and body["key"] == key.reveal().decode() and len(body["boot_token"]) == 64
        status, body = await _attest(s, v, n, q, "vm1", hk)
        assert (status, body["detail"]) == (400, NONCE_ERROR)  # §12.5: fetch a fresh one
        assert v.attestations()[-1]["nonce_problem"] == "unknown or used"


async def test_nonce_bound_to_ip_and_hotkey(v: FaithfulValidator, sim_source: SimulatedQuoteSource) -> None:
    hk, ident = random_hotkey(), self_signed_rsa(2048)
    v.add_vm("vm1", hk)
    async with _session(v, ident) as s, _session(v, ident, local_ip="127.0.0.2") as other_ip:
        n = await _nonce(s, v, hk)
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        assert await _attest(other_ip, v, n, q, "vm1", hk) == (400, {"detail": NONCE_ERROR})
        assert v.attestations()[-1]["nonce_problem"] == "issued to a different client"
        n = await _nonce(s, v, hk)
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        other_hk = random_hotkey()
        status, body = await _attest(s, v, n, q, "vm1", other_hk)
        assert (status, body["detail"]) == (400, NONCE_ERROR)
        assert v.attestations()[-1]["nonce_problem"] == "issued for a different miner_hotkey"
        n = await _nonce(s, v, hk)
        v.state.nonces[n].expires = 0
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        assert await _attest(s, v, n, q, "vm1", hk) == (400, {"detail": NONCE_ERROR})
        assert v.attestations()[-1]["nonce_problem"] == "expired"


async def test_client_cert_comes_from_tls_not_from_headers(
    v: FaithfulValidator, sim_source: SimulatedQuoteSource,
) -> None:
    hk, ident, other = random_hotkey(), self_signed_rsa(2048), self_signed_rsa(2048)
    v.add_vm("vm1", hk)
    spoof = {"X-Client-Cert": "-----BEGIN%20CERTIFICATE-----", "X-Client-Verify": "SUCCESS"}
    async with _session(v) as nocert:  # no client certificate, spoofed headers
        async with nocert.get(f"{v.url}/servers/nonce", params={"miner_hotkey": hk}, headers=spoof) as r:
            n = (await r.json())["nonce"]
        assert v.events[-1]["client_cert"] is False  # nginx replaced the spoofed header
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        assert await _attest(nocert, v, n, q, "vm1", hk, spoof) == (403, {"detail": NO_CLIENT_CERT})
    async with _session(v, other) as s:  # TLS with one cert, quote bound to another
        n = await _nonce(s, v, hk)
        q = sim_source.get_quote(build_report_data(n, ident.cert))
        status, body = await _attest(s, v, n, q, "vm1", hk)
        assert (status, body["detail"]) == (403, INVALID_CLIENT_CERT)
        assert v.attestations()[-1]["cert_hash_match"] is False


async def test_bad_bodies(v: FaithfulValidator) -> None:
    async with _session(v, self_signed_rsa(2048)) as s:
        async with s.post(f"{v.url}/servers/boot/attestation", data=b"not json",
                          headers={"X-Chutes-Nonce": "x", "Content-Type": "application/json"}) as r:
            assert r.status == 422
            assert [d["loc"] for d in (await r.json())["detail"]] == [["body", "quote"], ["body", "vm_name"],
                                                                      ["body", "miner_hotkey"]]
        hk = random_hotkey()
        n = await _nonce(s, v, hk)
        status, body = await _attest(s, v, n, b"\x04\x00short", "vm", hk)
        assert (status, body["detail"]) == (403, INVALID_QUOTE)
        assert v.attestations()[-1]["quote_problem"] == "QuoteError"


async def test_volume_keys_need_the_boot_token(v: FaithfulValidator, sim_source: SimulatedQuoteSource) -> None:
    hk, ident = random_hotkey(), self_signed_rsa(2048)
    v.add_vm("vm1", hk)
    v.add_vm("vm2", hk)
    async with _session(v, ident) as s:
        n = await _nonce(s, v, hk)
        _, body = await _attest(s, v, n, sim_source.get_quote(build_report_data(n, ident.cert)), "vm1", hk)
        token = body["boot_token"]
        url = f"{v.url}/servers/vm1/luks"
        async with s.get(url, params={"hotkey": hk}, headers={"X-Boot-Token": "0" * 64}) as r:
            assert r.status == 401
        async with s.get(url, params={"hotkey": hk}, headers={"X-Boot-Token": token}) as r:
            assert (r.status, (await r.json())["detail"]) == (404, "No LUKS passphrase for this VM")
        async with s.put(url, params={"hotkey": hk}, headers={"X-Boot-Token": token}) as r:
            first = (await r.json())["passphrase"]
            assert r.status == 200 and len(first) == 128
        async with s.get(url, params={"hotkey": hk}, headers={"X-Boot-Token": token}) as r:
            assert (await r.json())["passphrase"] == first
        async with s.get(f"{v.url}/servers/vm2/luks", params={"hotkey": hk}, headers={"X-Boot-Token": token}) as r:
            assert r.status == 403


async def test_launch_config_rint_nonce_is_one_time(v: FaithfulValidator) -> None:
    nonce = v.register_launch_config("cfg-1", "jwt-token")
    url = f"{v.url}/instances/launch_config/cfg-1/nonce"
    async with _session(v) as s:
        async with s.get(url, headers={"Authorization": "wrong"}) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": "jwt-token"}) as r:
            assert r.status == 200 and r.content_type == "text/plain" and await r.text() == nonce
        async with s.get(url, headers={"Authorization": "jwt-token"}) as r:
            assert r.status == 404
    assert len(nonce) == 32


async def test_app_refuses_requests_that_bypass_nginx(v: FaithfulValidator) -> None:
    conn = aiohttp.UnixConnector(path=str(v.state_dir / "validator-app.sock"))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://app/servers/nonce") as r:
        assert r.status == 403


async def test_faults(v: FaithfulValidator) -> None:
    v.inject("attestation", Fault("drop", times=1))
    v.inject("nonce", Fault("status", status=429, times=1, retry_after="9"))
    async with _session(v) as s:
        with pytest.raises(aiohttp.ServerDisconnectedError):  # nginx closed the connection, no answer
            async with s.post(f"{v.url}/servers/boot/attestation", json={}) as r:
                await r.read()
        async with s.get(f"{v.url}/servers/nonce") as r:
            assert r.status == 429 and r.headers["Retry-After"] == "9"
        async with s.get(f"{v.url}/servers/nonce") as r:
            assert r.status == 200
    with pytest.raises(ValueError, match="endpoint"):
        v.inject("nope", Fault("drop"))
