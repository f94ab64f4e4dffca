"""structlog, configured once: console lines, JSON lines, or journald with structured fields.

Conventions every module follows:
- ``log = get_logger(__name__)``; events are short dotted names (``boot.stage``, ``serve.request``),
  details are keyword fields (``stage=``, ``duration_ms=``, ``peer_pid=``, ``result=``, ``reason=``).
- Each event name maps to a stable journald ``MESSAGE_ID`` (UUIDv5 of the name), so operators can
  ``journalctl MESSAGE_ID=…`` across versions; :func:`message_id` gives it.
- Secrets never reach a sink: values of secret-looking keys are replaced, and :class:`Secret`
  renders as ``<redacted>`` wherever it ends up.
"""

from __future__ import annotations

import functools
import json
import json.encoder
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, NoReturn, TextIO, cast

import structlog

_NAMESPACE = uuid.UUID("6c3e2b8e-1f0a-4f5e-9a57-3c1d9f6a0b21")
SECRET_KEYS = frozenset(
    {
        "key", "passphrase", "password", "secret", "token", "boot_token", "authorization",
        "symmetric_key", "luks_key", "private_key", "root_next", "launch_token",
    }
)
REDACTED = "<redacted>"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}
_configured_format: str | None = None


class Secret:
    """A secret value (LUKS passphrase, token) that refuses to print itself.

    The bytes live in a ``bytearray`` so :meth:`wipe` can overwrite them after use.
    """

    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray | str) -> None:
        self._buf = bytearray(value.encode() if isinstance(value, str) else value)

    def reveal(self) -> bytearray:
        """The underlying buffer (not a copy): hand it straight to the consumer."""
        return self._buf

    def wipe(self) -> None:
        """Overwrite the buffer with zeros and empty it."""
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf.clear()

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:  # never pickled into a cache or a queue by accident
        raise TypeError("Secret values cannot be pickled")


@functools.lru_cache(maxsize=4096)  # uuid5 (SHA-1) per event would cost ~20 µs on every log line
def message_id(event: str) -> str:
    """Stable 32-hex journald MESSAGE_ID for an event name."""
    return uuid.uuid5(_NAMESPACE, event).hex


_SECRET_KEY_CACHE: dict[str, bool] = {}


def _is_secret_key(key: str) -> bool:
    """``key.lower() in SECRET_KEYS``, memoised: the same few dozen field names recur on every line."""
    hit = _SECRET_KEY_CACHE.get(key)
    if hit is None:
        hit = key.lower() in SECRET_KEYS
        if len(_SECRET_KEY_CACHE) < 4096:  # field names come from code; bounded anyway
            _SECRET_KEY_CACHE[key] = hit
    return hit


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # as structlog.processors.add_log_level maps them
_stamp_second = -1
_stamp_prefix = ""


def _utc_timestamp() -> str:
    """ISO-8601 UTC with microseconds (``2026-01-02T03:04:05.123456Z``); strftime runs once a second."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    second = int(now)
    if second != _stamp_second:
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = second
    return f"{_stamp_prefix}.{int((now - second) * 1_000_000):06d}Z"


def _enrich(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """level, timestamp, redaction and MESSAGE_ID in one pass (one processor call per line, not four)."""
    event_dict["level"] = _LEVEL_NAMES.get(method, method)
    event_dict["timestamp"] = _utc_timestamp()
    known = _SECRET_KEY_CACHE
    for k, v in event_dict.items():  # only values are replaced: safe while iterating
        secret = known.get(k)
        if secret is None:
            secret = _is_secret_key(k)
        if secret or isinstance(v, Secret):
            event_dict[k] = REDACTED
    if "message_id" not in event_dict:
        event_dict["message_id"] = message_id(str(event_dict.get("event", "")))
    return event_dict


def _json_default(obj: Any) -> Any:
    """Values json can't encode: their ``__structlog__()`` if they have one, else ``repr`` (as structlog)."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _json_encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, default=_json_default)`` without building an encoder per line.

    CPython's C encoder, made once, writes the same text as ``json.dumps`` at about 60% of its cost; on
    an interpreter without it the (equally compatible) pure-Python encoder is made once instead.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(default=_json_default).encode
    encode = make(None, _json_default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def dumps(obj: Any) -> str:
        return "".join(encode(obj, 0))

    return dumps


_dumps = _json_encoder()


def _render_json(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """Final processor for ``json``: one JSON object per line, fields in the order they were added."""
    return _dumps(event_dict)


def _journal_field(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name.upper()).lstrip("_")
    return out or "FIELD"


def _journal_value(value: Any) -> str:
    """A field's text: mappings and lists as compact JSON (a summary's counts stay machine-readable)."""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    return str(value)


class JournaldRenderer:
    """Final processor: send one journald entry with every event field as its own field."""

    def __init__(self) -> None:
        from systemd import journal

        self._send = journal.send

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        event = str(event_dict.pop("event", ""))
        mid = str(event_dict.pop("message_id", message_id(event)))
        level = str(event_dict.pop("level", method))
        details = " ".join(f"{k}={_journal_value(v)}" for k, v in event_dict.items()
                           if k not in ("timestamp", "module"))
        fields = {_journal_field(k): _journal_value(v) for k, v in event_dict.items() if k != "timestamp"}
        fields.pop("MESSAGE", None)
        fields.pop("PRIORITY", None)
        self._send(
            f"{event} {details}".strip(),
            MESSAGE_ID=mid,
            PRIORITY=str(_PRIORITY.get(level, 6)),
            EVENT=event,
            SYSLOG_IDENTIFIER="chutes-attest",
            **fields,
        )
        raise structlog.DropEvent


def journald_available() -> bool:
    """True when systemd-python imports and a journal socket exists."""
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return os.path.exists("/run/systemd/journal/socket")


def _resolve_format(fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.environ.get("JOURNAL_STREAM") and journald_available():
        return "journald"
    return "console"


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at call time (test capture, redirection), not at configure time."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog for the whole process; returns the format actually used.

    ``journald`` falls back to JSON on stderr (with a warning) when systemd-python is missing, so a
    misconfigured node still logs somewhere an operator can read.
    """
    global _configured_format
    resolved = _resolve_format(fmt)
    # structlog only calls write/flush (and we call isatty): the proxy stands in for a TextIO
    out = stream if stream is not None else cast(TextIO, _CurrentStderr())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _enrich,  # add_log_level + TimeStamper(iso, utc) + redaction + MESSAGE_ID, fused: runs on every line
        structlog.processors.format_exc_info,
    ]
    fallback_note = None
    renderer: Any
    if resolved == "journald":
        try:
            renderer = JournaldRenderer()
        except ImportError:
            fallback_note = "systemd-python not installed; logging JSON to stderr instead of journald"
            resolved = "json"
    if resolved == "json":
        renderer = _render_json
    elif resolved == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty() if hasattr(out, "isatty") else False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # one write + flush per line
        cache_logger_on_first_use=False,
    )
    _configured_format = resolved
    if fallback_note:
        get_logger(__name__).warning("log.fallback", reason=fallback_note)
    return resolved


def get_logger(name: str | None = None, **initial: Any) -> structlog.typing.FilteringBoundLogger:
    """A lazy structlog logger (configuration applies even when created at import time).

    ``name`` becomes the ``module`` field (structlog reserves the ``logger`` keyword).
    """
    if name:
        initial.setdefault("module", name)
    return structlog.get_logger(**initial)
