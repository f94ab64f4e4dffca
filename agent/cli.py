"""The ``chutes-attest`` command line: global flags, the subcommand registry, exit codes.

Subcommands live in :mod:`agent.commands`, one module each, and are registered in
:data:`COMMANDS` below, the only place that lists them. Each module provides
``add_arguments(parser)`` and ``run(args, cfg) -> int``; heavy imports stay inside ``run`` so
``--help`` and the boot path start fast.

Exit codes (also printed by ``--help``):
  0  success
  1  the operation failed (network, hardware, validator refusal, ...)
  2  usage or configuration error
  3  verification failed (evidence parsed but a check did not pass)
  4  malformed input (a quote, nonce or file that does not parse)
  5  a required device or source is unavailable (no TDX, no NVML, ...)
  130 interrupted
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Protocol

from agent import __version__, log
from agent import config as config_mod
from agent.errors import AgentError
from agent.exitcodes import (  # noqa: F401  (re-exported: commands import them from here)
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
)

#: name -> (module under agent.commands, one-line help). The single registry of subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "quote": ("quote", "parse, verify and fetch TDX quotes"),
    "evidence": ("evidence", "collect TDX quote + GPU evidence bound to a nonce"),
    "devices": ("devices", "list GPUs as the attestation service reports them"),
    "boot": ("boot", "attested LUKS unlock (run from the initramfs)"),
    "serve": ("serve", "serve the attestation APIs on unix sockets"),
    "doctor": ("doctor", "check this VM's attestation prerequisites"),
    "demo": ("demo", "full simulated boot + service on this machine"),
    "config": ("config_cmd", "show the effective configuration"),
    "rtmr3": ("rtmr3", "predict the RTMR3 rootfs measurement of an image root"),
    "measure": ("measure", "RTMR2/RTMR1 values TDX firmware measures for a kernel, initrd and cmdline"),
}

#: Commands whose configuration ignores CHUTES_ATTEST_* environment variables (except logging).
ENV_LOCKED_COMMANDS = frozenset({"boot"})

_EPILOG = __doc__.split("Exit codes", 1)[1].join(["Exit codes", ""]) if __doc__ else ""


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The shared ``--json`` flag: machine-readable output on stdout."""
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chutes-attest",
        description="On-node attestation agent for confidential GPU VMs (Intel TDX + NVIDIA).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chutes-attest {__version__}")
    parser.add_argument("--config", metavar="PATH", help=f"config file (default {config_mod.DEFAULT_PATH})")
    parser.add_argument(
        "--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
        help="override one config key (repeatable)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level")
    parser.add_argument("--log-format", choices=["auto", "console", "json", "journald"], help="log format")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"agent.commands.{module_name}")
        sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


class CommandModule(Protocol):
    """What every ``agent.commands.*`` module provides (see the module docstring)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, cfg: config_mod.AgentConfig) -> int: ...


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    overrides = list(args.overrides)
    if args.log_level:
        overrides.append(f"log.level={args.log_level}")
    if args.log_format:
        overrides.append(f"log.format={args.log_format}")
    environ = None
    if args.command in ENV_LOCKED_COMMANDS:
        # In an initramfs, init's environment comes from the (host-controlled) kernel command line:
        # only the baked-in config file and explicit flags may steer the boot; logging knobs excepted.
        environ = {k: v for k, v in os.environ.items() if k.startswith(config_mod.ENV_PREFIX + "LOG_")}
    module: CommandModule = args._module
    stage = "configuration error: "  # what an error means while the configuration loads
    try:
        cfg = config_mod.load(args.config, overrides, environ=environ)
        stage = ""
        log.configure(cfg.log.level, cfg.log.format)
        from agent.commands.wiring import install_simulations

        install_simulations()
        return int(module.run(args, cfg) or 0)
    except AgentError as exc:
        # The one place an error becomes an exit code: its class's (agent.errors; README, "Exit codes").
        # Commands, `serve`'s start-up included, just raise.
        print(f"chutes-attest {args.command}: {stage}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("chutes-attest: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
