"""Show the effective configuration (defaults < file < environment < --set).

`config initramfs-files` prints what `chutes-attest boot` under the config file (--config) reads from
the initramfs root, one `key<TAB>kind<TAB>path<TAB>hint` line each (kind: file, program or group), as
the boot sees the file: CHUTES_ATTEST_* environment and --set are ignored, as the boot ignores them.
The initramfs hook copies each from the image root or fails the build (agent.commands.initramfs_files).
"""

from __future__ import annotations

import argparse
import json

from agent.cli import add_json_flag
from agent.config import AgentConfig, to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_json_flag(parser)
    sub = parser.add_subparsers(dest="what", metavar="WHAT")
    p = sub.add_parser("initramfs-files", help="what the boot under this config reads from the initramfs root",
                       description="One key<TAB>kind<TAB>path<TAB>hint line per file, program or group the boot "
                                   "reads from the initramfs root (kinds: file, program, group).")
    p.add_argument("--config-name", metavar="TEXT",
                   help="how hints name the config file (default: the --config path)")
    add_json_flag(p)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    if getattr(args, "what", None) == "initramfs-files":
        return _initramfs_files(args)
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


def _initramfs_files(args: argparse.Namespace) -> int:
    from agent import config as config_mod
    from agent.commands.initramfs_files import required_files

    # the boot's view: the baked file alone (`boot` ignores the environment; the image gets no --set)
    cfg = config_mod.load(args.config, (), environ={})
    where = args.config_name or args.config or str(config_mod.DEFAULT_PATH)
    files = required_files(cfg, where)
    if args.json:
        print(json.dumps([vars(f) for f in files], indent=2))
    else:
        for f in files:
            print(f.line())
    return 0
