"""The rootfs measurement without a TD: `rtmr3 predict --root DIR` prints the RTMR3 an image boots with.

The measured paths come from --paths, or --measure-conf FILE, or else the image's own list under
--root (boot.measure_conf, or the scheme's name: /etc/tdx-measure.conf on 1.4, /etc/tee-measure.conf
on next). --scheme 1.4|next picks how the value is formed (default: boot.rtmr3_scheme): Chutes' rules
(chutes-vm-generations.md §12): paths that do not exist contribute nothing, regular files only,
symlinks inside directories not followed, byte-wise order, duplicates kept on 1.4 and removed on next.
--manifest FILE checks every file it names first, as the boot does; --write-manifest FILE writes the
manifest the way Chutes' image build does (path first). --list prints the list text instead of the
value: on next exactly the bytes whose SHA-384 RTMR3 is extended with, so a third party can diff it
against Chutes' walker. Exit 3 when a check fails (the message starts with the scheme's marker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.cli import EXIT_OK, EXIT_USAGE, EXIT_VERIFY_FAILED, add_json_flag
from agent.config import RTMR3_SCHEME_FILES, AgentConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("predict", help="compute the final RTMR3 from a root tree",
                       description=(__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, metavar="DIR", help="the image's root filesystem (mounted)")
    p.add_argument("--scheme", choices=sorted(RTMR3_SCHEME_FILES), default=None,
                   help="1.4 (one extension per file) or next (one over the list text); default boot.rtmr3_scheme")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--paths", nargs="+", metavar="PATH", help="absolute measured paths inside the root")
    src.add_argument("--measure-conf", metavar="FILE", help="measured-path list (one path per line)")
    p.add_argument("--manifest", metavar="FILE", help="also check every file it names against this manifest")
    p.add_argument("--write-manifest", metavar="FILE", help="write the manifest for this tree (path first)")
    p.add_argument("--list", action="store_true", help="print the list text (<sha384> <path> per file) instead")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="hashing workers (default: one per CPU)")
    add_json_flag(p)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    from agent.evidence import rootfs_measure as rm

    scheme = args.scheme or cfg.boot.rtmr3_scheme
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
            default_conf = cfg.boot.measure_conf or RTMR3_SCHEME_FILES[scheme][0]
            conf = args.measure_conf or os.path.join(args.root, default_conf.lstrip("/"))
            paths = rm.read_measure_conf(conf, scheme)
        manifest = rm.read_manifest(args.manifest, scheme) if args.manifest else None
        result = rm.predict_entries(args.root, paths, scheme=scheme, manifest=manifest,
                                    workers=args.workers or None)
    except rm.RootfsMeasureError as exc:
        print(f"chutes-attest rtmr3: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    if args.write_manifest:
        with open(args.write_manifest, "wb") as f:
            f.write(rm.format_manifest(result))
    if args.list:
        sys.stdout.flush()
        sys.stdout.buffer.write(rm.list_text(result.entries))
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.json:
        print(json.dumps({
            "rtmr3": result.rtmr3.hex(),
            "scheme": scheme,
            "files": result.files,
            "extensions": len(result.extensions()),
            "bytes": result.total_bytes,
            "seconds": round(result.seconds, 3),
            "absent": [os.fsdecode(p) for p in result.absent],
            "manifest_checked": manifest is not None,
            "unchecked": result.unchecked,
            "entries": [{"path": os.fsdecode(rel), "sha384": d.hex()} for rel, d in result.entries],
        }, indent=2))
    else:
        print(result.rtmr3.hex())
    return EXIT_OK
