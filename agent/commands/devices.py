"""List the GPUs as the attestation service's ``/devices`` endpoint reports them (``DeviceInfo``).

Fields: uuid (no GPU- prefix, no hyphens), name, memory (bytes), major/minor (CUDA compute
capability), clock_rate (max graphics clock in MHz x 1000), ecc, model_short_ref.
--gpu-ids filters by UUID (GPU-... or bare, comma lists or repeats). Exit 4 for a malformed or
unknown id, 5 when NVML is unavailable or GPU support is disabled, 1 for other NVML failures.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, add_json_flag
from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-ids", action="append", metavar="IDS",
                        help="only these GPUs (GPU-… or bare UUIDs; comma list; repeatable)")
    add_json_flag(parser)


def _err(msg: str) -> None:
    print(f"chutes-attest devices: {msg}", file=sys.stderr)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    import asyncio

    from agent.config import ConfigError
    from agent.evidence.base import GpuEvidenceError
    from agent.evidence.device_info import GpuIdError, parse_gpu_ids
    from agent.evidence.gpu_sources import make_gpu_source
    from agent.evidence.nvml_gpu import GpuUnavailableError

    try:
        wanted = parse_gpu_ids(args.gpu_ids)
    except GpuIdError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    try:
        source = make_gpu_source(cfg)
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return EXIT_USAGE
    if source is None:
        _err("GPU support is disabled (gpu.enabled = false)")
        return EXIT_UNAVAILABLE
    try:
        devices = asyncio.run(source.devices(wanted))
    except GpuIdError as exc:
        _err(str(exc))
        return EXIT_BAD_INPUT
    except GpuUnavailableError as exc:
        _err(str(exc))
        return EXIT_UNAVAILABLE
    except GpuEvidenceError as exc:
        _err(str(exc))
        return EXIT_FAILED
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
