"""RTMR3 rootfs chain without a TD: `rtmr3 predict --root DIR` prints the final RTMR3 an image boots with.

The measured paths come from --paths, or --measure-conf FILE, or else the image's own
<root>/etc/tdx-measure.conf (the boot.measure_conf path under --root). Same rules as the boot
step (agent.evidence.rootfs_measure): regular files only, symlinks not followed, byte-wise order, a
missing measured path is an error. --manifest FILE also checks every file against an expected-hash
manifest as the boot does; --write-manifest FILE writes that manifest for the tree. Exit 3 when a
check fails (the message starts with RTMR3-MEASURE-FAILED:).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.cli import EXIT_OK, EXIT_USAGE, EXIT_VERIFY_FAILED, add_json_flag
from agent.config import AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("predict", help="compute the final RTMR3 from a root tree",
                       description=(__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, metavar="DIR", help="the image's root filesystem (mounted)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--paths", nargs="+", metavar="PATH", help="absolute measured paths inside the root")
    src.add_argument("--measure-conf", metavar="FILE", help="measured path list (one absolute path per line)")
    p.add_argument("--manifest", metavar="FILE", help="also check every file against this expected-hash manifest")
    p.add_argument("--write-manifest", metavar="FILE", help="write the expected-hash manifest for this tree")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="hashing threads (default: 2 per CPU)")
    add_json_flag(p)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.evidence import rootfs_measure as rm

    if args.workers < 0:
        print("chutes-attest rtmr3: --workers must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(args.root):
        print(f"chutes-attest rtmr3: --root {args.root}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.paths:
            paths = [os.fsencode(p) for p in args.paths]
        else:
            conf = args.measure_conf or os.path.join(args.root, cfg.boot.measure_files()[0].lstrip("/"))
            paths = rm.read_measure_conf(conf)
        manifest = rm.read_manifest(args.manifest) if args.manifest else None
        result = rm.predict_entries(args.root, paths, manifest=manifest, workers=args.workers or None)
    except rm.RootfsMeasureError as exc:
        print(f"chutes-attest rtmr3: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if args.write_manifest:
        with open(args.write_manifest, "wb") as f:
            f.write(rm.format_manifest(result.entries))
    if args.json:
        print(json.dumps({
            "rtmr3": result.rtmr3.hex(),
            "files": result.files,
            "bytes": result.total_bytes,
            "seconds": round(result.seconds, 3),
            "manifest_checked": manifest is not None,
            "entries": [{"path": os.fsdecode(rel), "sha384": d.hex()} for rel, d in result.entries],
        }, indent=2))
    else:
        print(result.rtmr3.hex())
    return EXIT_OK
