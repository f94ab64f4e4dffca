"""The compat socket: the routes and JSON shapes of sek8s' attestation-service (chutes-vm-generations.md §8).

The node's attestation-proxy and chute SDKs talk to this socket unchanged, byte for byte as the newest
reference answers (FastAPI + ORJSONResponse: compact separators, ``application/json``):

- ``/health`` -> ``"pong"``;
- ``/attest?nonce&gpu_ids`` -> ``{"tdx_quote": b64, "nvtrust_evidence": "<JSON list as a string>"}`` on TDX,
  ``{"snp_quote": b64(raw 1184-byte report), "nvtrust_evidence": ...}`` on SEV-SNP: exactly one quote key,
  named by the TEE (the newest reference's ``f"{tee_type}_quote"``, sev-snp.md §5.3);
- ``/tdx/quote?nonce`` and its TEE-neutral alias ``/quote`` -> a JSON string (base64 quote or SNP report,
  whichever TEE this is: both routes, as the reference serves them);
- ``/nvtrust/evidence?name&nonce&gpu_ids`` -> a JSON string holding the evidence list. ``nonce`` is
  optional as it is there; without one the GPUs sign a fresh random nonce drawn here, which binds the
  evidence to nothing the caller chose (it proves only that it was made just now, for whoever trusts this
  service). The drawn nonce is returned in the ``X-Chutes-Attest-Nonce`` header;
- ``/devices?gpu_ids`` -> ``[DeviceInfo]``.

``nonce`` is trimmed and lower-cased, then must be exactly 64 hex characters (400 otherwise, with the
reference's messages). ``gpu_ids`` follows the reference's filter (see :mod:`agent.evidence.collector`):
an id that is merely unknown is dropped, never a 400. TDX quotes are v4 only unless ``quote.allow_v5``: the
validator reads v4 offsets, so a v5 quote is refused here (503) rather than failing there (SEV-SNP reports
are served at every version). Errors keep
the ``{"detail": ...}`` body, with a 4xx status for bad input instead of the reference's blanket 500.
"""

from __future__ import annotations

import base64
import json
import os

from aiohttp import web

from agent.evidence.collector import both
from agent.evidence.own_quote import TDX
from agent.log import get_logger
from agent.serve.context import ServiceContext, ctx_of
from agent.serve.errors import ApiError, json_response
from agent.serve.handlers_common import (
    evidence_call,
    peer_of,
    query_compat_nonce,
    query_gpu_ids_raw,
    rate_limit,
)
from agent.serve.status import node_status as status_doc

log = get_logger(__name__)
#: Response header carrying the nonce drawn for a nonce-less ``/nvtrust/evidence`` request.
DRAWN_NONCE_HEADER = "X-Chutes-Attest-Nonce"


async def health(request: web.Request) -> web.Response:
    return json_response("pong")


def _checked_b64(ctx: ServiceContext, quote: bytes) -> str:
    """The quote as the compat routes serve it: base64; a v5 TDX quote refused unless ``quote.allow_v5``."""
    from agent.evidence.collector import quote_version

    if ctx.collector.tee != TDX:  # an SEV-SNP report has one layout for every version (sev-snp.md §1.1)
        return base64.b64encode(quote).decode()
    version = quote_version(quote)
    if version != 4 and not ctx.cfg.quote.allow_v5:
        ctx.collector.health.v5_refused += 1
        log.warning("compat.quote_refused", quote_version=version, refused=ctx.collector.health.v5_refused,
                    reason="the validator reads v4 quotes only; quote.allow_v5 = false")
        raise ApiError(503, "quote_version", f"this platform produced a v{version} TDX quote; the validator "
                                             "reads v4 quotes only, so it is not served here "
                                             "(quote.allow_v5 = false)")
    return base64.b64encode(quote).decode()


async def _quote_b64(request: web.Request, nonce: bytes) -> str:
    ctx = ctx_of(request)
    return _checked_b64(ctx, await evidence_call(ctx.collector.quote(nonce, caller=peer_of(request).scope)))


async def _gpu_selection(request: web.Request) -> list[str] | None:
    return await evidence_call(ctx_of(request).collector.compat_gpu_selection(query_gpu_ids_raw(request)))


async def attest(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_compat_nonce(request)
    assert nonce is not None
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    gpu_ids = await _gpu_selection(request)
    caller = peer_of(request).scope
    raw, gpu = await evidence_call(both(ctx.collector.quote(nonce, caller=caller),
                                        ctx.collector.gpu_evidence(nonce, gpu_ids)))
    quote = _checked_b64(ctx, raw)
    # exactly one quote key, named by the TEE as the newest reference does (``f"{tee_type}_quote"``)
    return json_response({f"{ctx.collector.tee}_quote": quote, "nvtrust_evidence": json.dumps(gpu)})


async def devices(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    gpu_ids = await _gpu_selection(request)
    return json_response(await evidence_call(ctx.collector.devices(gpu_ids)))


async def tdx_quote(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_compat_nonce(request)
    assert nonce is not None
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    return json_response(await _quote_b64(request, nonce))


async def nvtrust_evidence(request: web.Request) -> web.Response:
    ctx = ctx_of(request)
    nonce = query_compat_nonce(request, required=False)
    headers = None
    if nonce is None:
        nonce = os.urandom(32)
        headers = {DRAWN_NONCE_HEADER: nonce.hex()}
    rate_limit(ctx.evidence_limiter, peer_of(request), "evidence")
    gpu_ids = await _gpu_selection(request)
    gpu = await evidence_call(ctx.collector.gpu_evidence(nonce, gpu_ids))
    return json_response(json.dumps(gpu), headers=headers)


async def node_status(request: web.Request) -> web.Response:
    """Node-wide figures (all callers); only here and in ``doctor``, never on the chute socket."""
    return json_response(status_doc(ctx_of(request)))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/status", node_status)
    app.router.add_get("/attest", attest)
    app.router.add_get("/devices", devices)
    app.router.add_get("/tdx/quote", tdx_quote)
    app.router.add_get("/quote", tdx_quote)  # the newest reference's TEE-neutral alias
    app.router.add_get("/nvtrust/evidence", nvtrust_evidence)
