"""Full simulated boot + service on this machine (no TDX, no GPU): the README's main job.

Runs the faithful validator for one VM generation (``--protocol``, default 1.4: VM root CA, sr25519
proofs, root rotation, provision), the emulated configfs-tsm and RTMR registers with simulated quotes,
eight emulated GPUs and real LUKS2 images; performs the boot flow; serves both sockets and prints
ready-to-paste curl commands. Ctrl-C stops everything. Needs root (loop mount of the config volume,
FUSE, cryptsetup, nginx).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from agent.cli import EXIT_USAGE
from agent.config import AgentConfig

#: Same values as agent.sim.demo.PROTOCOLS / FAIL_MODES (kept here so `--help` does not import the simulation).
PROTOCOLS = ("1.4", "1.3", "1.2")
TEES = ("tdx", "snp")
FAIL_MODES = ("none", "cipher-null", "wrong-key", "404", "401", "garbage", "root-confirm", "storage", "rtmr3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", metavar="DIR", help="where images, config and sockets go (default: new temp dir)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="1.4",
                        help="VM generation the simulated validator serves (default 1.4 = 1.4.0); the agent runs "
                             "with boot.protocol = auto and follows the answer")
    parser.add_argument("--tee", choices=TEES, default="tdx",
                        help="the simulated guest's TEE: tdx (Intel TDX, default) or snp (AMD SEV-SNP: bare reports "
                             "through configfs-tsm provider sev_guest, signed by a simulated VCEK; no RTMRs, the "
                             "rootfs list digest is checked against the manifest and left in run/sek8s/rootfs-digest)")
    parser.add_argument("--quote", choices=("emulated", "simulated"), default="emulated",
                        help="emulated = production configfs-tsm reader over the FUSE emulator (default); "
                             "simulated = the simulated source directly (TDX: --protocol 1.2 only)")
    parser.add_argument("--fail", choices=FAIL_MODES, default="none",
                        help="inject one boot failure to watch the agent fail closed: cipher-null/wrong-key (root "
                             "image), 404/401/garbage (attestation), root-confirm (1.4), storage (volume keys), "
                             "rtmr3 (a measured file changed after registration; 1.3/1.4; on SEV-SNP the rootfs "
                             "digest check fails)")
    parser.add_argument("--boot-only", action="store_true", help="stop after the boot flow")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir (default: removed on exit)")
    parser.add_argument("--once", action="store_true",
                        help="call every route once, print PASS/FAIL and exit instead of waiting for Ctrl-C")


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    import asyncio

    from agent.sim.demo import check_options, default_work_dir, run_demo

    if os.geteuid() != 0:
        print("chutes-attest demo: needs root (loop mount of the config volume, FUSE, cryptsetup)", file=sys.stderr)
        return EXIT_USAGE
    err = check_options(args.protocol, args.fail, args.quote, args.tee)
    if err is not None:
        print(f"chutes-attest demo: {err}", file=sys.stderr)
        return EXIT_USAGE
    work = Path(args.work_dir) if args.work_dir else default_work_dir()
    try:
        return asyncio.run(run_demo(work, protocol=args.protocol, quote=args.quote, fail=args.fail,
                                    boot_only=args.boot_only, once=args.once, tee=args.tee))
    except KeyboardInterrupt:
        return 0
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            print(f"demo: removed {work} (--keep keeps it)")
