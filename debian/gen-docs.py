"""Generate, from the agent's own code, the example /etc/chutes-attest/agent.toml and chutes-attest(8).

The man page is the CLI's argparse help (top level and every subcommand, recursively) set in groff; the
example config is every key with its default value, commented out. Run with the packaged interpreter
(debian/rules) so the text matches the code that ships.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent import __version__, cli
from agent import config as config_mod

CONFIG_HEADER = """\
# chutes-attest configuration (see chutes-attest(8) and /usr/share/doc/chutes-attest/README.md.gz).
# Every key is listed with its default, commented out; uncomment what you change. Precedence:
# defaults < this file < CHUTES_ATTEST_<SECTION>_<KEY> environment < --set section.key=value.
# `chutes-attest config` prints the effective result. This file is a dpkg conffile: your edits are
# kept on upgrade and on `apt remove`, and deleted only by `apt purge`.
"""


def example_config() -> str:
    """Every table and key, commented out, each under its documentation comment from agent/config.py."""
    from agent.commands.config_cmd import conffile

    cfg = config_mod.load(os.devnull, [], environ={})
    return CONFIG_HEADER + "\n" + conffile(cfg, commented_out=True)


def _esc(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*path, name])


def man_page(date: str) -> str:
    parser = cli.build_parser()
    head = [
        f'.TH CHUTES-ATTEST 8 "{date}" "chutes-attest {__version__}" "System Administration"',
        ".SH NAME",
        "chutes-attest \\- " + _esc(parser.description or "attestation agent"),
        ".SH SYNOPSIS",
        ".B chutes-attest",
        "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        "This page is generated from the command's own \\fB\\-\\-help\\fR output.",
        "The boot unlock runs from the initramfs (see /usr/share/doc/chutes-attest/README.initramfs.md);",
        "the service runs as chutes-attest.service, started by chutes-attest.socket.",
    ]
    for path, sub in _walk(parser, ["chutes-attest"]):
        title = " ".join(path)
        head += [".SH " + ("USAGE" if len(path) == 1 else _esc(title.upper())), ".nf", _esc(sub.format_help()), ".fi"]
    head += [
        ".SH FILES",
        ".TP\n/etc/chutes-attest/agent.toml\nconfiguration (conffile)",
        ".TP\n/etc/initramfs-tools/chutes-attest.conf\nenables and configures the initramfs hook",
        ".TP\n/usr/lib/chutes-attest\nthe private interpreter environment with the locked dependencies",
        ".SH SEE ALSO",
        "systemctl(1), update-initramfs(8), cryptsetup(8)",
    ]
    return "\n".join(head) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--config", type=Path, required=True, help="write the example agent.toml here")
    ap.add_argument("--man", type=Path, required=True, help="write chutes-attest.8 here")
    ap.add_argument("--date", required=True, help="date for the man page header (from SOURCE_DATE_EPOCH)")
    args = ap.parse_args()
    os.environ["COLUMNS"] = "80"  # argparse wraps help to the terminal width: fixed for reproducible output
    args.config.write_text(example_config())
    args.man.write_text(man_page(args.date))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
