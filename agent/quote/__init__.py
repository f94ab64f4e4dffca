"""TDX quotes and SEV-SNP reports: the C parsers (:func:`parse_quote`, :func:`parse_snp_report`, kind
detection with :func:`evidence_kind` / :func:`parse_evidence`) and the TDX signature self-check
(:func:`verify_quote`)."""

from agent.checks import Check
from agent.quote.kind import evidence_kind, parse_evidence
from agent.quote.parser import Quote, QuoteError, parse_quote
from agent.quote.snp_parser import SnpReport, SnpReportError, decode_tcb, parse_snp_report
from agent.quote.verify import VerifyResult, load_pinned_root, verify_quote

__all__ = ["Check", "Quote", "QuoteError", "SnpReport", "SnpReportError", "VerifyResult", "decode_tcb",
           "evidence_kind", "load_pinned_root", "parse_evidence", "parse_quote", "parse_snp_report",
           "verify_quote"]
