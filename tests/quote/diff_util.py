"""Compare the C parser with the pure-Python reference parser on one buffer."""

from __future__ import annotations

from typing import Any

from agent.quote import QuoteError, parse_quote
from tests.quote import reference_parser


def outcome(buf: bytes) -> str:
    """Parse with both; assert they agree (accept/reject, failing field+offset, every field)."""
    try:
        ref: dict[str, Any] | None = reference_parser.parse(buf)
        ref_err = None
    except reference_parser.RefError as e:
        ref, ref_err = None, (e.field, e.offset)
    try:
        q = parse_quote(buf)
    except QuoteError as e:
        assert ref is None, f"C rejects at {(e.field, e.offset)} ({e}), reference accepts"
        assert (e.field, e.offset) == ref_err, f"C rejects at {(e.field, e.offset)}, reference at {ref_err}"
        return "err"
    assert ref is not None, f"C accepts, reference rejects at {ref_err}"
    mismatched = sorted(k for k, v in ref.items() if getattr(q, k) != v)
    assert not mismatched, f"fields differ: {mismatched}"
    return "ok"
