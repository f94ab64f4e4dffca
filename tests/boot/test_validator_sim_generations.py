"""The faithful validator across VM generations, over real TLS through its nginx fronts: every endpoint's
happy path and rejections, route guards, the runtime-quote replay (issue 11 item 6), key life cycle,
TTLs, signing keys and the new faults."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID

from agent.evidence.report_data import build_report_data
from agent.sim.quote_sim import SimulatedQuoteSource
from agent.sim.validator import FaithfulValidator, Fault, MeasurementSet, simulated_measurement
from agent.sim.validator_routes import (
    CVM_ONLY,
    INVALID_CLIENT_CERT,
    LEGACY_ONLY,
    MEASUREMENT_MISMATCH,
    MUST_USE_CVM,
    NONCE_ERROR,
    NOT_VIA_PROXY,
    QUOTE_NONCE_MISMATCH,
)
from agent.validator.proof import Hotkey, proof_headers, ss58_decode

pytestmark = pytest.mark.integration

SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
OTHER_SEED = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
VM = "chutes-vm-01"
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Ident:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


def make_ident(tmp: Path, name: str, cn: str = "sek8s-vm-root-ca") -> Ident:
    """A self-signed client identity (EC for speed: the validator only hashes the SPKI)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chutes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    cp, kp = tmp / f"{name}.crt", tmp / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return Ident(cert, cp, kp)


def session(v: FaithfulValidator, ident: Ident | None = None, local_ip: str | None = None) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=v.ca_bundle)
    if ident is not None:
        ctx.load_cert_chain(ident.cert_path, ident.key_path)
    conn = aiohttp.TCPConnector(ssl=ctx, local_addr=(local_ip, 0) if local_ip else None, force_close=True)
    return aiohttp.ClientSession(connector=conn)


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def call(s: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers
    async with s.request(method, url, data=body, headers=hdrs, allow_redirects=False) as r:
        text = await r.read()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


@dataclass
class Rig:
    v: FaithfulValidator
    tmp: Path
    boot_q: SimulatedQuoteSource  # RTMR3 = 0
    run_q: SimulatedQuoteSource  # RTMR3 = the measurement's runtime value
    ident: Ident
    hotkey: Hotkey
    build_key: str

    @property
    def ss58(self) -> str:
        return self.hotkey.ss58

    async def nonce(self, s: aiohttp.ClientSession, base: str, *, query: bool = True) -> str:
        params = f"?miner_hotkey={self.ss58}" if query else ""
        status, body = await call(s, "GET", f"{base}/servers/nonce{params}")
        assert status == 200, body
        assert HEX64.fullmatch(body["nonce"]) and body["expires_at"].endswith("Z")
        return body["nonce"]

    def boot_body(self, nonce: str, *, first_boot: bool | None = True, quote_src: Any = None,
                  cert: x509.Certificate | None = None) -> bytes:
        q = (quote_src or self.boot_q).get_quote(build_report_data(nonce, cert or self.ident.cert))
        body: dict[str, Any] = {"quote": base64.b64encode(q).decode(), "vm_name": VM, "miner_hotkey": self.ss58}
        if first_boot is not None:
            body["first_boot"] = first_boot
        return compact(body)

    async def boot(self, s: aiohttp.ClientSession, base: str, *, sign: bool = True, first_boot: bool | None = True,
                   quote_src: Any = None, query: bool = True) -> tuple[int, Any]:
        nonce = await self.nonce(s, base, query=query)
        body = self.boot_body(nonce, first_boot=first_boot, quote_src=quote_src)
        headers = {"X-Chutes-Nonce": nonce, "User-Agent": "TDX-LUKS-Client/1.0"}
        if sign:
            headers.update(proof_headers(self.hotkey, nonce, body))
        return await call(s, "POST", f"{base}/servers/boot/attestation", body, headers)

    def volume_body(self, quote_nonce: str, volumes: list[str] | None = None, cert: x509.Certificate | None = None,
                    quote_src: Any = None) -> bytes:
        q = (quote_src or self.run_q).get_quote(build_report_data(quote_nonce, cert or self.ident.cert))
        return compact({"quote": base64.b64encode(q).decode(), "volumes": volumes or ["storage", "tdx-cache"]})

    async def provision(self, s: aiohttp.ClientSession, quote_nonce: str, body: bytes | None = None,
                        base: str | None = None) -> tuple[int, Any]:
        body = body if body is not None else self.volume_body(quote_nonce)
        headers = {"X-Quote-Nonce": quote_nonce, **proof_headers(self.hotkey, quote_nonce, body)}
        return await call(s, "POST", f"{base or self.v.cvm_url}/servers/{VM}/provision", body, headers)

    async def pconfirm(self, s: aiohttp.ClientSession, nonce: str, volumes: dict[str, bool],
                       hotkey: Hotkey | None = None, claim: str | None = None) -> tuple[int, Any]:
        body = compact({"volumes": {n: {"rotated": r} for n, r in volumes.items()}})
        headers = {"X-Confirm-Nonce": nonce, **proof_headers(hotkey or self.hotkey, nonce, body)}
        if claim is not None:
            headers["X-Chutes-Hotkey"] = claim
        return await call(s, "POST", f"{self.v.cvm_url}/servers/{VM}/provision/confirm", body, headers)


RigFactory = Callable[..., Any]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    started: list[FaithfulValidator] = []

    async def factory(generation: str, **kw: Any) -> Rig:
        m = simulated_measurement(generation)
        v = FaithfulValidator(tmp_path / f"v{len(started)}", root_ca_pem=b"", measurements=[m], generation=generation,
                              **kw)
        boot_q = SimulatedQuoteSource(tmp_path / "sim", rtmrs=m.rtmrs(runtime=False))
        run_q = SimulatedQuoteSource(tmp_path / "sim", rtmrs=m.rtmrs(runtime=True))
        v.state.root_ca_pem = boot_q.root_ca_pem
        hk = Hotkey.from_seed_hex(SEED)
        build = v.add_vm(VM, hk.ss58)
        await v.start()
        started.append(v)
        return Rig(v, tmp_path, boot_q, run_q, make_ident(tmp_path, f"id{len(started)}"), hk,
                   bytes(build.reveal()).decode())

    yield factory
    for v in started:
        await v.stop()


# ── ≤1.2 ─────────────────────────────────────────────────────────────────────


async def test_v12_boot_token_buys_volume_keys_once(make_rig: RigFactory) -> None:
    r = await make_rig("1.2", legacy_luks=False)
    async with session(r.v, r.ident) as s:
        status, body = await r.boot(s, r.v.url, sign=False, first_boot=None, query=False)
        assert status == 200 and set(body) == {"key", "boot_token"} and body["key"] == r.build_key
        token = body["boot_token"]
        url = f"{r.v.url}/servers/{VM}/luks"
        hdrs = {"X-Chutes-Hotkey": r.ss58, "X-Boot-Token": token}
        assert (await call(s, "POST", url, compact({"volumes": ["storage", "swap"]}), hdrs))[0] == 400
        assert (await call(s, "POST", url, compact({"volumes": ["storage"]}),
                           {**hdrs, "X-Boot-Token": "0" * 64}))[0] == 401
        status, keys = await call(s, "POST", url, compact({"volumes": ["storage", "tdx-cache"]}), hdrs)
        assert status == 200 and set(keys) == {"storage", "tdx-cache"} and all(len(k) == 128 for k in keys.values())
        status, again = await call(s, "POST", url, compact({"volumes": ["storage"]}), hdrs)
        assert (status, again["detail"]) == (401, "Invalid or expired boot token")  # consumed
        # the removed GET/PUT answer like FastAPI does for a method the path lacks
        status, body = await call(s, "GET", f"{url}?hotkey={r.ss58}", None, {"X-Boot-Token": token})
        assert (status, body) == (405, {"detail": "Method Not Allowed"})
        # next boot: the same volume keys, rekey replaces one
        _, body = await r.boot(s, r.v.url, sign=False, first_boot=None, query=False)
        hdrs["X-Boot-Token"] = body["boot_token"]
        status, keys2 = await call(s, "POST", url, compact({"volumes": ["storage", "tdx-cache"],
                                                            "rekey": ["tdx-cache"]}), hdrs)
        assert keys2["storage"] == keys["storage"] and keys2["tdx-cache"] != keys["tdx-cache"]
    assert r.v.nonce_usage()["boot_token.consumed"] == 2


async def test_v12_boot_is_refused_on_the_public_api_front(make_rig: RigFactory) -> None:
    r = await make_rig("1.2")
    async with session(r.v, r.ident) as s:
        status, body = await r.boot(s, r.v.api_url, sign=False, first_boot=None)
    assert (status, body["detail"]) == (403, NOT_VIA_PROXY)


async def test_boot_nonce_and_boot_token_ttls(make_rig: RigFactory) -> None:
    r = await make_rig("1.2")
    v = r.v
    async with session(v, r.ident) as s:
        nonce = await r.nonce(s, v.url)
        v.advance(599)
        body = r.boot_body(nonce, first_boot=None)
        status, boot = await call(s, "POST", f"{v.url}/servers/boot/attestation", body, {"X-Chutes-Nonce": nonce})
        assert status == 200
        nonce = await r.nonce(s, v.url)
        v.advance(601)
        body = r.boot_body(nonce, first_boot=None)
        status, resp = await call(s, "POST", f"{v.url}/servers/boot/attestation", body, {"X-Chutes-Nonce": nonce})
        assert (status, resp["detail"]) == (400, NONCE_ERROR)
        status, resp = await call(s, "POST", f"{v.url}/servers/{VM}/luks", compact({"volumes": ["storage"]}),
                                  {"X-Chutes-Hotkey": r.ss58, "X-Boot-Token": boot["boot_token"]})
        assert (status, resp["detail"]) == (401, "Invalid or expired boot token")  # 1200 s after it was issued
    assert v.nonce_usage()["boot_nonce.expired"] == 1


# ── 1.3.x ────────────────────────────────────────────────────────────────────


async def test_v13_full_flow_and_second_boot(make_rig: RigFactory) -> None:
    r = await make_rig("1.3")
    v = r.v
    async with session(v, r.ident) as s, session(v) as api:
        nonce = await r.nonce(api, v.api_url, query=False)  # nonce from the api host, no client cert there
        assert v.calls("nonce")[-1]["client_cert"] is False and v.calls("nonce")[-1]["front"] == "api"
        body = r.boot_body(nonce, first_boot=None)
        status, resp = await call(s, "POST", f"{v.tdx_base_url}/servers/boot/attestation", body,
                                  {"X-Chutes-Nonce": nonce})
        assert status == 200, resp
        assert resp["key"] == r.build_key and resp["boot_token"] is None and HEX64.fullmatch(resp["luks_quote_nonce"])
        assert set(resp) == {"key", "luks_quote_nonce", "boot_token"}
        lqn = resp["luks_quote_nonce"]
        hdrs = {"X-Quote-Nonce": lqn, "X-Chutes-Hotkey": r.ss58, "User-Agent": "TDX-LUKS-Storage/1.0"}
        # a boot quote (RTMR3 = 0) is not the runtime measurement
        status, resp = await call(s, "POST", f"{v.url}/servers/{VM}/luks/attest",
                                  r.volume_body(lqn, quote_src=r.boot_q), hdrs)
        assert (status, resp["detail"]) == (403, MEASUREMENT_MISMATCH)
        assert v.calls("luks_attest")[-1]["measurement_problem"] == "no runtime match"
        # the nonce was consumed by that call: a fresh boot gives a fresh one
        status, resp = await call(s, "POST", f"{v.url}/servers/{VM}/luks/attest", r.volume_body(lqn), hdrs)
        assert (status, resp["detail"]) == (401, "Invalid or expired quote nonce")
        _, boot = await r.boot(s, v.url, sign=False, first_boot=None, query=False)
        lqn = boot["luks_quote_nonce"]
        hdrs["X-Quote-Nonce"] = lqn
        status, resp = await call(s, "POST", f"{v.cvm_url}/servers/{VM}/luks/attest", r.volume_body(lqn), hdrs)
        assert (status, resp["detail"]) == (403, LEGACY_ONLY)
        status, resp = await call(s, "POST", f"{v.url}/servers/{VM}/luks/attest", r.volume_body(lqn), hdrs)
        assert status == 200, resp
        assert set(resp) == {"volumes", "confirm_nonce", "k3s_encryption_key"}
        assert len(base64.b64decode(resp["k3s_encryption_key"], validate=True)) == 32
        first = resp["volumes"]
        assert all(e["current"] is None and len(e["next"]) == 128 for e in first.values())
        confirm = {"volumes": {"storage": {"rotated": True}, "tdx-cache": {"rotated": False}}}
        chdr = {"X-Confirm-Nonce": resp["confirm_nonce"], "X-Chutes-Hotkey": r.ss58}
        status, done = await call(api, "POST", f"{v.api_url}/servers/{VM}/luks/confirm", compact(confirm), chdr)
        assert status == 200
        assert done == {"status": "confirmed", "volumes": {"storage": {"result": "promoted"},
                                                           "tdx-cache": {"result": "promoted"}}}
        status, again = await call(api, "POST", f"{v.api_url}/servers/{VM}/luks/confirm", compact(confirm), chdr)
        assert (status, again["detail"]) == (401, "Invalid or expired confirm nonce")  # single use
        # second boot: current = what was promoted; not rotating discards the new `next`
        _, boot = await r.boot(s, v.url, sign=False, first_boot=None, query=False)
        hdrs["X-Quote-Nonce"] = boot["luks_quote_nonce"]
        _, resp2 = await call(s, "POST", f"{v.url}/servers/{VM}/luks/attest",
                              r.volume_body(boot["luks_quote_nonce"]), hdrs)
        assert {n: e["current"] for n, e in resp2["volumes"].items()} == {n: e["next"] for n, e in first.items()}
        assert resp2["k3s_encryption_key"] == resp["k3s_encryption_key"]  # stable per VM
        confirm["volumes"]["tdx-cache"]["rotated"] = False
        chdr["X-Confirm-Nonce"] = resp2["confirm_nonce"]
        _, done = await call(api, "POST", f"{v.api_url}/servers/{VM}/luks/confirm", compact(confirm), chdr)
        assert done["volumes"] == {"storage": {"result": "promoted"}, "tdx-cache": {"result": "discarded"}}
    assert v.confirmations(VM) == [{"storage": "promoted", "tdx-cache": "promoted"},
                                   {"storage": "promoted", "tdx-cache": "discarded"}]
    assert bytes(v.volume_key(VM, "storage").reveal()).decode() == resp2["volumes"]["storage"]["next"]
    assert bytes(v.volume_key(VM, "tdx-cache").reveal()).decode() == first["tdx-cache"]["next"]
    assert v.key_state(VM)["volumes"] == {"storage": {"current": True, "pending": False},
                                          "tdx-cache": {"current": True, "pending": False}}


# ── 1.4.0 ────────────────────────────────────────────────────────────────────


async def test_v14_full_flow_rotation_provision_confirm(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    assert v.tdx_base_url == v.cvm_url and v.validator_base_url == v.api_url
    async with session(v, r.ident) as s:
        status, boot = await r.boot(s, v.tdx_base_url)
        assert status == 200, boot
        assert set(boot) == {"key", "luks_quote_nonce", "boot_token", "root_next", "root_confirm_nonce",
                             "vm_auth_ss58"}
        assert boot["key"] == r.build_key and boot["boot_token"] is None
        assert re.fullmatch(r"[0-9a-f]{128}", boot["root_next"]) and HEX64.fullmatch(boot["root_confirm_nonce"])
        assert len(ss58_decode(boot["vm_auth_ss58"])) == 32 and boot["vm_auth_ss58"] != r.ss58
        assert v.vm_auth_key(VM).ss58 == boot["vm_auth_ss58"]
        assert v.calls("nonce")[-1]["miner_hotkey"] == r.ss58 and v.calls("attestation")[-1]["proof"] == "valid"
        assert v.key_state(VM)["pending_root"] and v.key_state(VM)["root"] == "build"
        # root rotation confirm, then provision (the confirm nonce is shared: this order)
        status, done = await r.pconfirm(s, boot["root_confirm_nonce"], {"root": True})
        assert (status, done) == (200, {"status": "confirmed", "volumes": {"root": {"result": "promoted"}}})
        assert v.key_state(VM)["root"] == "rotated" and bytes(v.root_key(VM).reveal()).decode() == boot["root_next"]
        assert v.stored_ca(VM) is None
        status, prov = await r.provision(s, boot["luks_quote_nonce"])
        assert status == 200, prov
        assert v.stored_ca(VM) == r.ident.cert  # the presented client certificate, stored as vm_root_ca_cert
        status, done = await r.pconfirm(s, prov["confirm_nonce"], {"storage": True, "tdx-cache": True})
        assert done == {"status": "confirmed", "volumes": {"storage": {"result": "promoted"},
                                                           "tdx-cache": {"result": "promoted"}}}
        # second boot (not first): the rotated key; a new root_next and a new vm_auth key
        status, boot2 = await r.boot(s, v.tdx_base_url, first_boot=False)
        assert status == 200 and boot2["key"] == boot["root_next"] and boot2["root_next"] != boot["root_next"]
        assert boot2["vm_auth_ss58"] != boot["vm_auth_ss58"]
        # root confirm refused by the VM side: rotated false discards; the stored key stays
        _, done = await r.pconfirm(s, boot2["root_confirm_nonce"], {"root": False})
        assert done["volumes"] == {"root": {"result": "discarded"}}
        assert bytes(v.root_key(VM).reveal()).decode() == boot["root_next"]
        # a re-downloaded image (first_boot) gets the build passphrase again; stored keys are dropped
        _, boot3 = await r.boot(s, v.tdx_base_url, first_boot=True)
        assert boot3["key"] == r.build_key and v.key_state(VM)["root"] == "build"
    usage = v.nonce_usage()
    assert usage["boot_nonce.issued"] == usage["boot_nonce.consumed"] == 3
    assert usage["confirm_nonce.issued"] == 4 and usage["confirm_nonce.consumed"] == 3
    assert usage["luks_quote_nonce.consumed"] == 1
    assert set(v.secret_values()) >= {r.build_key.encode(), boot["root_next"].encode()}


async def test_v14_request_proof_rejections(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v, base = r.v, r.v.cvm_url
    async with session(v, r.ident) as s:
        status, body = await r.boot(s, base, sign=False)
        assert (status, body["detail"]) == (401, "Missing request signature (X-Chutes-Hotkey, X-Chutes-Signature)")
        # signature over other bytes than those sent (same JSON, different spacing)
        nonce = await r.nonce(s, base)
        sent = r.boot_body(nonce)
        signed = json.dumps(json.loads(sent)).encode()
        hdrs = {"X-Chutes-Nonce": nonce, **proof_headers(r.hotkey, nonce, signed)}
        status, body = await call(s, "POST", f"{base}/servers/boot/attestation", sent, hdrs)
        assert (status, body["detail"]) == (401, "Invalid request signature")
        # signed by another key that claims the miner's ss58
        other = Hotkey.from_seed_hex(OTHER_SEED)
        nonce = await r.nonce(s, base)
        sent = r.boot_body(nonce)
        hdrs = {"X-Chutes-Nonce": nonce, **proof_headers(other, nonce, sent), "X-Chutes-Hotkey": r.ss58}
        status, body = await call(s, "POST", f"{base}/servers/boot/attestation", sent, hdrs)
        assert (status, body["detail"]) == (401, "Invalid request signature")
        # first_boot is required from 1.4.0
        status, body = await r.boot(s, base, first_boot=None)
        assert status == 422 and body["detail"][0]["loc"] == ["body", "first_boot"]
        # not on the subnet
        v.deregister_hotkey(r.ss58)
        status, body = await r.boot(s, base)
        assert (status, body["detail"]) == (403, "Miner hotkey is not registered on the subnet")
    assert [a["proof"] for a in v.attestations()] == ["missing", "invalid", "invalid", "valid", "valid"]


async def test_v14_provision_checks(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    other_ident = make_ident(r.tmp, "other-ca")
    async with session(v, r.ident) as s:
        _, boot = await r.boot(s, v.cvm_url)
        lqn = boot["luks_quote_nonce"]
        status, body = await r.provision(s, lqn, base=v.url)  # legacy proxy front
        assert (status, body["detail"]) == (403, CVM_ONLY)
        status, body = await r.provision(s, lqn, body=r.volume_body(lqn, cert=other_ident.cert))
        assert (status, body["detail"]) == (403, INVALID_CLIENT_CERT)
        assert v.stored_ca(VM) is None
        # the quote nonce is single use: the failed call above consumed it
        status, body = await r.provision(s, lqn)
        assert (status, body["detail"]) == (401, "Invalid or expired quote nonce")
        _, boot = await r.boot(s, v.cvm_url)
        body_bytes = r.volume_body(boot["luks_quote_nonce"])
        hdrs = {"X-Quote-Nonce": boot["luks_quote_nonce"], **proof_headers(r.hotkey, boot["luks_quote_nonce"],
                                                                            body_bytes + b" ")}
        status, body = await call(s, "POST", f"{v.cvm_url}/servers/{VM}/provision", body_bytes, hdrs)
        assert (status, body["detail"]) == (401, "Invalid request signature")
        _, boot = await r.boot(s, v.cvm_url)
        v.advance(601)  # luks_quote_nonce TTL 600 s
        status, body = await r.provision(s, boot["luks_quote_nonce"])
        assert (status, body["detail"]) == (401, "Invalid or expired quote nonce")
        assert v.nonce_usage()["luks_quote_nonce.expired"] == 1


async def test_v14_confirm_nonce_is_shared_single_use_and_expires(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    async with session(v, r.ident) as s:
        _, boot = await r.boot(s, v.cvm_url)
        _, prov = await r.provision(s, boot["luks_quote_nonce"])  # before the root confirm: overwrites its nonce
        status, body = await r.pconfirm(s, boot["root_confirm_nonce"], {"root": True})
        assert (status, body["detail"]) == (401, "Invalid or expired confirm nonce")
        assert v.key_state(VM)["pending_root"] and v.key_state(VM)["root"] == "build"
        other = Hotkey.from_seed_hex(OTHER_SEED)
        status, body = await r.pconfirm(s, prov["confirm_nonce"], {"storage": True}, hotkey=other)
        assert (status, body["detail"]) == (403, "VM belongs to a different miner hotkey")
        status, body = await r.pconfirm(s, prov["confirm_nonce"], {"storage": True}, hotkey=other, claim=r.ss58)
        assert (status, body["detail"]) == (401, "Invalid request signature")
        status, body = await r.pconfirm(s, prov["confirm_nonce"], {"storage": True, "root": True})
        assert body["volumes"] == {"storage": {"result": "promoted"}, "root": {"result": "promoted"}}
        status, body = await r.pconfirm(s, prov["confirm_nonce"], {"storage": True})
        assert status == 401
        _, boot = await r.boot(s, v.cvm_url, first_boot=False)
        v.advance(301)  # confirm nonce TTL 300 s
        status, body = await r.pconfirm(s, boot["root_confirm_nonce"], {"root": True})
        assert (status, body["detail"]) == (401, "Invalid or expired confirm nonce")
        status, body = await r.pconfirm(s, "0" * 64, {"swap": True})
        assert (status, body["detail"]) == (400, "Unsupported volume: 'swap'")
    # nothing pending: no_pending
    r2 = await make_rig("1.4")
    async with session(r2.v, r2.ident) as s:
        _, boot = await r2.boot(s, r2.v.cvm_url)
        _, body = await r2.pconfirm(s, boot["root_confirm_nonce"], {"storage": True})
        assert body["volumes"] == {"storage": {"result": "no_pending"}}


async def test_generation_endpoints_are_not_crossed(make_rig: RigFactory) -> None:
    """A 1.3 VM cannot use provision, a 1.4 VM cannot use luks/attest, luks/confirm or the unsigned flow."""
    r = await make_rig("1.3")
    async with session(r.v, r.ident) as s:
        _, boot = await r.boot(s, r.v.cvm_url, sign=False, first_boot=None)
        status, body = await r.provision(s, boot["luks_quote_nonce"])
        assert (status, body["detail"]) == (403, "provision is not served to VM version 1.3.1-sim")
    r = await make_rig("1.4")
    async with session(r.v, r.ident) as s:
        _, boot = await r.boot(s, r.v.cvm_url)
        lqn = boot["luks_quote_nonce"]
        status, body = await call(s, "POST", f"{r.v.url}/servers/{VM}/luks/attest", r.volume_body(lqn),
                                  {"X-Quote-Nonce": lqn, "X-Chutes-Hotkey": r.ss58})
        assert (status, body["detail"]) == (403, "luks/attest is not served to VM version 1.4.0-sim")
        confirm = compact({"volumes": {"storage": {"rotated": True}}})
        hdrs = {"X-Confirm-Nonce": boot["root_confirm_nonce"], "X-Chutes-Hotkey": r.ss58}
        status, body = await call(s, "POST", f"{r.v.api_url}/servers/{VM}/luks/confirm", confirm, hdrs)
        assert (status, body["detail"]) == (403, MUST_USE_CVM)
        status, body = await call(s, "POST", f"{r.v.cvm_url}/servers/{VM}/luks/confirm", confirm, hdrs)
        assert status == 403 and "not served to this VM's generation (1.4)" in body["detail"]


@pytest.mark.parametrize("generation", ["1.3", "1.4"])
async def test_runtime_quote_replayed_into_boot_is_refused(make_rig: RigFactory, generation: str) -> None:
    """Issue 11 item 6: whoever can get runtime quotes (RTMR3 = final chain) cannot get the root key."""
    r = await make_rig(generation)
    async with session(r.v, r.ident) as s:
        status, body = await r.boot(s, r.v.tdx_base_url, quote_src=r.run_q, sign=generation == "1.4",
                                    first_boot=True if generation == "1.4" else None)
        assert (status, body["detail"]) == (403, "Boot quote RTMR3 is not zero: a runtime quote is not boot evidence")
        assert "key" not in body
        status, body = await r.boot(s, r.v.tdx_base_url, sign=generation == "1.4",
                                    first_boot=True if generation == "1.4" else None)
        assert status == 200  # the same VM with a real boot quote
    att = r.v.attestations()
    assert att[0]["rtmr3_zero"] is False and att[0]["status"] == 403 and att[1]["rtmr3_zero"] is True


async def test_v12_runtime_quote_replay_residual_and_runtime_event(make_rig: RigFactory, tmp_path: Path) -> None:
    """≤1.2 registers RTMR3 = 0 at runtime too: a runtime quote replays into boot (the residual risk);
    extending RTMR3 with one runtime event before serving closes it."""
    r = await make_rig("1.2")
    async with session(r.v, r.ident) as s:
        status, body = await r.boot(s, r.v.url, sign=False, first_boot=None, quote_src=r.run_q)
        assert status == 200 and body["key"] == r.build_key
        m = simulated_measurement("1.2")
        extended = SimulatedQuoteSource(tmp_path / "sim", rtmrs=(*m.rtmrs(runtime=True)[:3], b"\x42" * 48))
        status, body = await r.boot(s, r.v.url, sign=False, first_boot=None, quote_src=extended)
        assert status == 403


async def test_registry_picks_the_generation_from_the_matched_measurement(
    make_rig: RigFactory, tmp_path: Path,
) -> None:
    r = await make_rig("1.4")
    m12 = simulated_measurement("1.2")
    other = MeasurementSet("old-image", "1.2.0", "aa" * 48, m12.rtmr0, m12.rtmr1, m12.rtmr2)
    r.v.state.measurements.insert(0, other)
    old_q = SimulatedQuoteSource(tmp_path / "sim", mr_td=bytes.fromhex("aa" * 48), rtmrs=other.rtmrs(runtime=False))
    async with session(r.v, r.ident) as s:
        status, body = await r.boot(s, r.v.cvm_url, quote_src=old_q)
        assert status == 200 and set(body) == {"key", "boot_token"}  # matched the 1.2 entry
        status, body = await r.boot(s, r.v.cvm_url)
        assert status == 200 and "root_next" in body
        r.v.state.tee_minimum_boot_version = "1.3.0"
        status, body = await r.boot(s, r.v.cvm_url, quote_src=old_q)
        assert (status, body["detail"]) == (403, "VM version 1.2.0 is below the minimum boot version")
    assert [a.get("generation") for a in r.v.attestations()] == ["1.2", "1.4", "1.2"]


async def test_fronts_strip_spoofed_provenance_and_enforce_mtls_for_newer_servers(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    spoof = {"X-Cvm-Proxy-Auth": v.state.cvm_auth, "X-Sim-Front-Auth": "x", "X-Client-Cert": "junk"}
    async with session(v) as api, session(v, r.ident) as s:
        # even knowing the secret, a header sent through the api front is replaced by nginx
        status, body = await call(api, "POST", f"{v.api_url}/servers/{VM}/provision", compact({}), spoof)
        assert (status, body["detail"]) == (403, CVM_ONLY)
        assert v.state.tee_mtls_min_version == "1.4.0"  # the default
        assert (await call(api, "GET", f"{v.api_url}/servers/nonce"))[0] == 200  # not yet a known server
        assert (await r.boot(s, v.cvm_url))[0] == 200
        status, body = await call(api, "GET", f"{v.api_url}/servers/nonce")
        assert (status, body["detail"]) == (403, MUST_USE_CVM)
        assert (await call(s, "GET", f"{v.cvm_url}/servers/nonce"))[0] == 200
        status, body = await call(api, "GET", f"{v.api_url}/servers/nope/unknown")
        assert (status, body) == (404, {"detail": "Not Found"})


async def test_signing_keys_document(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    pub = serialization.load_pem_public_key(Path(v.signing_root_pem_path).read_bytes())
    v.inject("signing_keys", Fault("bad_signature", times=1, fields=["cosign/dockerhub.pub"]))
    v.inject("signing_keys", Fault("missing_fields", times=1, fields=[("keys", "helm-pubkey.gpg")]))
    async with session(v) as api:
        status, doc = await call(api, "GET", f"{v.validator_base_url}/servers/signing-keys")
        assert status == 200 and doc["version"] == "sim-1"
        status, cut = await call(api, "GET", f"{v.validator_base_url}/servers/signing-keys")  # faults in order
        status, good = await call(api, "GET", f"{v.validator_base_url}/servers/signing-keys")

    def check(d: dict[str, Any], name: str) -> None:
        pub.verify(base64.b64decode(d["signatures"][name]), base64.b64decode(d["keys"][name]), padding.PKCS1v15(),
                   hashes.SHA256())

    check(doc, "cosign/chutes.pub")
    with pytest.raises(InvalidSignature):
        check(doc, "cosign/dockerhub.pub")
    for name in ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg"):
        check(good, name)
    assert set(cut["keys"]) == {"cosign/chutes.pub", "cosign/dockerhub.pub"} and "helm-pubkey.gpg" in cut["signatures"]


async def test_new_faults(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    async with session(v, r.ident) as s:
        # redirect to plain http on the same path
        v.inject("attestation", Fault("redirect", times=1))
        status, body = await r.boot(s, v.cvm_url)
        assert status == 307
        # missing and overridden fields on the real answer (state changes happened)
        v.inject("attestation", Fault("missing_fields", fields=["root_next", "vm_auth_ss58"]))
        status, body = await r.boot(s, v.cvm_url)
        assert status == 200 and "root_next" not in body and "key" in body and v.key_state(VM)["pending_root"]
        v.inject("attestation", Fault("override", fields={"vm_auth_ss58": "5Not;an ss58\n"}))
        _, body = await r.boot(s, v.cvm_url)
        assert body["vm_auth_ss58"] == "5Not;an ss58\n"
        # a lost answer: the validator promoted the root key but the VM saw 500
        _, boot = await r.boot(s, v.cvm_url)
        v.inject("root_confirm", Fault("status", status=500, applied=True))
        status, _ = await r.pconfirm(s, boot["root_confirm_nonce"], {"root": True})
        assert status == 500 and v.key_state(VM)["root"] == "rotated"
        assert v.calls("provision_confirm")[-1]["lost_answer"] == "status"
        # root_confirm / storage_confirm target the two confirms of one boot separately
        _, boot = await r.boot(s, v.cvm_url, first_boot=False)
        v.inject("storage_confirm", Fault("status", status=503, times=1))
        assert (await r.pconfirm(s, boot["root_confirm_nonce"], {"root": True}))[0] == 200
        _, prov = await r.provision(s, boot["luks_quote_nonce"])
        assert (await r.pconfirm(s, prov["confirm_nonce"], {"storage": True}))[0] == 503
        assert (await r.pconfirm(s, prov["confirm_nonce"], {"storage": True}))[0] == 200  # nonce not consumed
        # a body in two parts, 0.3 s apart, arrives whole
        v.inject("nonce", Fault("split", delay_s=0.3))
        async with s.get(f"{v.cvm_url}/servers/nonce") as resp:
            first = await resp.content.readany()
            rest = await resp.read()
        assert len(first) < len(first + rest) and json.loads(first + rest)["nonce"]
        # a slow answer
        v.inject("provision", Fault("delay", delay_s=0.2))
        _, boot = await r.boot(s, v.cvm_url, first_boot=False)
        assert (await r.provision(s, boot["luks_quote_nonce"]))[0] == 200
    redirect = [e for e in v.events if e.get("fault") == "redirect"]
    assert redirect and redirect[0]["fault_target"] == "attestation"
    with pytest.raises(ValueError, match="endpoint"):
        v.inject("provison", Fault("drop"))


def v5_quote(src: SimulatedQuoteSource, report_data: bytes) -> bytes:
    """The simulated v4 quote re-framed as a v5 quote (body type 2, TDX 1.0 body) and re-signed."""
    import struct

    from agent.sim import quote_sim

    v4 = src.get_quote(report_data)
    header = bytearray(v4[:48])
    struct.pack_into("<H", header, 0, 5)
    signed = bytes(header) + struct.pack("<HI", 2, 584) + v4[48:632]
    (sig_len,) = struct.unpack_from("<I", v4, 632)
    att_key = src._att_key  # the source's private attestation key (test-only reach-in)
    sig_data = quote_sim._raw_sig(att_key, signed) + quote_sim._raw_pubkey(att_key) + v4[636 + 128: 636 + sig_len]
    return signed + struct.pack("<I", len(sig_data)) + sig_data


async def test_v5_quote_is_read_at_v4_offsets_and_refused(make_rig: RigFactory) -> None:
    """The validator slices the TD report at the v4 offset: a valid v5 quote binds nothing it can read."""
    from agent.quote import parse_quote, verify_quote

    r = await make_rig("1.4")
    async with session(r.v, r.ident) as s:
        nonce = await r.nonce(s, r.v.cvm_url)
        raw = v5_quote(r.boot_q, build_report_data(nonce, r.ident.cert))
        q = parse_quote(raw)
        assert q.version == 5 and verify_quote(q, r.boot_q.root_ca_pem).ok  # a valid quote, by our own parser
        assert bytes(q.report_data) == build_report_data(nonce, r.ident.cert)
        body = compact({"quote": base64.b64encode(raw).decode(), "vm_name": VM, "miner_hotkey": r.ss58,
                        "first_boot": True})
        status, resp = await call(s, "POST", f"{r.v.cvm_url}/servers/boot/attestation", body,
                                  {"X-Chutes-Nonce": nonce, **proof_headers(r.hotkey, nonce, body)})
    assert (status, resp["detail"]) == (400, QUOTE_NONCE_MISMATCH)
    assert r.v.attestations()[-1]["quote_version"] == 5


async def test_rc_blacklist_unknown_vm_and_missing_headers(make_rig: RigFactory) -> None:
    r = await make_rig("1.4")
    v = r.v
    m = v.state.measurements[0]
    v.state.measurements[0] = MeasurementSet(m.name, m.version, m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2, m.runtime_rtmr3,
                                             rc=True, authorized_hotkeys=("5Someoneelse",))
    async with session(v, r.ident) as s:
        status, body = await r.boot(s, v.cvm_url)
        assert (status, body["detail"]) == (403, MEASUREMENT_MISMATCH)  # indistinguishable from no match
        assert v.attestations()[-1]["measurement_problem"] == "rc measurement, hotkey not authorized"
        v.state.measurements[0].authorized_hotkeys = (r.ss58,)
        assert (await r.boot(s, v.cvm_url))[0] == 200
        v.state.blacklisted_hotkeys.add(r.ss58)
        status, body = await r.boot(s, v.cvm_url)
        assert (status, body["detail"]) == (401, "Miner hotkey is blacklisted")
        v.state.blacklisted_hotkeys.clear()
        _, boot = await r.boot(s, v.cvm_url)
        lqn = boot["luks_quote_nonce"]
        body_bytes = r.volume_body(lqn)
        status, body = await call(s, "POST", f"{v.cvm_url}/servers/{VM}/provision", body_bytes,
                                  proof_headers(r.hotkey, lqn, body_bytes))  # no X-Quote-Nonce
        assert status == 422 and body["detail"][0]["loc"] == ["header", "x-quote-nonce"]
        status, body = await call(s, "POST", f"{v.cvm_url}/servers/other-vm/provision", body_bytes,
                                  {"X-Quote-Nonce": lqn, **proof_headers(r.hotkey, lqn, body_bytes)})
        assert (status, body["detail"]) == (404, "VM not found")
        status, body = await r.provision(s, lqn, body=compact({"quote": "AAAA", "volumes": []}))
        assert (status, body["detail"]) == (400, "No volumes requested")
        assert (await r.provision(s, lqn))[0] == 200  # none of the refusals above consumed the quote nonce
