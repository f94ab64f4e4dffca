"""Serve the compat and chute APIs on unix sockets (systemd socket activation and Type=notify aware)."""

from __future__ import annotations

import argparse

from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compat-socket", metavar="PATH", help="override serve.compat_socket")
    parser.add_argument("--chute-socket", metavar="PATH", help="override serve.chute_socket")


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    import asyncio

    from agent.serve.server import serve

    if args.compat_socket:
        cfg.serve.compat_socket = args.compat_socket
    if args.chute_socket:
        cfg.serve.chute_socket = args.chute_socket
    return asyncio.run(serve(cfg))
