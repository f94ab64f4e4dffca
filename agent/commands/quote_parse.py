"""Parse a TDX quote or an AMD SEV-SNP report (raw, base64 or hex, auto-detected) and print every field.

Reads FILE, or standard input for '-'. The kind is told from the bytes (agent.quote.kind). With
--verify also runs the signature self-check: for TDX the quote signature, QE report signature, QE
report_data binding and PCK chain to the pinned Intel SGX Root CA (or to --root-ca); for SNP the
named checks of agent.quote.snp_verify against the VCEK/VLEK given with --vek (or quote.snp_vek_file)
and AMD's pinned chain, nothing fetched. Exit 3 if a check fails, 4 if the input is neither.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import EXIT_OK, EXIT_VERIFY_FAILED, add_json_flag
from agent.config import AgentConfig
from agent.errors import BadInputError, UsageError

if TYPE_CHECKING:  # the quote modules load inside run() (fast --help)
    from agent.quote import Quote, SnpReport, VerifyResult
    from agent.quote.snp_verify import SnpVerifyResult

_HEX = re.compile(rb"\A(?:0x)?[0-9a-fA-F]+\Z")
_B64 = re.compile(rb"\A[A-Za-z0-9+/_-]+={0,2}\Z")
_WS = re.compile(rb"\s+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="TDX quote or SEV-SNP report file (raw, base64 or hex), or - for stdin")
    parser.add_argument("--verify", action="store_true", help="also run the signature self-check")
    parser.add_argument("--root-ca", metavar="PEM", help="TDX: root CA to pin instead of Intel's (with --verify)")
    parser.add_argument("--vek", metavar="FILE",
                        help="SNP: the VCEK/VLEK certificate (DER or PEM) for --verify (default: quote.snp_vek_file)")
    parser.add_argument("--format", choices=["auto", "raw", "base64", "hex"], default="auto",
                        help="input encoding (default: auto-detect)")
    add_json_flag(parser)


def decode_input(data: bytes, fmt: str = "auto") -> tuple[bytes, str]:
    """Return (quote bytes, detected encoding). Raw quotes start with a binary version word."""
    if fmt == "raw":
        return data, "raw"
    text = _WS.sub(b"", data)
    if fmt in ("auto", "hex") and len(text) % 2 == 0 and text and _HEX.match(text):
        return bytes.fromhex(text.removeprefix(b"0x").decode()), "hex"
    if fmt == "hex":
        raise ValueError("input is not valid hex")
    if fmt in ("auto", "base64") and text and _B64.match(text):
        try:
            alt = b"-_" if (b"-" in text or b"_" in text) else None
            padded = text + b"=" * (-len(text) % 4)
            return base64.b64decode(padded, altchars=alt, validate=True), "base64"
        except (binascii.Error, ValueError):
            if fmt == "base64":
                raise ValueError("input is not valid base64") from None
    if fmt == "base64":
        raise ValueError("input is not valid base64")
    return data, "raw"


_TD15EX_ONLY = ("vmid", "td_id", "dev_info", "init_servtd_hash", "init_servtd_attributes", "init_cpu_svn",
                "init_tee_tcb_svn", "init_tee_fmspc", "cur_servtd_hash", "cur_servtd_attributes")


def _fmt_value(value: object) -> str:
    if isinstance(value, list):
        return "..".join(str(v) for v in value)
    if isinstance(value, str) and "\n" in value:
        return f"{value.count('BEGIN CERTIFICATE')} PEM certificate(s), {len(value)} chars"
    return "-" if value is None else str(value)


def _print_text(q: Quote, encoding: str, result: VerifyResult | None) -> None:
    d = q.to_dict()
    d.pop("pck_certs")
    if q.body_type != 4:
        for key in _TD15EX_ONLY:
            d.pop(key)
    print(f"# TDX quote v{q.version}, body type {q.body_type}, {q.quote_len} bytes "
          f"(+{q.trailing_len} trailing), read as {encoding}")
    width = max(len(k) for k in d)
    for key, value in d.items():
        print(f"{key:<{width}}  {_fmt_value(value)}")
    for i, pem in enumerate(q.pck_certs):
        first = pem.split(b"\n", 2)[1][:40].decode("ascii", "replace")
        print(f"{'pck_certs[' + str(i) + ']':<{width}}  {len(pem)} B PEM ({first}...)")
    if result is not None:
        print(f"# signature self-check: {'PASS' if result.ok else 'FAIL'}")
        for c in result.checks:
            print(f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL'}  {c.detail}")


def _print_snp_text(r: SnpReport, encoding: str, result: SnpVerifyResult | None) -> None:
    d = r.to_dict()
    print(f"# SEV-SNP report v{r.version}, {r.product or 'product line unknown'}, {r.signing_key_name}, "
          f"1184 bytes, read as {encoding}")
    width = max(len(k) for k in d)
    for key, value in d.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:<{width}}  {_fmt_value(value)}")
    if result is not None:
        print(f"# signature self-check: {'PASS' if result.ok else 'FAIL'}")
        for c in result.checks:
            print(f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL'}  {c.detail}")
        for note in result.not_checked:
            print(f"# not checked: {note}")


def _run_snp(raw: bytes, encoding: str, args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.quote import SnpReportError, parse_snp_report

    try:
        r = parse_snp_report(raw)
    except SnpReportError as exc:  # already a BadInputError (exit 4)
        raise BadInputError(f"malformed SEV-SNP report: {exc}", reason="malformed_report") from None
    if args.root_ca:
        raise UsageError("--root-ca applies to TDX quotes; an SEV-SNP report is checked against AMD's pinned ARKs",
                         reason="root_ca")
    result = None
    if args.verify:
        from agent.quote.snp_verify import SnpCertificateError, verify_snp_report

        vek_path = args.vek or cfg.quote.snp_vek_file or None
        try:
            vek = Path(vek_path).read_bytes() if vek_path else None
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename}: {exc.strerror}", reason="file_unreadable") from None
        try:
            result = verify_snp_report(r, vek=vek)
        except SnpCertificateError as exc:
            raise UsageError(f"bad VEK certificate {vek_path}: {exc}", reason="vek") from None
    if args.json:
        out = r.to_dict()
        out["input_encoding"] = encoding
        if result is not None:
            out["verify"] = result.to_dict()
        print(json.dumps(out, indent=2))
    else:
        _print_snp_text(r, encoding, result)
    return EXIT_VERIFY_FAILED if result is not None and not result.ok else EXIT_OK


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """Errors are :class:`~agent.errors.AgentError` kinds; ``cli.main`` maps them to exit codes."""
    from agent.quote import QuoteError, evidence_kind, parse_quote, verify_quote

    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        root = Path(args.root_ca).read_bytes() if args.root_ca else None
    except OSError as exc:
        raise UsageError(f"cannot read {exc.filename}: {exc.strerror}", reason="file_unreadable") from None
    try:
        raw, encoding = decode_input(data, args.format)
    except ValueError as exc:
        raise BadInputError(f"malformed input: {exc}") from None
    try:
        kind = evidence_kind(raw)
    except BadInputError:
        # Neither reading fits: a report-sized input gets the SNP parser's precise error, anything
        # else the TDX parser's (as before SNP support).
        kind = "snp" if len(raw) == 1184 else "tdx"
    if kind == "snp":
        return _run_snp(raw, encoding, args, cfg)
    if args.vek:
        raise UsageError("--vek applies to SEV-SNP reports, and this is a TDX quote", reason="vek")
    try:
        q = parse_quote(raw)
    except QuoteError as exc:  # already a BadInputError (exit 4); say what the input was meant to be
        raise BadInputError(f"malformed quote: {exc}", reason="malformed_quote") from None
    result = None
    if args.verify:
        try:
            result = verify_quote(q, root)
        except ValueError as exc:
            raise UsageError(f"bad --root-ca: {exc}", reason="root_ca") from None
    if args.json:
        out = q.to_dict()
        out["input_encoding"] = encoding
        if result is not None:
            out["verify"] = result.to_dict()
        print(json.dumps(out, indent=2))
    else:
        _print_text(q, encoding, result)
    return EXIT_VERIFY_FAILED if result is not None and not result.ok else EXIT_OK
