"""Every aiohttp internal the service touches, in one place, with the versions it was checked against.

Tested with aiohttp >= 3.9, < 3.15 — the same cap ``pyproject.toml`` puts on the dependency; importing
this module with an aiohttp outside that range raises :class:`UntestedAiohttpError` (the service would
otherwise run on internals nobody checked). Before raising the cap, review each item below against the
new release (``tests/serve/test_aiohttp_adapter.py`` exercises all of them):

- ``web_protocol.RequestHandler.handle_error(request, status, exc, message)``: overridden (by swapping
  in a subclass, :func:`answer_bad_http_in_json`) so unparseable HTTP gets the socket's JSON error body,
  no traceback and no echo of the raw request line. ``RequestHandler`` declares ``__slots__``, so the
  subclass declares empty ``__slots__`` to stay layout-compatible for the ``__class__`` swap.
- ``RequestHandler._messages`` (parsed requests not yet handled), ``_request_in_progress`` and
  ``_request_count`` (:func:`has_unanswered`, :func:`has_parsed_requests`): private state read to know
  whether a connection still owes its caller an answer.
- ``StreamWriter.output_size`` of ``request.writer``: the answer has started (:func:`answer_started`).
- Elsewhere: ``TCPConnector._create_connection`` is overridden by
  :class:`agent.validator.transport.PinningConnector` (SPKI pins, checked on each new TLS connection);
  it lives there because it is the validator client's, not the service's, but falls under the same cap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from agent.log import get_logger
from agent.serve.errors import ApiError, json_response

log = get_logger(__name__)

#: The aiohttp versions these internals were checked against: [low, high).
TESTED_RANGE = ((3, 9), (3, 15))


class UntestedAiohttpError(ImportError):
    """The installed aiohttp is outside :data:`TESTED_RANGE`."""


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        raise UntestedAiohttpError(f"cannot read aiohttp version {text!r}") from None


def check_version(version: str = aiohttp.__version__) -> None:
    low, high = TESTED_RANGE
    if not low <= _version_tuple(version) < high:
        raise UntestedAiohttpError(
            f"aiohttp {version} is outside the range this service's aiohttp internals were checked against "
            f"(>= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; see agent/serve/aiohttp_adapter.py)")


check_version()


# -- RequestHandler -------------------------------------------------------------------------------------

def has_parsed_requests(handler: Any) -> bool:
    """aiohttp has parsed requests on this connection that have not started yet (pipelined)."""
    return bool(getattr(handler, "_messages", None))


def has_unanswered(handler: Any, started: int) -> bool:
    """A parsed request has not reached the middleware yet (``started`` requests have), or an answer is
    still being written."""
    return bool(getattr(handler, "_messages", None) or getattr(handler, "_request_in_progress", False)
                or getattr(handler, "_request_count", 0) > started)


def answer_started(request: web.BaseRequest) -> bool:
    """Bytes of the answer to ``request`` have been written (an error can no longer replace it)."""
    return request.writer.output_size > 0


Render = Callable[[ApiError], dict[str, str]]


def _handle_error(socket_name: str, render: Render) -> Callable[..., Any]:
    """A replacement for ``RequestHandler.handle_error``: same contract, JSON body, no traceback, and the
    raw request line is never echoed back."""

    def handle_error(self: Any, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.info("serve.bad_http", socket=socket_name, status=status, reason=type(exc).__name__ if exc else "")
        if answer_started(request):
            raise ConnectionError("response already started, cannot send the error")
        if status >= 500:
            err = ApiError(500, "internal_error", "internal error")
        else:
            err = ApiError(status, "bad_http", f"malformed HTTP request ({type(exc).__name__ if exc else status})")
        resp = json_response(render(err), status=err.status)
        resp.force_close()
        return resp

    return handle_error


class JsonErrors:
    """Makes aiohttp's request handlers for one socket answer unparseable HTTP in that socket's JSON."""

    __slots__ = ("_cls", "_name", "_render")

    def __init__(self, socket_name: str, render: Render) -> None:
        self._name = socket_name
        self._render = render
        self._cls: type | None = None

    def install(self, handler: Any) -> None:
        """Swap ``handler``'s class for a slot-compatible subclass overriding ``handle_error``."""
        if self._cls is None:
            base = type(handler)
            self._cls = type(f"JsonErrors{base.__name__}", (base,), {
                "__slots__": (), "handle_error": _handle_error(self._name, self._render)})
        handler.__class__ = self._cls
