"""Attested LUKS unlock, run from the initramfs (init-premount).

Reads the config volume, brings up the network, attests to the validator over mTLS, checks the
LUKS2 header, unlocks the root volume (and the cache volume), writes /run/chutes hand-off files.
On final failure prints TDX-LUKS-UNLOCK-FAILED: <reason> to the console and /dev/kmsg and powers off.
"""

from __future__ import annotations

import argparse
import os
import sys

from agent.config import AgentConfig


def _is_boot_process() -> bool:
    """True when this process was started as ``chutes-attest boot`` (not a test calling ``run`` in-process)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    return prog in ("chutes-attest", "cli.py", "__main__.py") and "boot" in sys.orig_argv[1:]


def clean_tls_environment() -> None:
    """Drop every variable that steers OpenSSL/HTTP (``SSL_CERT_FILE``, ``OPENSSL_CONF``, proxies, ...).

    In an initramfs, init's environment comes from the host-controlled kernel command line. Python's
    hashlib and the cryptography bindings read ``OPENSSL_CONF`` when they are imported, i.e. before
    any command runs, so when something was removed the boot process re-executes itself with the
    clean environment: nothing in the process that talks TLS ever saw those values.
    """
    from agent.validator.transport import scrub_tls_environment

    removed = scrub_tls_environment()
    if removed:
        print(f"chutes-attest: boot: ignoring TLS-steering environment variables: {', '.join(sorted(removed))}",
              file=sys.stderr, flush=True)
        if _is_boot_process():
            os.execve(sys.executable, sys.orig_argv, dict(os.environ))  # noqa: S606 (re-exec of ourselves)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-poweroff", action="store_true",
                        help="DEBUG: on failure, report and exit instead of powering off (never in production)")
    parser.add_argument("--force-poweroff", action="store_true",
                        help="power off on failure even when not running inside an initramfs/initrd")


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    clean_tls_environment()
    # Start the client key (RSA-4096 for the 1.4.0 VM root CA) before the flow's heavy imports: OpenSSL
    # searches for primes without the GIL while the interpreter imports aiohttp and the boot stages.
    from agent.boot import vm_ca

    keygen = vm_ca.start_boot_identity(cfg.boot.protocol)
    import asyncio

    from agent.boot.flow import default_deps, run_boot

    poweroff = cfg.boot.poweroff and not args.no_poweroff
    if not poweroff:
        print("chutes-attest: WARNING: --no-poweroff / boot.poweroff=false: a failed unlock will NOT power off "
              "this VM (debug only)", file=sys.stderr, flush=True)
    # The quote source is made by the flow's ``tee`` stage, after the network (as Chutes' next image detects
    # the TEE); a missing device or source fails closed there with the boot's marker.
    deps = default_deps(cfg)
    deps.keygen = keygen
    # SIGTERM/SIGINT end the boot like a failure: the same clean-up of what it wrote on tmpfs, the marker
    # line, power-off if configured, exit 128 + the signal number (flow._until_signal).
    outcome = asyncio.run(run_boot(cfg, deps, poweroff=poweroff, force_poweroff=args.force_poweroff,
                                   handle_signals=True))
    return outcome.exit_code
