"""Root volume: private header copy → policy check → open (or ``--test-passphrase``) with that copy.

Its own module so the flow reads as stages and the generations can share it: the header policy
(data window, first-boot token 15 on 1.4.0 images) comes from configuration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.failure import BootFailure
from agent.boot.luks_header import HeaderSummary, LuksHeaderError
from agent.boot.stages import StageTimer
from agent.boot.volumes import private_header_copy, validate_header_copy
from agent.config import BootConfig
from agent.exitcodes import EXIT_VERIFY_FAILED
from agent.log import Secret


def header_dict(h: HeaderSummary | None) -> dict[str, Any] | None:
    """The non-secret header summary for boot-status.json."""
    if h is None:
        return None
    return {"uuid": h.uuid, "label": h.label, "cipher": h.cipher, "sector_size": h.sector_size,
            "key_size": h.key_size, "keyslots": h.keyslots, "metadata_sha256": h.json_sha256}


async def unlock_root(b: BootConfig, cs: Cryptsetup, timer: StageTimer, status: dict[str, Any], key: Secret, *,
                      allow_first_boot_token: bool = False) -> HeaderSummary:
    """Check the header, then open the root volume with exactly the validated copy."""
    action = b.unlock_action
    try:
        with private_header_copy(cs, b.root_device, b.header_dir) as hdr:
            with timer.stage("luks_header") as st:
                summary = validate_header_copy(cs, hdr, data_offset=b.luks_data_offset,
                                               allow_first_boot_token=allow_first_boot_token)
                status["root_header"] = header_dict(summary)
                st.detail = (f"LUKS2 {summary.cipher} key {summary.key_size * 8} bits, "
                             f"{len(summary.keyslots)} keyslot(s)")
            with timer.stage("unlock") as st:
                await asyncio.to_thread(cs.open, b.root_device, b.root_mapper, key, header=hdr,
                                        test_only=(action == "test-passphrase"))
                st.detail = (f"passphrase confirmed (--test-passphrase) for {b.root_device}"
                             if action == "test-passphrase" else f"{b.root_device} → /dev/mapper/{b.root_mapper}")
    except LuksHeaderError as exc:
        raise BootFailure("luks_header", f"root volume header refused: {exc}", EXIT_VERIFY_FAILED) from None
    except CryptsetupError as exc:
        what = "the validator's key does not open the root volume" if exc.wrong_key else "unlock failed"
        raise BootFailure("unlock", f"{what} ({exc})") from None
    status["unlocked"] = {"root": b.root_device, "action": action}
    return summary
