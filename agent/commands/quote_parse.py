"""Placeholder: implemented by its issue."""

from __future__ import annotations

import argparse
import sys

from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    print("chutes-attest: 'quote parse' is not implemented yet", file=sys.stderr)
    return 1
