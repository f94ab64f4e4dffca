"""HTTP error values for both sockets, so handlers raise one thing and each app renders its own shape.

The chute socket answers ``{"error": code, "detail": text}``; the compat socket keeps the existing
service's ``{"detail": text}`` (but with a 4xx status for bad input instead of a blanket 500).
"""

from __future__ import annotations

import json

from aiohttp import web

from agent.errors import AgentError


class ApiError(AgentError):
    """A request failed with a known status, a stable machine code and a one-line reason.

    ``status`` is this answer's ``http_status``; for an error of the agent's own that reaches a handler,
    :meth:`of` takes it from the error's class (``agent.errors``: the one map of exit codes and statuses).
    """

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, reason=code, http_status=status)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    @classmethod
    def of(cls, exc: AgentError, code: str | None = None, detail: str | None = None, *,
           headers: dict[str, str] | None = None) -> ApiError:
        """The answer for ``exc``: its class's ``http_status``, ``code`` (default: its ``reason``) and
        ``detail`` (default: its one-line message)."""
        return cls(exc.http_status, code or exc.reason, detail if detail is not None else str(exc), headers=headers)


def bad_request(code: str, detail: str) -> ApiError:
    """400 naming the offending field in ``detail``."""
    return ApiError(400, code, detail)


def chute_body(err: ApiError) -> dict[str, str]:
    return {"error": err.code, "detail": err.detail}


def compat_body(err: ApiError) -> dict[str, str]:
    return {"detail": err.detail}


#: One encoder for every response (``json.dumps`` with options builds a new JSONEncoder per call).
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON encoded the way the old FastAPI service encoded it (compact, UTF-8)."""
    return web.Response(body=_encode(data).encode(), status=status, content_type="application/json",
                        headers=headers)


def json_bytes_response(body: bytes, status: int = 200) -> web.Response:
    """A response whose JSON body the caller already encoded (hot paths with a fixed shape)."""
    return web.Response(body=body, status=status, content_type="application/json")
