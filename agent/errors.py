"""The one root of every error the agent raises on purpose, and the one map from errors to exit codes
and HTTP statuses.

Each :class:`AgentError` class carries, as class attributes (the way aiohttp's ``web_exceptions`` carry
their ``status_code``):

- ``exit_code``: the process exit code it means (:mod:`agent.exitcodes`, documented in ``--help`` and the
  README). ``cli.main`` maps an uncaught ``AgentError`` to it in one place, so commands (``serve``'s
  start-up included) raise instead of translating exceptions by hand, and every command agrees (a
  configuration error exits 2 everywhere, a missing device or an unusable socket or certificate 5);
- ``http_status``: the HTTP status it answers with where it can reach a request handler (400 malformed
  input, 503 a source unavailable, 429 refused for load, 504 past its deadline; 500 for anything else,
  which is then an internal error). :class:`agent.serve.errors.ApiError` takes its status from here
  (:meth:`~agent.serve.errors.ApiError.of`);
- ``reason``: a stable, machine-readable code (logged, written to ``boot-status.json``, safe to match on).

A subclass in another module picks the base whose meaning it has (``BadInputError`` for what does not
parse, ``UnavailableError`` for what is missing, ...) and overrides an attribute only where it differs.

Subclasses keep their historical builtin bases (``ValueError``, ``RuntimeError``) through multiple
inheritance where callers catch those. Messages never carry secrets: they end up on consoles and in
journals.
"""

from __future__ import annotations

from agent.exitcodes import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
)


class AgentError(Exception):
    """Base of every deliberate failure: an exit code and a stable reason code travel with it."""

    exit_code: int = EXIT_FAILED
    #: The status of an HTTP answer caused by this error (500: an internal error, not the caller's fault).
    http_status: int = 500
    reason: str = "failed"

    def __init__(self, *args: object, exit_code: int | None = None, reason: str | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code
        if reason is not None:
            self.reason = reason
        if http_status is not None:
            self.http_status = http_status


class UsageError(AgentError):
    """A configuration or usage mistake (exit 2; over HTTP the service's own fault: 500)."""

    exit_code = EXIT_USAGE
    reason = "config"


class BadInputError(AgentError):
    """Input that does not parse: a quote, a nonce, a file (exit 4, HTTP 400)."""

    exit_code = EXIT_BAD_INPUT
    http_status = 400
    reason = "bad_input"


class VerificationError(AgentError):
    """Evidence parsed, but a check did not pass (exit 3)."""

    exit_code = EXIT_VERIFY_FAILED
    reason = "verify_failed"


class UnavailableError(AgentError):
    """A required device, library, source, socket or certificate is missing or unusable (exit 5, HTTP 503)."""

    exit_code = EXIT_UNAVAILABLE
    http_status = 503
    reason = "unavailable"


class OverloadedError(AgentError):
    """Refused for load (a queue or a per-caller share is full); retry later (exit 1, HTTP 429)."""

    http_status = 429
    reason = "overloaded"


class DeadlineError(AgentError):
    """The work did not finish within its deadline (exit 1, HTTP 504)."""

    http_status = 504
    reason = "deadline_exceeded"
