"""Input parsing and evidence-error mapping shared by the compat and chute handlers.

The chute socket (``/v1``) is strict: a nonce is exactly 64 hex characters as given, and any ``gpu_ids``
value that is not a GPU on this node is a 400. The compat socket answers as the newest reference
attestation-service does (chutes-vm-generations.md §8): the nonce is trimmed and lower-cased before the
64-hex check (with the reference's error texts), and ``gpu_ids`` is handed over raw for the reference's
filter (:meth:`agent.evidence.collector.Collector.compat_gpu_selection`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from agent.evidence.base import DeadlineExceeded, EvidenceError, GpuEvidenceError, QueueFullError
from agent.evidence.device_info import GpuIdError, parse_gpu_ids
from agent.evidence.report_data import NONCE_LEN, ReportDataError, parse_nonce
from agent.serve.errors import ApiError
from agent.serve.middleware import PEER_KEY
from agent.serve.peer import UNKNOWN, Peer
from agent.serve.ratelimit import KeyedLimiter, retry_after_header


def peer_of(request: web.Request) -> Peer:
    return request.get(PEER_KEY, UNKNOWN)


def query_nonce(request: web.Request) -> bytes:
    """The required ``nonce`` query parameter: exactly 64 hex characters (32 bytes), never truncated."""
    values = request.query.getall("nonce", [])
    if not values:
        raise ApiError(400, "missing_nonce", "nonce: required query parameter (64 hex characters)")
    if len(values) > 1:
        raise ApiError(400, "bad_nonce", "nonce: given more than once")
    try:
        return parse_nonce(values[0])
    except ReportDataError as exc:
        raise ApiError(400, "bad_nonce", str(exc)) from None


def compat_nonce_text(value: str) -> bytes:
    """The newest reference's rule (sek8s ``validate_quote_nonce``): trim, exactly 64 hex, lower-case;
    its messages, so a bad nonce gets the same ``detail`` from both services."""
    text = value.strip()
    if not text:
        raise ApiError(400, "bad_nonce", "Nonce cannot be empty")
    if len(text) != 2 * NONCE_LEN:
        raise ApiError(400, "bad_nonce", f"Nonce must be exactly {2 * NONCE_LEN} hex characters "
                                         f"(32 bytes), got {len(text)} characters")
    try:
        return parse_nonce(text.lower())
    except ReportDataError:
        raise ApiError(400, "bad_nonce", "Nonce must contain only hexadecimal characters (0-9, a-f)") from None


def query_compat_nonce(request: web.Request, *, required: bool = True) -> bytes | None:
    """The compat ``nonce`` parameter; None when absent and not ``required``."""
    values = request.query.getall("nonce", [])
    if not values:
        if required:
            raise ApiError(400, "missing_nonce", "nonce: required query parameter (64 hex characters)")
        return None
    if len(values) > 1:
        raise ApiError(400, "bad_nonce", "nonce: given more than once")
    return compat_nonce_text(values[0])


def query_gpu_ids_raw(request: web.Request) -> list[str] | None:
    """``gpu_ids`` as the reference's ``_normalize_gpu_ids`` sees them: repeats and comma lists split,
    trimmed, empty parts dropped, duplicates kept (they count toward "fewer than all GPUs"); None = all."""
    out = [part.strip() for value in request.query.getall("gpu_ids", []) for part in value.split(",")]
    return [p for p in out if p] or None


def query_gpu_ids(request: web.Request) -> list[str] | None:
    """``gpu_ids`` repeated and/or comma-separated, ``GPU-`` or bare; None = all GPUs."""
    values = request.query.getall("gpu_ids", [])
    if not values:
        return None
    try:
        return parse_gpu_ids(values)
    except GpuIdError as exc:
        raise ApiError(400, "bad_gpu_ids", str(exc)) from None


def rate_limit(limiter: KeyedLimiter, peer: Peer, what: str) -> None:
    wait = limiter.check(peer.scope)
    if wait:
        raise ApiError(429, "rate_limited", f"too many {what} requests from this caller; retry later",
                       headers={"Retry-After": retry_after_header(wait)})


_T = TypeVar("_T")


async def evidence_call(coro: Awaitable[_T]) -> _T:
    """Await hardware work, mapping evidence errors to HTTP: 429 queue full, 504 deadline, 400 unknown
    GPU id, 503 source unavailable."""
    # statuses from the error classes (agent.errors: one map); the codes are this API's
    try:
        return await coro
    except QueueFullError as exc:
        raise ApiError.of(exc, "queue_full", headers={"Retry-After": retry_after_header(exc.retry_after_s)}) from None
    except DeadlineExceeded as exc:
        raise ApiError.of(exc, "deadline_exceeded", str(exc) or "evidence deadline exceeded") from None
    except GpuEvidenceError as exc:
        raise ApiError.of(exc, "gpu_unavailable") from None
    except EvidenceError as exc:
        raise ApiError.of(exc, "quote_unavailable") from None
    except GpuIdError as exc:  # a well-formed id that names no GPU on this node
        raise ApiError.of(exc, "bad_gpu_ids") from None
