"""Parse, verify and fetch TDX quotes (``quote parse``, ``quote get``)."""

from __future__ import annotations

import argparse

from agent.commands import quote_get, quote_parse
from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="quote_command", metavar="ACTION", required=True)
    for name, module in (("parse", quote_parse), ("get", quote_get)):
        sp = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                            description=(module.__doc__ or "").strip())
        module.add_arguments(sp)
        sp.set_defaults(_quote_module=module)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    return int(args._quote_module.run(args, cfg) or 0)
