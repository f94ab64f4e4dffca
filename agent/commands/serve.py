"""Serve the compat and chute APIs on unix sockets (systemd socket activation and Type=notify aware).

Runs until SIGTERM/SIGINT (exit 0). A start failure never reports ready; it exits with its error's code
(as every command): 2 a configuration problem, 3 a boot hand-off identity that does not verify, 5 a socket
that cannot be bound, a service certificate that cannot be read or used, or a failed self-check quote.
"""

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
