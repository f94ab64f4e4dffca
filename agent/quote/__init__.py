"""TDX quotes: the C parser (:func:`parse_quote`) and the signature self-check (:func:`verify_quote`)."""

from agent.checks import Check
from agent.quote.parser import Quote, QuoteError, parse_quote
from agent.quote.verify import VerifyResult, load_pinned_root, verify_quote

__all__ = ["Check", "Quote", "QuoteError", "VerifyResult", "load_pinned_root", "parse_quote", "verify_quote"]
