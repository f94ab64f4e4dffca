"""Show the effective configuration (defaults < file < environment < --set)."""

from __future__ import annotations

import argparse
import json

from agent.cli import add_json_flag
from agent.config import AgentConfig, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    data = to_dict(cfg)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section, values in data.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}")
        print()
    return 0
