"""Show the effective configuration (defaults < file < environment < --set).

The text form is a complete configuration file: every key with its value, each under its documentation
comment (taken from the ``#:`` lines in agent/config.py) and each table under its description, so the
output can be kept as /etc/chutes-attest/agent.toml and read back unchanged.

`config initramfs-files` prints what `chutes-attest boot` under the config file (--config) reads from
the initramfs root, one `key<TAB>kind<TAB>path<TAB>hint` line each (kind: file, program or group), as
the boot sees the file: CHUTES_ATTEST_* environment and --set are ignored, as the boot ignores them.
The initramfs hook copies each from the image root or fails the build (agent.commands.initramfs_files).
"""

from __future__ import annotations

import argparse
import json

from agent.cli import add_json_flag
from agent.config import AgentConfig, key_docs, to_dict


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
    if args.json:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    print(conffile(cfg), end="")
    return 0


def _comment(text: str, prefix: str = "# ") -> list[str]:
    return [f"{prefix}{line}".rstrip() for line in text.splitlines()]


def conffile(cfg: AgentConfig, *, commented_out: bool = False) -> str:
    """``cfg`` as a TOML configuration file, every key under its documentation comment; with
    ``commented_out`` the tables and keys themselves are comments too (a packaged example file)."""
    docs = key_docs()
    off = "#" if commented_out else ""
    out: list[str] = []
    for section, values in to_dict(cfg).items():
        section_doc = (type(getattr(cfg, section)).__doc__ or "").strip().split("\n\n", 1)[0]
        out += _comment(" ".join(section_doc.split()))
        out.append(f"{off}[{section}]")
        for key, value in values.items():
            out += _comment(docs.get(f"{section}.{key}", ""))
            # JSON scalars and lists of them are TOML too (strings, integers, floats, true/false)
            out.append(f"{off}{key} = {json.dumps(value, ensure_ascii=False)}")
        out.append("")
    return "\n".join(out) + "\n"


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
