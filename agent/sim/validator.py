"""A faithful Chutes validator for tests and the demo (chutes-protocol.md §2, §5.1). NEVER production.

Shape: a real nginx TLS terminator (:mod:`agent.sim.validator_nginx`, ``optional_no_ca``, client cert
forwarded as ``X-Client-Cert``) in front of this aiohttp app on a unix socket, as the live validator
is deployed. Endpoints and checks follow the protocol reference:

- ``GET /servers/nonce?miner_hotkey=`` → ``{"nonce", "expires_at"}``; single use, 10-minute TTL, bound
  to the client IP and the hotkey;
- ``POST /servers/boot/attestation`` (``X-Chutes-Nonce``) → checks, in the validator's order: body
  schema (422), nonce (401), client certificate (401), quote decoding (400), report_data nonce half
  (400) and cert half (403), quote signatures under the configured (simulated) root (403), DEBUG off
  (403), MRTD/RTMRs against the measurement sets (403), hotkey registration (401), known VM (404) →
  ``{"key", "boot_token"}`` (+ configurable newer-generation fields);
- ``GET``/``PUT /servers/{vm_name}/luks?hotkey=`` (``X-Boot-Token``) → ``{"passphrase"}``;
- ``GET /instances/launch_config/{config_id}/nonce`` (``Authorization`` = launch token) → one-time text nonce.

Faults (:class:`Fault`) are injectable per endpoint: status codes (with ``Retry-After``), delays,
garbage and truncated bodies, dropped connections; N times or always. Everything it saw is kept in
:attr:`FaithfulValidator.events` (no secret values) for assertions.

CLI: ``python -m agent.sim.validator --port 8443 --state-dir DIR --vm NAME --hotkey SS58 --root-key-file F``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.log import Secret, get_logger
from agent.sim import validator_nginx as nginx_mod

log = get_logger(__name__)

NONCE_TTL_S = 600.0
BOOT_TOKEN_TTL_S = 600.0
ENDPOINTS = ("nonce", "attestation", "luks_get", "luks_put", "launch_nonce")
ZERO_RTMR = "0" * 96
FAULT_KINDS = ("status", "delay", "garbage", "truncated", "drop", "replay_nonce")


@dataclass
class Fault:
    """One injected misbehaviour. ``times`` None = always."""

    #: status (code + detail, optional Retry-After), delay (then the real answer), garbage (200 text/html),
    #: truncated (the real answer cut in half), drop (connection closed, no answer), replay_nonce (the nonce
    #: endpoint hands out the previous, already consumed nonce again).
    kind: str
    status: int = 500
    times: int | None = 1
    delay_s: float = 0.0
    retry_after: str | None = None
    detail: str = "injected fault"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind: unknown {self.kind!r}")


@dataclass
class MeasurementSet:
    """A ``TeeMeasurementConfig`` reduced to what boot checks use (hex, any case)."""

    name: str
    version: str
    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    boot_rtmr3: str = ZERO_RTMR

    def matches(self, q: Any) -> bool:
        want = (self.mrtd, self.rtmr0, self.rtmr1, self.rtmr2, self.boot_rtmr3)
        got = (q.mr_td, q.rtmr0, q.rtmr1, q.rtmr2, q.rtmr3)
        return all(bytes(g).hex() == w.lower() for g, w in zip(got, want, strict=True))


def simulated_measurements() -> list[MeasurementSet]:
    """The set matching :mod:`agent.sim.quote_sim`'s default measurements."""
    from agent.sim import quote_sim

    r = quote_sim.DEFAULT_RTMRS
    return [MeasurementSet("simulated-dev", "0.0.0-sim", quote_sim.DEFAULT_MR_TD.hex(), r[0].hex(), r[1].hex(),
                           r[2].hex(), r[3].hex())]


@dataclass
class _Nonce:
    ip: str
    hotkey: str | None
    expires: float
    purpose: str = "boot"


@dataclass
class _Vm:
    hotkey: str
    root: Secret
    cache: Secret | None = None


@dataclass
class _Launch:
    token: str
    nonce: str | None


@dataclass
class ValidatorState:
    root_ca_pem: bytes
    measurements: list[MeasurementSet]
    proxy_auth: str = field(default_factory=lambda: secrets.token_hex(16))
    registered_hotkeys: set[str] | None = None
    response_extras: dict[str, Any] = field(default_factory=dict)
    nonces: dict[str, _Nonce] = field(default_factory=dict)
    vms: dict[str, _Vm] = field(default_factory=dict)
    boot_tokens: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    launches: dict[str, _Launch] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_nonce: str | None = None


STATE_KEY = web.AppKey("state", ValidatorState)


class _Refuse(Exception):
    def __init__(self, status: int, detail: str, **record: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.record = status, detail, record


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json",
                        headers=headers)


def _expires_iso(expires: float) -> str:
    return dt.datetime.fromtimestamp(expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _client_ip(req: web.Request) -> str:
    return req.headers.get("X-Real-IP", "") or (req.remote or "")


def _take_fault(state: ValidatorState, endpoint: str) -> Fault | None:
    queue = state.faults.get(endpoint) or []
    for f in queue:
        if f.times is None:
            return f
        if f.times > 0:
            f.times -= 1
            return f
    return None


@web.middleware
async def _fault_middleware(req: web.Request, handler: Any) -> web.StreamResponse:
    state: ValidatorState = req.app[STATE_KEY]
    route = req.match_info.route.name or ""
    if req.headers.get(nginx_mod.PROXY_AUTH_HEADER) != state.proxy_auth:
        # like the live validator's proxy-provenance check: only nginx may talk to the app
        return _json(403, {"detail": "request did not come through the attestation proxy"})
    fault = _take_fault(state, route) if route in ENDPOINTS else None
    if fault is None:
        return await handler(req)
    state.events.append({"endpoint": route, "fault": fault.kind, "status": fault.status})
    if fault.kind == "delay":
        await asyncio.sleep(fault.delay_s)
        return await handler(req)
    if fault.kind == "status":
        hdrs = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        return _json(fault.status, {"detail": fault.detail}, hdrs)
    if fault.kind == "garbage":
        return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    if fault.kind == "drop":
        return web.Response(status=nginx_mod.DROP_STATUS)
    if fault.kind == "replay_nonce" and state.last_nonce is not None:
        return _json(200, {"nonce": state.last_nonce, "expires_at": _expires_iso(time.time() + NONCE_TTL_S)})
    resp = await handler(req)  # truncated: the real answer, cut in half (valid HTTP framing)
    body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b"{}"
    return web.Response(status=resp.status, body=body[: max(1, len(body) // 2)], content_type="application/json")


async def _nonce(req: web.Request) -> web.Response:
    state: ValidatorState = req.app[STATE_KEY]
    hotkey = req.query.get("miner_hotkey") or None
    nonce = secrets.token_hex(32)
    expires = time.time() + NONCE_TTL_S
    state.nonces[nonce] = _Nonce(_client_ip(req), hotkey, expires)
    state.last_nonce = nonce
    state.events.append({"endpoint": "nonce", "status": 200, "nonce": nonce, "ip": _client_ip(req),
                         "miner_hotkey": hotkey, "client_cert": bool(req.headers.get("X-Client-Cert"))})
    return _json(200, {"nonce": nonce, "expires_at": _expires_iso(expires)})


def _spki_hash(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def _check_attestation(state: ValidatorState, req: web.Request, body: dict[str, Any], rec: dict[str, Any]) -> _Vm:
    from agent.quote import QuoteError, parse_quote, verify_quote

    quote_b64, vm_name, hotkey = body["quote"], body["vm_name"], body["miner_hotkey"]
    nonce = req.headers.get("X-Chutes-Nonce", "")
    rec.update(nonce=nonce, vm_name=vm_name, miner_hotkey=hotkey)
    entry = state.nonces.pop(nonce, None)  # consumed on first use, whatever happens next
    if entry is None:
        raise _Refuse(401, "Invalid or expired nonce")
    if entry.expires < time.time():
        raise _Refuse(401, "Invalid or expired nonce")
    if entry.ip != _client_ip(req) or entry.purpose != "boot":
        raise _Refuse(401, "Nonce was issued to a different client")
    if entry.hotkey is not None and entry.hotkey != hotkey:
        raise _Refuse(401, "Nonce was issued for a different miner_hotkey")
    escaped = req.headers.get("X-Client-Cert", "")
    rec["client_verify"] = req.headers.get("X-Client-Verify")
    if not escaped:
        raise _Refuse(401, "Client certificate required")
    try:
        cert = x509.load_pem_x509_certificate(unquote(escaped).encode())
    except ValueError:
        raise _Refuse(401, "Client certificate unreadable") from None
    try:
        raw = base64.b64decode(quote_b64, validate=True)
        q = parse_quote(raw)
    except (binascii.Error, ValueError, QuoteError) as exc:
        raise _Refuse(400, f"Invalid quote: {type(exc).__name__}") from None
    rd = bytes(q.report_data)
    rec["report_data_nonce_match"] = rd[:32].hex() == nonce.lower()
    rec["cert_hash_match"] = rd[32:] == _spki_hash(cert)
    if not rec["report_data_nonce_match"]:
        raise _Refuse(400, "Quote report_data does not match the nonce")
    if not rec["cert_hash_match"]:
        raise _Refuse(403, "Quote report_data does not match the client certificate")
    result = verify_quote(q, state.root_ca_pem)
    rec["quote_verified"] = result.ok
    if not result.ok:
        failed = ",".join(c.name for c in result.checks if not c.passed)
        raise _Refuse(403, f"Quote verification failed ({failed})")
    if q.debug:
        raise _Refuse(403, "TD debug mode is enabled")
    match = next((m for m in state.measurements if m.matches(q)), None)
    rec["measurement"] = match.name if match else None
    if match is None:
        raise _Refuse(403, "Measurements do not match any configured measurement set")
    if state.registered_hotkeys is not None and hotkey not in state.registered_hotkeys:
        raise _Refuse(401, "Miner hotkey is not registered on the subnet")
    vm = state.vms.get(vm_name)
    if vm is None or vm.hotkey != hotkey:
        raise _Refuse(404, "VM not found")
    return vm


async def _attestation(req: web.Request) -> web.Response:
    state: ValidatorState = req.app[STATE_KEY]
    rec: dict[str, Any] = {"endpoint": "attestation", "ip": _client_ip(req)}
    state.events.append(rec)
    try:
        data = await req.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    missing = [k for k in ("quote", "vm_name", "miner_hotkey")
               if not isinstance(data, dict) or not isinstance(data.get(k), str)]
    if missing:  # FastAPI/pydantic answers schema errors with 422
        rec.update(status=422, reason=f"missing fields {missing}")
        return _json(422, {"detail": [{"loc": ["body", k], "msg": "field required"} for k in missing]})
    try:
        vm = _check_attestation(state, req, data, rec)
    except _Refuse as exc:
        rec.update(status=exc.status, reason=exc.detail)
        return _json(exc.status, {"detail": exc.detail})
    token = secrets.token_hex(32)
    state.boot_tokens[token] = (data["miner_hotkey"], data["vm_name"], time.time() + BOOT_TOKEN_TTL_S)
    rec.update(status=200, reason="ok")
    return _json(200, {"key": vm.root.reveal().decode(), "boot_token": token, **state.response_extras})


def _check_token(state: ValidatorState, req: web.Request, vm_name: str, hotkey: str) -> None:
    tok = state.boot_tokens.get(req.headers.get("X-Boot-Token", ""))
    if tok is None or tok[2] < time.time():
        raise _Refuse(401, "Invalid or expired boot token")
    if tok[0] != hotkey or tok[1] != vm_name:
        raise _Refuse(403, "Boot token was issued for a different VM")


async def _luks(req: web.Request) -> web.Response:
    state: ValidatorState = req.app[STATE_KEY]
    vm_name, hotkey = req.match_info["vm_name"], req.query.get("hotkey", "")
    rec: dict[str, Any] = {"endpoint": f"luks_{req.method.lower()}", "vm_name": vm_name, "miner_hotkey": hotkey}
    state.events.append(rec)
    try:
        _check_token(state, req, vm_name, hotkey)
        vm = state.vms.get(vm_name)
        if vm is None:
            raise _Refuse(404, "VM not found")
        if req.method == "PUT":
            vm.cache = Secret(secrets.token_hex(64))
        elif vm.cache is None:
            raise _Refuse(404, "No LUKS passphrase for this VM")
    except _Refuse as exc:
        rec.update(status=exc.status, reason=exc.detail)
        return _json(exc.status, {"detail": exc.detail})
    rec.update(status=200, reason="ok")
    assert vm.cache is not None
    return _json(200, {"passphrase": vm.cache.reveal().decode()})


async def _launch_nonce(req: web.Request) -> web.Response:
    state: ValidatorState = req.app[STATE_KEY]
    cid = req.match_info["config_id"]
    rec: dict[str, Any] = {"endpoint": "launch_nonce", "config_id": cid}
    state.events.append(rec)
    launch = state.launches.get(cid)
    if launch is None or not secrets.compare_digest(req.headers.get("Authorization", ""), launch.token):
        rec["status"] = 401
        return _json(401, {"detail": "Invalid launch token"})
    if launch.nonce is None:
        rec["status"] = 404
        return _json(404, {"detail": "Nonce not found or already used"})
    nonce, launch.nonce = launch.nonce, None
    rec["status"] = 200
    return web.Response(status=200, text=nonce, content_type="text/plain")


def make_app(state: ValidatorState) -> web.Application:
    app = web.Application(middlewares=[_fault_middleware], client_max_size=1024 * 1024)
    app[STATE_KEY] = state
    app.router.add_get("/servers/nonce", _nonce, name="nonce")
    app.router.add_post("/servers/boot/attestation", _attestation, name="attestation")
    app.router.add_get("/servers/{vm_name}/luks", _luks, name="luks_get")
    app.router.add_put("/servers/{vm_name}/luks", _luks, name="luks_put")
    app.router.add_get("/instances/launch_config/{config_id}/nonce", _launch_nonce, name="launch_nonce")
    return app


class FaithfulValidator:
    """nginx (TLS, optional_no_ca) + the app; ``async with FaithfulValidator(...) as v: v.url``."""

    def __init__(self, state_dir: str | os.PathLike[str], *, root_ca_pem: bytes,
                 measurements: list[MeasurementSet] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = ValidatorState(root_ca_pem, measurements if measurements is not None else simulated_measurements())
        self.host, self.port = host, port or nginx_mod.free_port(host)
        self.tls = nginx_mod.make_test_tls(self.state_dir, host)
        self._runner: web.AppRunner | None = None
        self._nginx: nginx_mod.NginxProcess | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_bundle(self) -> str:
        return str(self.tls.ca_pem)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.state.events

    def add_vm(self, vm_name: str, hotkey: str, root_passphrase: Secret | None = None) -> Secret:
        """Register a VM and the root LUKS passphrase the validator holds for it (returned)."""
        secret = root_passphrase if root_passphrase is not None else Secret(secrets.token_hex(32))
        self.state.vms[vm_name] = _Vm(hotkey, secret)
        return secret

    def inject(self, endpoint: str, fault: Fault) -> Fault:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint: one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        self.state.faults.setdefault(endpoint, []).append(fault)
        return fault

    def register_launch_config(self, config_id: str, token: str, nonce: str | None = None) -> str:
        """A launch config whose one-time rint nonce is served to ``Authorization: token``."""
        value = nonce or secrets.token_hex(16)
        self.state.launches[config_id] = _Launch(token, value)
        return value

    def attestations(self) -> list[dict[str, Any]]:
        return [e for e in self.state.events if e.get("endpoint") == "attestation" and "fault" not in e]

    async def start(self) -> FaithfulValidator:
        sock = self.state_dir / "validator-app.sock"
        self._runner = web.AppRunner(make_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(sock))
        await site.start()
        os.chmod(sock, 0o600)
        conf = nginx_mod.nginx_conf(self.state_dir, self.tls, self.host, self.port, sock, self.state.proxy_auth)
        self._nginx = nginx_mod.NginxProcess(self.state_dir, conf, self.host, self.port)
        await asyncio.to_thread(self._nginx.start)
        log.info("sim.validator_started", url=self.url, state_dir=str(self.state_dir))
        return self

    async def stop(self) -> None:
        if self._nginx is not None:
            await asyncio.to_thread(self._nginx.stop)
            self._nginx = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for vm in self.state.vms.values():
            vm.root.wipe()
            if vm.cache is not None:
                vm.cache.wipe()

    async def __aenter__(self) -> FaithfulValidator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _read_key_file(path: str) -> Secret:
    with open(path, "rb") as fh:
        return Secret(fh.read().rstrip(b"\n"))


async def _serve(args: argparse.Namespace) -> int:
    from agent.sim.quote_sim import load_or_create_sim_pki

    root = Path(args.root_ca).read_bytes() if args.root_ca else load_or_create_sim_pki(args.sim_state_dir).root_ca_pem
    measurements = simulated_measurements()
    if args.measurements:
        measurements = [MeasurementSet(**m) for m in json.loads(Path(args.measurements).read_text())]
    v = FaithfulValidator(args.state_dir, root_ca_pem=root, measurements=measurements, host=args.host, port=args.port)
    if args.vm:
        if not (args.hotkey and args.root_key_file):
            print("--vm needs --hotkey and --root-key-file", file=sys.stderr)
            return 2
        v.add_vm(args.vm, args.hotkey, _read_key_file(args.root_key_file))
    await v.start()
    print(json.dumps({"url": v.url, "ca_bundle": v.ca_bundle, "state_dir": str(v.state_dir)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await v.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.sim.validator", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--state-dir", required=True, help="TLS files, nginx config and logs go here")
    p.add_argument("--sim-state-dir", default="/var/lib/chutes-attest/sim",
                   help="simulated PCK chain (same as quote.simulated_state_dir); its root verifies quotes")
    p.add_argument("--root-ca", help="PEM root CA for quote verification instead of the simulated one")
    p.add_argument("--measurements", help="JSON list of measurement sets (default: the simulated ones)")
    p.add_argument("--vm", help="VM name to register")
    p.add_argument("--hotkey", help="its miner hotkey")
    p.add_argument("--root-key-file", help="file holding its root LUKS passphrase (keep it 0600)")
    args = p.parse_args(argv)
    from agent import log as log_mod

    log_mod.configure("info", "console")
    return asyncio.run(_serve(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
