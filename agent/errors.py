"""The one root of every error the agent raises on purpose.

Each :class:`AgentError` carries the process exit code it means (:mod:`agent.exitcodes`, documented in
``--help`` and the README) and a stable, machine-readable ``reason`` code (logged, written to
``boot-status.json``, and safe to match on). ``cli.main`` maps an uncaught ``AgentError`` to its exit
code in one place, so commands raise instead of translating exceptions by hand, and every command
agrees (a configuration error exits 2 everywhere).

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
    reason: str = "failed"

    def __init__(self, *args: object, exit_code: int | None = None, reason: str | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code
        if reason is not None:
            self.reason = reason


class UsageError(AgentError):
    """A configuration or usage mistake (exit 2)."""

    exit_code = EXIT_USAGE
    reason = "config"


class BadInputError(AgentError):
    """Input that does not parse: a quote, a nonce, a file (exit 4)."""

    exit_code = EXIT_BAD_INPUT
    reason = "bad_input"


class VerificationError(AgentError):
    """Evidence parsed, but a check did not pass (exit 3)."""

    exit_code = EXIT_VERIFY_FAILED
    reason = "verify_failed"


class UnavailableError(AgentError):
    """A required device, library or source is missing (exit 5)."""

    exit_code = EXIT_UNAVAILABLE
    reason = "unavailable"
