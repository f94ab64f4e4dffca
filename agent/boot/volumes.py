"""Unlocking volumes: header copy → policy check → open with the validated copy; the cache volume.

The header is copied (``luksHeaderBackup``) into a private directory, checked there, and the
device is opened with ``--header <copy>``: what cryptsetup uses is exactly what was validated, even
if the host rewrites the on-disk header in between (prior-art.md, dstack's fix). The copy is
deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.boot import blockdev
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.luks_header import HeaderSummary, LuksHeaderError, validate_metadata
from agent.log import Secret

MAX_HEADER = 4 * 1024 * 1024 + 4096


@contextlib.contextmanager
def private_header_copy(cs: Cryptsetup, device: str, header_dir: str) -> Iterator[str]:
    """A header backup of ``device`` in a 0700 directory, removed on exit."""
    os.makedirs(header_dir, mode=0o700, exist_ok=True)
    os.chmod(header_dir, 0o700)
    path = os.path.join(header_dir, f"hdr-{secrets.token_hex(8)}.img")
    try:
        try:
            cs.header_backup(device, path)
        except CryptsetupError as exc:
            raise LuksHeaderError(f"cannot read a LUKS header from {device}: {exc}") from None
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def validate_header_copy(cs: Cryptsetup, header_path: str, **policy: Any) -> HeaderSummary:
    """Binary header + JSON metadata policy for the private copy (``policy``: validate_metadata keywords)."""
    with open(header_path, "rb") as fh:
        head = fh.read(MAX_HEADER)
    try:
        meta = cs.dump_json(header_path)
    except CryptsetupError as exc:
        raise LuksHeaderError(f"luksDump of the header copy failed: {exc}") from None
    return validate_metadata(meta, head, **policy)


def unlock_validated(cs: Cryptsetup, device: str, mapper: str, passphrase: Secret, header_dir: str,
                     action: str, on_validated: Callable[[HeaderSummary], None] | None = None) -> HeaderSummary:
    """Validate ``device``'s header, then open it (``action="open"``) or only test the passphrase."""
    with private_header_copy(cs, device, header_dir) as hdr:
        summary = validate_header_copy(cs, hdr)
        if on_validated is not None:
            on_validated(summary)
        cs.open(device, mapper, passphrase, header=hdr, test_only=(action == "test-passphrase"))
        return summary


@dataclass
class CacheResult:
    device: str | None
    first_boot: bool = False
    header: HeaderSummary | None = None


async def setup_cache_volume(
    cs: Cryptsetup, *, device: str, label: str, wait_s: float, mapper: str, header_dir: str, action: str,
    fetch_key: Callable[[str], Awaitable[Secret]], pbkdf: str, iterations: int, mkfs: str = "mkfs.ext4",
) -> CacheResult:
    """Unlock a ≤1.2 data volume (the containerd cache; 0.2.0-1.2 also ``storage``/``tdx-cache``),
    formatting it on first use.

    ``fetch_key("GET")`` must return the existing passphrase, ``fetch_key("PUT")`` a new one (first use).
    Which HTTP call backs it is the flow's business: the removed ``GET``/``PUT /servers/{vm}/luks`` or
    ``POST /servers/{vm}/luks`` with the boot token (``"PUT"`` = ask for this volume in ``rekey``).
    """
    dev = blockdev.resolve(device, label, wait_s)
    if dev is None:
        return CacheResult(None)
    if cs.is_luks(dev):
        key = await fetch_key("GET")
        try:
            summary = unlock_validated(cs, dev, mapper, key, header_dir, action)
        finally:
            key.wipe()
        return CacheResult(dev, False, summary)
    key = await fetch_key("PUT")
    try:
        cs.luks_format(dev, key, label=label, pbkdf=pbkdf, iterations=iterations)
        summary = unlock_validated(cs, dev, mapper, key, header_dir, action)
    finally:
        key.wipe()
    if action == "open":
        _mkfs(mkfs, f"/dev/mapper/{mapper}", label)
    return CacheResult(dev, True, summary)


def _mkfs(tool: str, path: str, label: str) -> None:
    proc = subprocess.run([tool, "-L", label, path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CryptsetupError(os.path.basename(tool), proc.returncode, proc.stderr)
