"""Attested LUKS unlock, run from the initramfs (init-premount).

Reads the config volume, brings up the network, attests to the validator over mTLS, checks the
LUKS2 header, unlocks the root volume (and the cache volume), writes /run/chutes hand-off files.
On final failure prints TDX-LUKS-UNLOCK-FAILED: <reason> to the console and /dev/kmsg and powers off.
"""

from __future__ import annotations

import argparse
import sys

from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-poweroff", action="store_true",
                        help="DEBUG: on failure, report and exit instead of powering off (never in production)")
    parser.add_argument("--force-poweroff", action="store_true",
                        help="power off on failure even when not running inside an initramfs/initrd")


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    import asyncio

    from agent.boot.flow import default_deps, run_boot
    from agent.cli import EXIT_UNAVAILABLE
    from agent.evidence.base import QuoteSourceError
    from agent.evidence.sources import make_quote_source

    poweroff = cfg.boot.poweroff and not args.no_poweroff
    if not poweroff:
        print("chutes-attest: WARNING: --no-poweroff / boot.poweroff=false: a failed unlock will NOT power off "
              "this VM (debug only)", file=sys.stderr, flush=True)
    try:
        source = make_quote_source(cfg)
    except (QuoteSourceError, ValueError, OSError) as exc:
        from agent.boot.failure import announce, power_off

        announce(f"quote: source unavailable: {exc}", cfg.boot.kmsg_path)
        if poweroff:
            power_off(args.force_poweroff)
        return EXIT_UNAVAILABLE
    outcome = asyncio.run(run_boot(cfg, default_deps(cfg, source), poweroff=poweroff,
                                   force_poweroff=args.force_poweroff))
    return outcome.exit_code
