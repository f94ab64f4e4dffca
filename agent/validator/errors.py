"""Errors of the validator client, split by what the retry policy must do with them."""

from __future__ import annotations

from agent.errors import AgentError


class ValidatorError(AgentError):
    """Base class; ``str(exc)`` is one operator-readable line without any secret."""


class ValidatorHTTPError(ValidatorError):
    """The validator answered with a non-success status."""

    def __init__(self, endpoint: str, status: int, detail: str = "", retry_after_s: float | None = None) -> None:
        text = f"{endpoint}: HTTP {status}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


class ValidatorRedirectError(ValidatorHTTPError):
    """The validator answered 3xx. Never followed: the next hop could be plain http or another host."""

    def __init__(self, endpoint: str, status: int, location_host: str) -> None:
        super().__init__(endpoint, status, f"redirect to {location_host} refused, never followed")
        self.location_host = location_host


class ValidatorTransportError(ValidatorError):
    """No usable HTTP answer: connection refused/reset, TLS failure, timeout, truncated body."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"{endpoint}: {detail}")
        self.endpoint = endpoint
        self.detail = detail


class ValidatorProtocolError(ValidatorError):
    """A 2xx answer whose body is not what the protocol says (non-JSON, missing or malformed field)."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"{endpoint}: {detail}")
        self.endpoint = endpoint
        self.detail = detail
