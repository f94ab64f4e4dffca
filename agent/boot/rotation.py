"""1.4.0 root passphrase rotation and the first-boot token (reference §4.3 steps 3, 5, 6; §5).

Order, and why it can never leave a disk that neither key opens:

1. OLD = every keyslot number now in use (empty → fail closed: nothing proves the header is sane).
2. ``luksAddKey root_next`` authorised by the current key. Until this commits, only the old key
   opens the disk; after it, both do. Failure → fail closed (both or old opens).
3. ``await confirm()`` (the signed ``/provision/confirm``; the boot flow owns the HTTP and reads the
   answer into a :class:`~agent.boot.confirm.ConfirmAnswer`, see :mod:`agent.boot.confirm`).
4. The validator's confirmation says ``volumes.root.result == "promoted"``: ``luksKillSlot`` each OLD
   slot authorised by ``root_next``. cryptsetup only accepts an authorising key that opens a slot
   *other* than the one being killed, so the root_next slot always survives. Any failure → fail
   closed (new key opens, maybe old too). A bare 200 (an HTML page, JSON without the per-volume
   ``result``, a result other than ``promoted``) is *not* this: see 6.
5. A refusal the validator stated (4xx with its JSON detail): ``luksRemoveKey root_next`` (refused by
   the wrapper if it were the last slot), so the disk is back on the old key the validator still
   holds. Failure → fail closed. Then ``boot.root_confirm_failure``: ``"continue"`` boots on the old
   key (the sek8s code), ``"poweroff"`` fails closed (the 1.4.0 changelog) — the default, per "where
   code and changelog disagree, fail closed".
6. Anything else (confirm raised — timeout, cut connection, 5xx such as a gateway's 502, a 4xx that
   is not the validator's, signing failure — or an answer that proves no promotion): the outcome at
   the validator is unknown; it may have promoted root_next or not. Both keys stay in place (whichever
   the validator now holds opens the disk next boot; the next rotation kills the stale slot by number)
   and the boot fails closed. (sek8s treats every non-200, "000" included, as a refusal and removes
   root_next: if the validator had committed, no key it holds opens the disk any more.)

The caller owns and wipes both secrets; nothing here logs, stores or copies them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.boot.confirm import ConfirmAnswer
from agent.boot.cryptsetup import FIRST_BOOT_TOKEN, Cryptsetup, CryptsetupError, Kdf
from agent.errors import AgentError
from agent.log import Secret, get_logger

log = get_logger(__name__)

CONFIRM_FAILURE_CHOICES = ("continue", "poweroff")
#: Fail closed where the code (continue) and the 1.4.0 changelog (power off) disagree.
DEFAULT_CONFIRM_FAILURE = "poweroff"

#: The signed root confirm: what the answer proves; raises when it proves nothing (outcome unknown).
ConfirmFn = Callable[[], Awaitable[ConfirmAnswer]]
ROOT_VOLUME = "root"


class RotationError(AgentError):
    """Root rotation cannot go on safely: the boot must fail closed (``TDX-LUKS-UNLOCK-FAILED``).

    ``step`` names where (keyslots, add_key, confirm, kill_slot, remove_key); ``keys`` says which keys
    open the disk now ("old", "new", "old+new"), for the operator and the tests; ``detail`` the reason text.
    """

    reason = "root_rotation"

    def __init__(self, step: str, reason: str, keys: str) -> None:
        super().__init__(f"root rotation, {step}: {reason} (disk opens with: {keys} key)")
        self.step = step
        self.detail = reason
        self.keys = keys


@dataclass
class RootRotation:
    """What a rotation that did not fail closed did."""

    old_slots: list[int]
    confirmed: bool
    #: "new" (rotated: only root_next opens the disk) or "old" (confirm refused, root_next removed).
    active_key: str
    killed: list[int] = field(default_factory=list)


def is_first_boot(cs: Cryptsetup, device: str) -> bool:
    """``first_boot`` for the boot request: LUKS2 token 15 exists on the root device.

    Errors raise (:class:`CryptsetupError`): a wrong ``true`` makes the validator drop the stored root
    key, a wrong ``false`` on a fresh image would ask for a key that does not exist.
    """
    return cs.token_exists(device, FIRST_BOOT_TOKEN)


def clear_first_boot(cs: Cryptsetup, device: str) -> bool:
    """Remove token 15 after a successful open; errors are logged and ignored (as sek8s does).

    Returns True when the token was removed. A token that stays only makes the next boot claim
    ``first_boot`` again, which the validator answers with the build passphrase that no longer opens
    the rotated disk: a fail-closed boot, not a leak.
    """
    try:
        cs.token_remove(device, FIRST_BOOT_TOKEN)
    except CryptsetupError as exc:
        log.warning("boot.first_boot_token_remove_failed", device=device, error=str(exc))
        return False
    log.info("boot.first_boot_token_removed", device=device)
    return True


async def rotate_root(
    cs: Cryptsetup, device: str, key: Secret, root_next: Secret, confirm: ConfirmFn, *,
    on_confirm_failure: str = DEFAULT_CONFIRM_FAILURE, kdf: Kdf | None = None,
) -> RootRotation:
    """Rotate the root volume from ``key`` to ``root_next`` (see the module docstring for the order).

    ``confirm`` sends the signed root confirm and returns what its answer proves (a stated refusal or
    the validator's per-volume results); it raises when the outcome is unknown. Only a proven
    ``promoted`` kills the old slots, only a stated refusal removes ``root_next``; anything else keeps
    both. Raises :class:`RotationError` to fail closed.
    """
    if on_confirm_failure not in CONFIRM_FAILURE_CHOICES:
        raise ValueError(f"on_confirm_failure must be one of {CONFIRM_FAILURE_CHOICES}, got {on_confirm_failure!r}")
    if not len(root_next):
        raise RotationError("add_key", "root_next is empty", "old")
    try:
        old = await asyncio.to_thread(cs.keyslots, device)
    except CryptsetupError as exc:
        raise RotationError("keyslots", f"cannot list keyslots ({exc})", "old") from None
    if not old:
        raise RotationError("keyslots", "the header lists no keyslots", "old")
    log.info("boot.root_rotation", step="old_slots", slots=old)

    try:
        await asyncio.to_thread(cs.add_key, device, key, root_next, kdf=kdf)
    except CryptsetupError as exc:
        raise RotationError("add_key", f"luksAddKey root_next failed ({exc})", "old") from None
    log.info("boot.root_rotation", step="added")

    try:
        answer = await confirm()
    except Exception as exc:
        raise RotationError("confirm", f"no proven answer to the root confirm ({type(exc).__name__}: {exc}); "
                                       "outcome unknown, both keyslots kept", "old+new") from None

    if answer.promoted(ROOT_VOLUME):
        killed: list[int] = []
        for slot in old:
            try:
                await asyncio.to_thread(cs.kill_slot, device, slot, root_next)
            except CryptsetupError as exc:
                remaining = [s for s in old if s not in killed]
                raise RotationError("kill_slot", f"luksKillSlot {slot} failed ({exc}); killed {killed}",
                                    f"new (+ old slots {remaining})") from None
            killed.append(slot)
        log.info("boot.root_rotation", step="rotated", killed=killed)
        return RootRotation(old, True, "new", killed)
    if not answer.refused:
        log.warning("boot.root_rotation", step="unproven", result=answer.result(ROOT_VOLUME))
        raise RotationError("confirm", f"the root confirm answer proves no promotion (root result: "
                                       f"{answer.result(ROOT_VOLUME)}); outcome unknown, both keyslots kept",
                            "old+new")

    try:
        await asyncio.to_thread(cs.remove_key, device, root_next)
    except CryptsetupError as exc:
        raise RotationError("remove_key", f"root confirm refused, then luksRemoveKey root_next failed ({exc})",
                            "old+new") from None
    log.warning("boot.root_rotation", step="reverted", on_confirm_failure=on_confirm_failure, refusal=answer.detail)
    if on_confirm_failure == "poweroff":
        raise RotationError("confirm", f"the validator refused the root confirm ({answer.detail}); root_next "
                                       "removed (boot.root_confirm_failure = poweroff)", "old")
    return RootRotation(old, False, "old")
