"""Get a TDX quote bound to a nonce and a certificate, from the configured quote source.

REPORTDATA = the 32 nonce bytes ‖ SHA-256(SPKI DER of --cert, default serve.cert_path), the layout
the Chutes validator checks. Prints the quote as base64 (or JSON with a parsed summary with --json);
--out also writes the raw quote bytes to FILE. Exit 4 on a bad nonce or certificate, 5 when the
quote source is unavailable, 1 when it fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from pathlib import Path

from agent.cli import EXIT_OK, add_json_flag
from agent.config import AgentConfig
from agent.errors import BadInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nonce", required=True, metavar="HEX", help="the 32-byte nonce as 64 hex characters")
    parser.add_argument("--cert", metavar="PEM", help="certificate whose SPKI hash fills REPORTDATA[32:64] "
                        "(default: serve.cert_path)")
    parser.add_argument("--out", metavar="FILE", help="also write the raw quote bytes to FILE")
    add_json_flag(parser)


def _summary(quote: bytes) -> dict[str, object]:
    from agent.quote.kind import evidence_kind
    from agent.quote.snp_parser import parse_snp_report

    if evidence_kind(quote) == "snp":
        r = parse_snp_report(quote)
        return {
            "tee": "snp", "version": r.version, "product": r.product, "measurement": r.measurement.hex(),
            "policy": f"0x{r.policy:x}", "vmpl": r.vmpl, "signing_key": r.signing_key, "debug": r.debug,
            "reported_tcb": r.reported_tcb.hex(), "chip_id": r.chip_id.hex(), "report_data": r.report_data.hex(),
            "firmware": r.current_firmware,
        }
    from agent.quote import parse_quote

    q = parse_quote(quote)
    return {
        "tee": "tdx",
        "version": q.version, "tee_type": f"0x{q.tee_type:08x}", "quote_len": q.quote_len,
        "trailing_len": q.trailing_len, "mr_td": q.mr_td.hex(), "rtmr0": q.rtmr0.hex(), "rtmr1": q.rtmr1.hex(),
        "rtmr2": q.rtmr2.hex(), "rtmr3": q.rtmr3.hex(), "td_attributes": q.td_attributes.hex(), "debug": q.debug,
        "report_data": q.report_data.hex(),
    }


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """Errors are :class:`~agent.errors.AgentError` kinds; ``cli.main`` maps them to exit codes."""
    from agent.evidence.report_data import build_report_data
    from agent.evidence.sources import make_quote_source

    cert_path = args.cert or cfg.serve.cert_path
    try:
        cert = Path(cert_path).read_bytes()
    except OSError as exc:
        raise BadInputError(f"--cert: cannot read {cert_path}: {exc.strerror}", reason="cert_unreadable") from None
    report_data = build_report_data(args.nonce, cert)
    source = make_quote_source(cfg)
    quote = source.get_quote(report_data)
    if args.out:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(quote)
    b64 = base64.b64encode(quote).decode()
    if args.json:
        print(json.dumps({
            "quote": b64, "report_data": report_data.hex(), "source": source.name,
            "simulated": source.name == "simulated", "summary": _summary(quote),
        }, indent=2))
    elif not args.out:
        print(b64)
    return EXIT_OK
