"""GET /v1/rint/validator-nonce: relays only to allow-listed validator hosts over TLS; never logs the token."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from tests.serve.helpers import unix_client


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any]) -> str:
    """Shape of the launch JWT (ES256 header, claims, a signature-sized blob): the relay never verifies it."""
    head = b64url(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}.{b64url(secrets.token_bytes(64))}"


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cp, kp = tmp_path / "v.crt", tmp_path / "v.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


class FakeValidator:
    """GET /instances/launch_config/{id}/nonce: text/plain, one-time (404 afterwards), like the validator."""

    def __init__(self) -> None:
        self.nonces: dict[str, str] = {}
        self.auth_seen: list[str] = []
        self.port = 0

    async def nonce(self, request: web.Request) -> web.StreamResponse:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        value = self.nonces.pop(request.match_info["config_id"], None)
        if value is None:
            raise web.HTTPNotFound(text="no nonce")
        return web.Response(text=value, content_type="text/plain")

    async def slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="0" * 32)

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("https://example.invalid/instances/launch_config/x/nonce")


@pytest.fixture
async def validator(tls_pair: tuple[Path, Path]) -> AsyncIterator[FakeValidator]:
    fv = FakeValidator()
    app = web.Application()
    app.router.add_get("/instances/launch_config/redirect/nonce", fv.redirect)
    app.router.add_get("/instances/launch_config/slow/nonce", fv.slow)
    app.router.add_get("/instances/launch_config/{config_id}/nonce", fv.nonce)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_pair)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    fv.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fv
    await runner.cleanup()


async def relay(svc, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": token} if token is not None else {}
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        r = await c.get("/v1/rint/validator-nonce", headers=headers)
        return r.status, await r.json()


async def test_relay_allowlisted_host_over_tls(service_factory, validator: FakeValidator, tls_pair) -> None:
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"], relay_ca_bundle=str(tls_pair[0]))
    expected = secrets.token_hex(16)
    validator.nonces["cfg-123"] = expected
    token = make_jwt({"sub": "cfg-123", "url": f"https://localhost:{validator.port}/instances/launch_config/cfg-123"})
    with capture_logs() as logs:
        status, body = await relay(svc, token)
        assert (status, body) == (200, {"nonce": expected})
        assert validator.auth_seen == [token]  # the token went to the validator, as the pod would send it
        status, body = await relay(svc, token)  # one-time at the validator
        assert status == 404 and body["error"] == "nonce_unavailable"
    dumped = json.dumps(logs, default=str)
    assert token not in dumped and token.split(".")[1] not in dumped
    assert any(e.get("event") == "serve.request" and e.get("route") == "/v1/rint/validator-nonce" for e in logs)


async def test_relay_refuses_foreign_hosts(service_factory, validator: FakeValidator, tls_pair) -> None:
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"], relay_ca_bundle=str(tls_pair[0]))
    validator.nonces["c1"] = secrets.token_hex(16)
    cases = [
        f"https://127.0.0.1:{validator.port}/instances/launch_config/c1",  # same server, not the listed name
        f"https://localhost:{validator.port + 1}/instances/launch_config/c1",  # listed host, other port
        "https://169.254.169.254/instances/launch_config/c1",
        "https://api.chutes.ai.evil.example/instances/launch_config/c1",
    ]
    for url in cases:
        status, body = await relay(svc, make_jwt({"url": url}))
        assert status == 403 and body["error"] == "host_not_allowed", url
    assert validator.auth_seen == []  # nothing was contacted
    assert "c1" in validator.nonces


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (None, 401, "missing_token"),
        ("", 401, "missing_token"),
        ("not-a-jwt", 400, "bad_token"),
        ("a.%%%.c", 400, "bad_token"),
        (make_jwt({"sub": "x"}), 400, "bad_token"),
        (make_jwt({"url": "http://api.chutes.ai/instances/launch_config/x"}), 400, "bad_token"),
        (make_jwt({"url": "https://api.chutes.ai/servers/nonce"}), 400, "bad_token"),
        (make_jwt({"url": "https://api.chutes.ai/instances/launch_config/x?y=1"}), 400, "bad_token"),
        (make_jwt({"url": "https://u:p@api.chutes.ai/instances/launch_config/x"}), 400, "bad_token"),
    ],
)
async def test_relay_bad_tokens(service: Any, token: str | None, status: int, code: str) -> None:
    got_status, body = await relay(service, token)
    assert (got_status, body["error"]) == (status, code)
    if token:
        assert token not in body["detail"]


async def test_relay_does_not_follow_redirects(service_factory, validator: FakeValidator, tls_pair) -> None:
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"], relay_ca_bundle=str(tls_pair[0]))
    token = make_jwt({"url": f"https://localhost:{validator.port}/instances/launch_config/redirect"})
    status, body = await relay(svc, token)
    assert status == 502 and body["error"] == "validator_error"


async def test_relay_rejects_untrusted_tls(service_factory, validator: FakeValidator) -> None:
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"])  # system CAs only
    validator.nonces["c2"] = secrets.token_hex(16)
    status, body = await relay(svc, make_jwt({"url": f"https://localhost:{validator.port}/instances/launch_config/c2"}))
    assert status == 502 and body["error"] == "validator_unreachable"
    assert "c2" in validator.nonces


async def test_relay_is_time_bounded(service_factory, validator: FakeValidator, tls_pair) -> None:
    svc = await service_factory(validator_hosts=[f"localhost:{validator.port}"], relay_ca_bundle=str(tls_pair[0]),
                                relay_timeout_s=0.3)
    token = make_jwt({"url": f"https://localhost:{validator.port}/instances/launch_config/slow"})
    status, body = await relay(svc, token)
    assert status == 504 and body["error"] == "validator_timeout"


@pytest.mark.parametrize("url", ["https://[::1/instances/launch_config/x", "https://api.chutes.ai\uff03@evil.example/instances/launch_config/x",
                                 "https://api.chutes.ai:99999/instances/launch_config/x"])
def test_malformed_url_claims_are_bad_tokens(url: str) -> None:
    from agent.validator.rint_relay import RelayError, check_target

    with pytest.raises(RelayError) as exc:
        check_target(url, ["api.chutes.ai"])
    assert exc.value.status == 400


def test_deeply_nested_token_payload_is_a_bad_token() -> None:
    import base64

    from agent.validator.rint_relay import RelayError, token_url

    payload = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    with pytest.raises(RelayError) as exc:
        token_url(f"e30.{payload}.sig")
    assert exc.value.status == 400


# --- complete reads and one pooled connection (issue 11 items 2, 10) ---------------------------------

class SplitValidator:
    """Answers written in several pieces (separate TLS records), cut answers, and a record of connections."""

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self.transports: list[int] = []

    async def split(self, request: web.Request) -> web.StreamResponse:
        self.transports.append(id(request.transport))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        if request.match_info["mode"] == "chunked":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(self.nonce) + 2
        await resp.prepare(request)
        for part in ('"' + self.nonce[:5], self.nonce[5:20], self.nonce[20:] + '"'):
            await resp.write(part.encode())
            await asyncio.sleep(0.03)
        await resp.write_eof()
        return resp

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = 34
        await resp.prepare(request)
        await resp.write(b'"' + self.nonce[:10].encode())
        await asyncio.sleep(0.03)
        assert request.transport is not None
        request.transport.close()
        return resp


@pytest.fixture
async def split_validator(tls_pair: tuple[Path, Path]) -> AsyncIterator[tuple[SplitValidator, int]]:
    sv = SplitValidator(secrets.token_hex(16))
    app = web.Application()
    app.router.add_get("/instances/launch_config/cut/nonce", sv.cut)
    app.router.add_get("/instances/launch_config/{mode}/nonce", sv.split)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_pair)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    yield sv, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


@pytest.mark.parametrize("mode", ["length", "chunked"])
async def test_relay_reads_a_nonce_sent_in_pieces_over_one_pooled_connection(split_validator, tls_pair, mode) -> None:
    from agent.log import Secret
    from agent.validator.rint_relay import RelayClient, fetch_validator_nonce

    sv, port = split_validator
    client = RelayClient(str(tls_pair[0]))
    try:
        for _ in range(3):
            token = Secret(make_jwt({"url": f"https://localhost:{port}/instances/launch_config/{mode}"}))
            got = await fetch_validator_nonce(token, allowed_hosts=[f"localhost:{port}"], timeout_s=5, client=client)
            assert got == sv.nonce
    finally:
        await client.close()
    assert len(sv.transports) == 3 and len(set(sv.transports)) == 1  # one TLS connection, reused


async def test_relay_reports_a_cut_answer(split_validator, tls_pair) -> None:
    from agent.log import Secret
    from agent.validator.rint_relay import RelayClient, RelayError, fetch_validator_nonce

    _, port = split_validator
    client = RelayClient(str(tls_pair[0]))
    try:
        token = Secret(make_jwt({"url": f"https://localhost:{port}/instances/launch_config/cut"}))
        with pytest.raises(RelayError) as exc:
            await fetch_validator_nonce(token, allowed_hosts=[f"localhost:{port}"], timeout_s=5, client=client)
    finally:
        await client.close()
    assert exc.value.status == 502 and "truncated" in exc.value.detail


async def test_shared_relay_client_is_one_per_loop(tls_pair) -> None:
    from agent.validator.rint_relay import close_shared, shared_client

    a, b = shared_client(str(tls_pair[0])), shared_client(str(tls_pair[0]))
    assert a is b
    await close_shared()
    assert a.session.closed and shared_client(str(tls_pair[0])) is not a
    await close_shared()
