"""The validator client over real TLS against a scripted server: complete reads, no redirects, pins, TLS config.

Issue 11 items 1-3: each test stages the attack over a real socket and fails on the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.boot.client_cert import ssl_context
from agent.boot.vm_ca import self_signed_rsa
from agent.validator.client import ValidatorClient
from agent.validator.errors import ValidatorProtocolError, ValidatorRedirectError, ValidatorTransportError
from agent.validator.schemas import NonceResponse, parse_json_object
from agent.validator.transport import (
    SYSTEM_CA_BUNDLE,
    TlsConfigError,
    client_context,
    parse_pins,
    scrub_tls_environment,
)
from tests.boot.scripted import Request, ScriptedServer, json_answer, response

NONCE = "ab" * 32


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[ScriptedServer]:
    s = await ScriptedServer(tmp_path / "srv").start()
    try:
        yield s
    finally:
        await s.stop()


def _client(srv: ScriptedServer, pins: frozenset[bytes] = frozenset()) -> ValidatorClient:
    return ValidatorClient(srv.url, ssl_context(self_signed_rsa(2048), str(srv.tls.ca_pem)), 5.0, pins)


def _spki(pem_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# --- complete reads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
async def test_body_in_several_tls_records_is_read_whole(srv: ScriptedServer, chunked: bool) -> None:
    doc = {"nonce": NONCE, "expires_at": "2030-01-01T00:00:00Z", "pad": "x" * 3000}
    srv.routes[("GET", "/servers/nonce")] = lambda r: json_answer(200, doc, pieces=5, chunked=chunked)
    async with _client(srv) as c:
        body = await c.request("GET /servers/nonce", "GET", "/servers/nonce")
    assert json.loads(body) == doc
    assert NonceResponse.parse(body).nonce == NONCE


async def test_200kb_body_within_cap(srv: ScriptedServer) -> None:
    doc = {"nonce": NONCE, "pad": "y" * 200_000}
    srv.routes[("GET", "/big")] = lambda r: json_answer(200, doc, pieces=13)
    async with _client(srv) as c:
        body = await c.request("GET /big", "GET", "/big")
    assert len(body) > 200_000 and json.loads(body)["pad"] == doc["pad"]


async def test_body_over_cap_is_refused(srv: ScriptedServer) -> None:
    srv.routes[("GET", "/huge")] = lambda r: response(200, b"[" + b"1," * 200_000 + b"1]", chunked=True, pieces=8)
    async with _client(srv) as c:
        with pytest.raises(ValidatorTransportError, match="larger than 262144 bytes"):
            await c.request("GET /huge", "GET", "/huge")


async def test_trailing_data_after_json_is_refused(srv: ScriptedServer) -> None:
    body = json.dumps({"nonce": NONCE, "expires_at": "x"}).encode()
    srv.routes[("GET", "/servers/nonce")] = lambda r: response(200, body + b'{"nonce":"' + b"cd" * 32 + b'"}',
                                                               pieces=2)
    async with _client(srv) as c:
        raw = await c.request("GET /servers/nonce", "GET", "/servers/nonce")
    with pytest.raises(ValidatorProtocolError, match="trailing data after the JSON object"):
        NonceResponse.parse(raw)
    assert parse_json_object("x", body + b" \r\n") == json.loads(body)  # JSON whitespace is fine


@pytest.mark.parametrize("chunked", [False, True])
async def test_connection_closed_mid_body_is_truncated(srv: ScriptedServer, chunked: bool) -> None:
    def cut(_r: Request) -> list[bytes | float | None]:
        full = response(200, json.dumps({"nonce": NONCE, "pad": "z" * 4000}).encode(), pieces=4, chunked=chunked)
        return [*full[:4], None]  # head + the first body piece, then the connection drops

    srv.routes[("GET", "/servers/nonce")] = cut
    async with _client(srv) as c:
        with pytest.raises(ValidatorTransportError, match="truncated"):
            await c.request("GET /servers/nonce", "GET", "/servers/nonce")


async def test_unframed_body_is_refused(srv: ScriptedServer) -> None:
    srv.routes[("GET", "/servers/nonce")] = lambda r: [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
        json.dumps({"nonce": NONCE}).encode(), 0.02]
    async with _client(srv) as c:
        with pytest.raises(ValidatorTransportError, match="neither Content-Length nor chunked"):
            await c.request("GET /servers/nonce", "GET", "/servers/nonce")


# --- redirects ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_never_followed(srv: ScriptedServer, status: int) -> None:
    srv.routes[("POST", "/servers/boot/attestation")] = lambda r: response(
        status, b"", extra_headers={"Location": srv.plain_url + "/servers/boot/attestation"})
    async with _client(srv) as c:
        with pytest.raises(ValidatorRedirectError) as exc:
            await c.request("POST /servers/boot/attestation", "POST", "/servers/boot/attestation",
                            headers={"X-Chutes-Nonce": NONCE, "X-Boot-Token": "cd" * 32}, body=b'{"quote":"AAAA"}')
    assert exc.value.status == status
    assert f"HTTP {status}" in str(exc.value) and "redirect to http://127.0.0.1 refused" in str(exc.value)
    assert len(srv.requests) == 1
    assert bytes(srv.plain_bytes) == b""  # nothing, not even a connection's first byte, went to the target


# --- TLS from configuration only, pins ----------------------------------------------------------------

async def test_pins_accept_the_issuing_ca(srv: ScriptedServer) -> None:
    srv.routes[("GET", "/servers/nonce")] = lambda r: json_answer(200, {"nonce": NONCE})
    async with _client(srv, parse_pins([_spki(srv.tls.ca_pem)])) as c:
        await c.request("GET /servers/nonce", "GET", "/servers/nonce")
    assert len(srv.requests) == 1


async def test_pin_mismatch_closes_before_sending(srv: ScriptedServer, tmp_path: Path) -> None:
    other = await ScriptedServer(tmp_path / "other").start()
    await other.stop()
    srv.routes[("POST", "/servers/boot/attestation")] = lambda r: json_answer(200, {})
    async with _client(srv, parse_pins([_spki(other.tls.ca_pem)])) as c:
        with pytest.raises(ValidatorTransportError, match=r"TLS pin: no certificate in 127\.0\.0\.1.s verified chain"):
            await c.request("POST x", "POST", "/servers/boot/attestation", headers={"X-Chutes-Nonce": NONCE},
                            body=b"{}")
    assert srv.requests == []  # the request (nonce, quote) was never written


def test_pin_format_is_checked() -> None:
    with pytest.raises(TlsConfigError, match="not 64 hex"):
        parse_pins(["abc"])


def test_context_ignores_ssl_cert_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSL_CERT_FILE/SSL_CERT_DIR/SSLKEYLOGFILE never reach the boot context."""
    from agent.sim.validator_nginx import make_test_tls

    host = make_test_tls(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    bundle = make_test_tls(mine).ca_pem
    monkeypatch.setenv("SSL_CERT_FILE", str(host.ca_pem))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    ctx = client_context(str(bundle))
    subjects = [c["subject"] for c in ctx.get_ca_certs()]
    assert len(subjects) == 1  # exactly the configured bundle
    assert ctx.keylog_filename is None
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname


def test_default_bundle_is_the_system_file() -> None:
    assert SYSTEM_CA_BUNDLE == "/etc/ssl/certs/ca-certificates.crt"
    with pytest.raises(TlsConfigError, match="CA bundle /nonexistent"):
        client_context("/nonexistent")


def test_scrub_tls_environment() -> None:
    env = {"SSL_CERT_FILE": "x", "OPENSSL_CONF": "y", "OPENSSL_WHATEVER": "z", "HTTPS_PROXY": "p", "PATH": "/bin",
           "CHUTES_ATTEST_LOG_LEVEL": "debug"}
    removed = scrub_tls_environment(env)
    assert sorted(removed) == ["HTTPS_PROXY", "OPENSSL_CONF", "OPENSSL_WHATEVER", "SSL_CERT_FILE"]
    assert env == {"PATH": "/bin", "CHUTES_ATTEST_LOG_LEVEL": "debug"}
