"""The compat socket: the routes and JSON shapes of sek8s' attestation-service (chutes-protocol.md §4.1).

The node's attestation-proxy and existing chute SDKs talk to this socket unchanged: ``/health`` is the
JSON string ``"pong"``, ``/attest`` returns ``{"tdx_quote": b64, "nvtrust_evidence": "<JSON list as a
string>"}``, ``/tdx/quote`` a JSON string, ``/nvtrust/evidence`` a JSON string holding the evidence JSON.
Errors keep the ``{"detail": ...}`` body but bad input is 4xx rather than the old blanket 500.
"""

from __future__ import annotations

import base64
import json

from aiohttp import web

from agent.serve.context import ctx_of
from agent.serve.errors import json_response
from agent.serve.handlers_common import evidence_call, peer_of, query_gpu_ids, query_nonce, rate_limit


async def health(request: web.Request) -> web.Response:
    return json_response("pong")


async def _quote_b64(request: web.Request, nonce: bytes) -> str:
    ctx = ctx_of(request)
    quote = await evidence_call(ctx.collector.quote(nonce, caller=peer_of(request).scope))
    return base64.b64encode(quote).decode()


async def attest(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_nonce(request)
    gpu_ids = query_gpu_ids(request)
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    quote = await _quote_b64(request, nonce)
    gpu = await evidence_call(ctx.collector.gpu_evidence(nonce, gpu_ids))
    return json_response({"tdx_quote": quote, "nvtrust_evidence": json.dumps(gpu)})


async def devices(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    gpu_ids = query_gpu_ids(request)
    return json_response(await evidence_call(ctx.collector.devices(gpu_ids)))


async def tdx_quote(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_nonce(request)
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    return json_response(await _quote_b64(request, nonce))


async def nvtrust_evidence(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_nonce(request)
    gpu_ids = query_gpu_ids(request)
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    gpu = await evidence_call(ctx.collector.gpu_evidence(nonce, gpu_ids))
    return json_response(json.dumps(gpu))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/attest", attest)
    app.router.add_get("/devices", devices)
    app.router.add_get("/tdx/quote", tdx_quote)
    app.router.add_get("/nvtrust/evidence", nvtrust_evidence)
