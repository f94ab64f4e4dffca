"""The VM suite's stand-in for Chutes' image pipeline (1.4.0): expected-hash manifest and RTMR3 of a root tree.

Independent of the agent on purpose (stdlib only, run as a separate script with the system python3): the
files it writes are what an image build would bake into the initramfs, and the value it prints is what
the validator would register; the agent's own reading of them is what the VM tests check. The rules are
chutes-vm-generations.md §12 (1.4.0):

- conf: everything from the first ``#`` dropped, then spaces (only spaces) trimmed, empty lines skipped;
- an entry that does not exist contributes nothing; a directory, every regular file under it (like
  ``find DIR -type f``: symlinks inside neither followed nor measured; a directory entry that is itself
  a symlink yields nothing, as find without -H); a file entry, ``[ -f ]`` (follows a symlink: measured
  under the entry's own path with the target's content);
- manifest: the conf walked line by line, one ``<absolute-path> <sha384hex>`` line per file reached
  (a file reached twice is listed twice), ``#`` comment lines;
- RTMR3: every file reached, sorted byte-wise WITHOUT de-duplication, one extension each with the SHA-384
  of its content: RTMR3 = SHA-384(RTMR3 ‖ d), from 48 zero bytes.

Usage: chutes_rootfs_manifest.py --root DIR --conf FILE --manifest OUT --rtmr3 OUT
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys


def conf_entries(text: bytes) -> list[bytes]:
    out = []
    for line in text.split(b"\n"):
        entry = line.split(b"#", 1)[0].strip(b" ")
        if entry:
            out.append(entry)
    return out


def reached(root: bytes, entry: bytes) -> list[bytes]:
    """Root-relative paths (with a leading /) the entry contributes, in find's (here: sorted) order."""
    full = root + entry
    if os.path.isfile(full):  # [ -f ]
        return [entry]
    if not os.path.isdir(full) or os.path.islink(full):
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(full):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p[len(root):])
    return out


def sha384_file(path: bytes) -> bytes:
    h = hashlib.sha384()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--conf", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--rtmr3", required=True)
    args = ap.parse_args()
    root = os.fsencode(os.path.abspath(args.root)).rstrip(b"/")
    with open(args.conf, "rb") as fh:
        entries = conf_entries(fh.read())
    digests: dict[bytes, bytes] = {}
    lines = [b"# expected SHA-384 of every file the measured-path list reaches, in list order",
             b"# (generated over the final image; a file reached by two entries is listed twice)"]
    walked: list[bytes] = []
    for entry in entries:
        for rel in reached(root, entry):
            if rel not in digests:
                digests[rel] = sha384_file(root + rel)
            walked.append(rel)
            lines.append(rel + b" " + digests[rel].hex().encode())
    with open(args.manifest, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    rtmr3 = bytes(48)
    for rel in sorted(walked):  # byte-wise, duplicates kept
        rtmr3 = hashlib.sha384(rtmr3 + digests[rel]).digest()
    with open(args.rtmr3, "w") as fh:
        fh.write(rtmr3.hex())
    absent = [e for e in entries if not reached(root, e)]
    print(f"{len(walked)} extensions ({len(set(walked))} distinct files), {len(absent)} entries reaching nothing: "
          f"{b' '.join(absent).decode(errors='replace')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
