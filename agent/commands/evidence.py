"""Collect a TDX quote and GPU evidence bound to a nonce, exactly as ``GET /v1/evidence`` does.

REPORTDATA = nonce (32 bytes) ‖ SHA-256(SPKI of the service identity: the boot's CA-signed leaf on 1.4.0+,
else the self-signed certificate); the GPU evidence carries the same nonce. Prints the /v1/evidence
document with ``--json``, a short summary otherwise.
"""

from __future__ import annotations

import argparse

from agent.cli import EXIT_OK, add_json_flag
from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nonce", required=True, metavar="HEX", help="64 hex characters (32 bytes)")
    parser.add_argument("--gpu-ids", action="append", default=[], metavar="IDS",
                        help="GPU UUIDs (GPU-… or bare), repeatable and/or comma-separated; default all")
    add_json_flag(parser)


async def _collect(cfg: AgentConfig, nonce: bytes, gpu_ids: list[str] | None) -> dict:
    from agent.evidence.collector import Collector
    from agent.evidence.gpu_sources import make_gpu_source
    from agent.evidence.quote_queue import QuoteQueue
    from agent.evidence.service_identity import load_identity
    from agent.evidence.sources import make_quote_source

    cert = load_identity(cfg.serve)  # the same identity serve binds (hand-off leaf on 1.4.0+)
    queue = QuoteQueue(make_quote_source(cfg), max_len=cfg.quote.queue_max, default_deadline_s=cfg.quote.deadline_s)
    try:
        return await Collector(cfg, cert, queue, make_gpu_source(cfg)).evidence(nonce, gpu_ids, caller="cli")
    finally:
        await queue.aclose()


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """Errors are :class:`~agent.errors.AgentError` kinds; ``cli.main`` maps them to exit codes."""
    import asyncio
    import json

    from agent.evidence.device_info import parse_gpu_ids
    from agent.evidence.report_data import parse_nonce

    nonce = parse_nonce(args.nonce)
    gpu_ids = parse_gpu_ids(args.gpu_ids) if args.gpu_ids else None
    doc = asyncio.run(_collect(cfg, nonce, gpu_ids))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"nonce        {doc['nonce']}")
        print(f"report_data  {doc['report_data']}")
        print(f"quote        v{doc['quote_version']}, {len(doc['quote'])} base64 chars")
        print(f"gpu evidence {len(doc['gpu_evidence'])} item(s)")
        print(f"tpm          {'present' if doc['tpm'] else 'none'}")
    return EXIT_OK
