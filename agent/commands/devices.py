"""List the GPUs as the attestation service's ``/devices`` endpoint reports them (``DeviceInfo``).

Fields: uuid (no GPU- prefix, no hyphens), name, memory (bytes), major/minor (CUDA compute
capability), clock_rate (max graphics clock in MHz x 1000), ecc, model_short_ref.
--gpu-ids filters by UUID (GPU-... or bare, comma lists or repeats). Exit 4 for a malformed or
unknown id, 5 when NVML is unavailable or GPU support is disabled, 1 for other NVML failures.
"""

from __future__ import annotations

import argparse
import json

from agent.cli import EXIT_OK, add_json_flag
from agent.config import AgentConfig
from agent.errors import UnavailableError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-ids", action="append", metavar="IDS",
                        help="only these GPUs (GPU-… or bare UUIDs; comma list; repeatable)")
    add_json_flag(parser)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """Errors are :class:`~agent.errors.AgentError` kinds; ``cli.main`` maps them to exit codes."""
    import asyncio

    from agent.evidence.device_info import parse_gpu_ids
    from agent.evidence.gpu_sources import make_gpu_source

    wanted = parse_gpu_ids(args.gpu_ids)
    source = make_gpu_source(cfg)
    if source is None:
        raise UnavailableError("GPU support is disabled (gpu.enabled = false)", reason="gpu_disabled")
    try:
        devices = asyncio.run(source.devices(wanted))
    finally:
        close = getattr(source, "close", None)
        if close:
            close()
    if args.json:
        print(json.dumps(devices))
        return EXIT_OK
    print(f"{'UUID':32}  {'NAME':24}  {'MEMORY':>10}  CC    {'CLOCK_RATE':>11}  ECC  MODEL")
    for d in devices:
        print(f"{d['uuid']:32}  {d['name'][:24]:24}  {d['memory'] / 2**30:7.1f}GiB  {d['major']}.{d['minor']:<3}"
              f" {d['clock_rate']:11.1f}  {'on ' if d['ecc'] else 'off'}  {d['model_short_ref']}")
    return EXIT_OK
