"""The chute socket: ``/v1/*`` JSON API for containers (evidence, rint nonces and checks, symkey checks).

Errors are ``{"error": code, "detail": text}``; 4xx only for malformed requests. Verify endpoints answer
every well-formed request with 200 and ``{"valid": bool, "reason": code}``.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from agent.log import Secret
from agent.serve import rint, symkey
from agent.serve.context import ctx_of
from agent.serve.errors import ApiError, json_bytes_response, json_response
from agent.serve.handlers_common import evidence_call, peer_of, query_gpu_ids, query_nonce, rate_limit
from agent.serve.middleware import read_json_object
from agent.serve.status import caller_status
from agent.validator.rint_relay import RelayError, fetch_validator_nonce

_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


async def health(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    status = ctx.health.get("status", "ok")
    return json_response({"status": status}, 200 if status == "ok" else 503)


async def status(request: web.Request) -> web.Response:
    """This caller's own figures and the node facts; node-wide counters are on the compat socket only."""
    return json_response(caller_status(ctx_of(request), peer_of(request), "chute"))


async def evidence(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_nonce(request)
    gpu_ids = query_gpu_ids(request)
    peer = peer_of(request)
    rate_limit(ctx.evidence_limiter, peer, "evidence")
    return json_response(await evidence_call(ctx.collector.evidence(nonce, gpu_ids, caller=peer.scope)))


async def devices(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    gpu_ids = query_gpu_ids(request)
    return json_response({"devices": await evidence_call(ctx.collector.devices(gpu_ids))})


async def rint_nonce(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    peer = peer_of(request)
    rate_limit(ctx.nonce_limiter, peer, "nonce")
    nonce, expires_at = ctx.nonces.issue(peer.scope)
    # Both values are ASCII with nothing to escape (32 hex; ISO-8601): the bytes json_response would write.
    return json_bytes_response(b'{"nonce":"%s","expires_at":"%s"}' % (nonce.encode(), expires_at.encode()))


def _str_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise ApiError(400, f"missing_{name}", f"{name}: required")
    if not isinstance(value, str):
        raise ApiError(400, f"bad_{name}", f"{name}: expected a string, got {type(value).__name__}")
    return value


async def rint_verify(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    body = await read_json_object(request)
    nonce = _str_field(body, "nonce")
    if not _HEX32.fullmatch(nonce):
        raise ApiError(400, "bad_nonce", "nonce: expected 32 hex characters (an issued rint nonce)")
    commitment = _str_field(body, "commitment").strip()
    if not commitment or not _HEX.fullmatch(commitment):
        raise ApiError(400, "bad_commitment", "commitment: expected a non-empty hex string")
    outcome = ctx.nonces.consume(nonce.lower(), peer_of(request).scope)
    if outcome != "ok":
        return json_response({"valid": False, "reason": outcome})
    return json_response(rint.verify_commitment(commitment, nonce.lower(), v4_nonce=ctx.cfg.rint.v4_nonce).as_json())


async def rint_validator_nonce(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    raw = request.headers.get("Authorization", "").strip()
    if raw.lower().startswith("bearer "):
        raw = raw[7:].strip()
    if not raw:
        raise ApiError(401, "missing_token", "authorization: the launch JWT is required in the Authorization header")
    rate_limit(ctx.relay_limiter, peer_of(request), "validator relay")
    if not raw.isascii() or not raw.isprintable():
        # A JWT is printable ASCII; anything else (incl. surrogate-escaped raw bytes) is not a token.
        raise ApiError(400, "bad_token", "authorization: expected a launch JWT (printable ASCII)")
    token = Secret(raw)
    del raw
    s = ctx.cfg.serve
    try:
        nonce = await fetch_validator_nonce(
            token, allowed_hosts=s.validator_hosts, timeout_s=s.relay_timeout_s, ca_bundle=s.relay_ca_bundle,
        )
    except RelayError as exc:
        raise ApiError(exc.status, exc.code, exc.detail) from None
    finally:
        token.wipe()
    return json_response({"nonce": nonce})


def _symkey_fields(body: dict[str, Any]) -> tuple[bytes, str, int]:
    key_hex = _str_field(body, "symmetric_key")
    if not _HEX32.fullmatch(key_hex):
        raise ApiError(400, "bad_symmetric_key", "symmetric_key: expected 32 hex characters (16 bytes)")
    proto = _str_field(body, "proto").lower()
    if proto not in symkey.PROTOCOLS:
        raise ApiError(400, "bad_proto", f"proto: expected one of {', '.join(symkey.PROTOCOLS)}")
    port = body.get("port")
    if isinstance(port, str) and _PORT_TEXT.fullmatch(port):  # ASCII digits only ("²".isdigit() is True)
        port = int(port)
    if port is None:
        raise ApiError(400, "missing_port", "port: required")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ApiError(400, "bad_port", "port: expected an integer 1..65535")
    return bytes.fromhex(key_hex), proto, port


async def symkey_verify(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    key, proto, port = _symkey_fields(body)
    response = _str_field(body, "response")
    valid, reason = symkey.verify_response(key, response, proto, port)
    return json_response({"valid": valid, "reason": reason})


async def symkey_respond(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    key, proto, port = _symkey_fields(body)
    return json_response({"response": symkey.encrypt_response(key, symkey.expected_plaintext(proto, port))})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/health", health)
    r.add_get("/v1/status", status)
    r.add_get("/v1/evidence", evidence)
    r.add_get("/v1/devices", devices)
    r.add_post("/v1/rint/nonce", rint_nonce)
    r.add_post("/v1/rint/verify", rint_verify)
    r.add_get("/v1/rint/validator-nonce", rint_validator_nonce)
    r.add_post("/v1/symkey/verify", symkey_verify)
    r.add_post("/v1/symkey/respond", symkey_respond)
