"""Storage volumes of the newer generations: ``storage`` and ``tdx-cache`` (reference §4.2 steps 5-6,
§4.3 steps 8-9, §5).

The boot flow (its owner does the HTTP) fetches ``{"volumes": {label: {"current", "next"}},
"confirm_nonce", "k3s_encryption_key"}`` from ``/luks/attest`` (1.3.x) or ``/provision`` (1.4.0) and
hands the keys here. Per volume, in order:

1. **Find** the device: an explicit path (tests, images), else ``blkid`` ``LABEL=<label>``, else a
   block device that ``isLuks`` and whose LUKS2 label is ``<label>``. None → ``STORAGE-SETUP-FAILED``.
2. **Key**: ``current``; when ``current`` is null, ``next`` is the key and there is no rotation.
3. **LUKS** → header policy on a private copy, open (or ``--test-passphrase``) as ``<label>``.
   **Not LUKS** (first use) → ``wipefs -a``, zero 10 MiB, ``luksFormat --type luks2 --label <label>``,
   open, ``mkfs.xfs -L <label>`` (only when really opened), ``rotated = true`` when the key was ``next``
   (``current`` null). A raw volume for which the validator still holds ``current`` is formatted with
   ``current`` and reports ``rotated = true`` only if ``next`` is then added (sek8s marks it rotated
   regardless, so a failed add makes its validator promote a key no slot holds). (sek8s also runs
   ``cryptsetup erase`` here; after the zeroing there is no LUKS header left for it to erase, so it is
   not run.) ``isLuks`` errors other than "not LUKS" fail: they must never lead to a re-format.
4. ``storage`` only, only with a real mapping: mount it, delete ``rancher-config/k3s.yaml``; if the
   file survives, extend RTMR3 with its SHA-384 and fail.
5. **Rotation** (only with ``next`` and a confirm nonce): 1.4.0 records the keyslots in use, then
   ``luksAddKey next``; a failure is not fatal (``rotated = false``). 1.3.x the same without the slot list.

Then the confirm body ``{"volumes": {label: {"rotated": b}}}`` goes to the validator (callback, which
reads the answer into a :class:`~agent.boot.confirm.ConfirmAnswer`), and :func:`finalize` cleans up the
slots, per volume, only on what the answer proves (:mod:`agent.boot.confirm`): the validator's
confirmation says ``result: "promoted"`` for the volume → 1.4.0 ``luksKillSlot`` every recorded slot
with ``next`` (fatal), 1.3.x ``luksRemoveKey current`` (non-fatal); a refusal the validator stated (4xx
with its JSON detail) → ``luksRemoveKey next`` (1.4.0 fatal, 1.3.x non-fatal). Anything else — no
answer (the callback raised: timeout, cut connection, 5xx), a 200 that is not the confirmation, a
``result`` that is missing or not ``promoted`` — the outcome at the validator is unknown, so both
keyslots stay — whichever key it now holds opens the volume — and 1.4.0 fails closed (1.3.x carries
on, as its failures are non-fatal). Any volume that had ``next`` added keeps both keys until finalize,
so a failure anywhere in between leaves every volume openable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.boot import artifacts, blockdev
from agent.boot.confirm import ConfirmAnswer
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError, Kdf
from agent.boot.luks_header import HeaderSummary, LuksHeaderError
from agent.boot.volumes import unlock_validated
from agent.config import BootConfig
from agent.errors import AgentError
from agent.log import Secret, get_logger

log = get_logger(__name__)

MARKER = "STORAGE-SETUP-FAILED"
K3S_MARKER = "K3S-ENCRYPTION-KEY-MISSING"
GENERATIONS = ("1.3", "1.4")
DEFAULT_LABELS = ("storage", "tdx-cache")
KUBECONFIG_SUBPATH = "rancher-config/k3s.yaml"

#: The confirm call: what its answer proves; raises when it proves nothing (outcome unknown).
ConfirmFn = Callable[[dict[str, object]], Awaitable[ConfirmAnswer]]
ExtendFn = Callable[[bytes], None]


class StorageError(AgentError):
    """A storage volume cannot be set up safely: fail closed with ``marker`` (default
    ``STORAGE-SETUP-FAILED``). ``str()`` is the reason; :meth:`line` the console/kmsg line."""

    reason = "storage_setup"

    def __init__(self, reason: str, volume: str | None = None, marker: str = MARKER) -> None:
        super().__init__(f"{volume}: {reason}" if volume else reason)
        self.volume = volume
        self.marker = marker

    def line(self) -> str:
        return f"{self.marker}: " + " ".join(str(self).split())


@dataclass
class VolumeKeys:
    """One volume's entry of the validator's answer. The caller owns and wipes the secrets."""

    current: Secret | None
    next: Secret | None


@dataclass
class StorageSettings:
    """Where and how (from ``boot.*`` config; tests name image files in ``devices``)."""

    labels: Sequence[str] = DEFAULT_LABELS
    #: Explicit device or image file per label; a label not listed is found by label.
    devices: Mapping[str, str] = field(default_factory=dict)
    #: "open" (map the volume, mkfs on first use, kubeconfig purge) or "test-passphrase".
    action: str = "open"
    header_dir: str = "/run/chutes-attest/luks"
    wait_s: float = 10.0
    kdf: Kdf = field(default_factory=Kdf)
    generation: str = "1.4"
    mkfs: str = "mkfs.xfs"
    fstype: str = "xfs"
    kubeconfig_volume: str = "storage"
    purge_mount: str = "/run/storage-kubeconfig-purge"
    #: Devices for the LUKS-label fallback scan (default: ``blkid -o device``).
    scan: Callable[[], list[str]] = blockdev.list_devices


@dataclass
class VolumeState:
    """One volume after :func:`prepare_volume` (and :func:`finalize`)."""

    label: str
    device: str
    mapper: str
    formatted: bool
    key: Secret
    next: Secret | None
    header: HeaderSummary | None = None
    old_slots: list[int] = field(default_factory=list)
    next_added: bool = False
    kubeconfig: str = "skipped"
    #: After finalize: rotated | reverted | unchanged | kept-both | formatted
    #: (+ " (unproven)" when the confirm did not prove the key this volume needs is the validator's)
    outcome: str = ""

    @property
    def rotated(self) -> bool:
        """What the confirm body says: the validator must keep the key the volume now needs.

        ``true`` makes the validator promote ``next``. A volume formatted with ``next`` (``current`` was
        null: ``next`` is None here) needs that; one formatted with ``current`` only once ``next`` was
        added, else the validator would drop the one key that opens it.
        """
        return self.next_added or (self.formatted and self.next is None)


@dataclass
class StorageResult:
    volumes: list[VolumeState]
    confirm_body: dict[str, object]
    #: True: the validator's confirmation proves every volume's key; False: a refusal it stated; None: no
    #: confirm sent (no nonce), or an outcome the answer does not prove (1.4.0 raises in that case).
    confirmed: bool | None


def settings_from_config(b: BootConfig, generation: str) -> StorageSettings:
    """The storage settings a boot uses (``boot.*`` keys; ``generation`` "1.3" or "1.4" from the answer)."""
    devices = {label: dev for label, dev in ((b.storage_label, b.storage_device),
                                             (b.tdx_cache_label, b.tdx_cache_device)) if dev}
    return StorageSettings(
        labels=(b.storage_label, b.tdx_cache_label), devices=devices, action=b.unlock_action,
        header_dir=b.header_dir, wait_s=b.device_wait_s, kdf=Kdf(b.format_pbkdf, b.format_pbkdf_iterations),
        generation=generation, mkfs=b.storage_mkfs, fstype=storage_fstype(b.storage_mkfs),
        kubeconfig_volume=b.storage_label,
    )


def storage_fstype(mkfs: str) -> str:
    """The filesystem ``boot.storage_mkfs`` makes (``mkfs.ext4`` → ``ext4``), which the kubeconfig purge
    mounts: a volume formatted with one tool must not be mounted as another type."""
    name = os.path.basename(mkfs)
    return name[len("mkfs."):] if name.startswith("mkfs.") and len(name) > len("mkfs.") else "xfs"


# -- discovery ------------------------------------------------------------------------------------

def discover(cs: Cryptsetup, label: str, settings: StorageSettings) -> str | None:
    """The explicit device if configured (None when missing), else by filesystem/LUKS label, else by
    scanning block devices for a LUKS2 header whose label is ``label`` (sek8s ``detect_*_device``)."""
    explicit = settings.devices.get(label, "")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    dev = blockdev.find_by_label(label, settings.wait_s)
    if dev is not None:
        if not blockdev.is_block_device(dev):
            raise StorageError(f"{dev} (label {label!r}) is not a block device", label)
        return dev
    for cand in settings.scan():
        if not blockdev.is_block_device(cand):
            continue
        try:
            if cs.is_luks(cand) and cs.label(cand) == label:
                return cand
        except CryptsetupError as exc:
            log.warning("boot.storage_scan_skip", device=cand, error=str(exc))
    return None


# -- one volume -----------------------------------------------------------------------------------

def prepare_volume(cs: Cryptsetup, label: str, keys: VolumeKeys, settings: StorageSettings, *,
                   rotate: bool, extend_rtmr3: ExtendFn | None = None) -> VolumeState:
    """Find, open or first-use format, purge (storage), and add ``next`` (steps 1-5 above)."""
    dev = discover(cs, label, settings)
    if dev is None:
        raise StorageError(f"no device labelled {label!r}", label)
    key = keys.current if keys.current is not None else keys.next
    nxt = keys.next if keys.current is not None else None
    if key is None or not len(key):
        raise StorageError("the validator sent no passphrase", label)
    mapper = label
    try:
        luks = cs.is_luks(dev)
    except CryptsetupError as exc:
        raise StorageError(f"cannot tell whether {dev} is LUKS ({exc})", label) from None
    st = VolumeState(label, dev, mapper, formatted=not luks, key=key, next=nxt)
    try:
        if luks:
            st.header = unlock_validated(cs, dev, mapper, key, settings.header_dir, settings.action)
        else:
            _first_use_format(cs, st, settings)
    except LuksHeaderError as exc:
        raise StorageError(f"header refused: {exc}", label) from None
    except CryptsetupError as exc:
        what = "the validator's key does not open it" if exc.wrong_key else "unlock failed"
        raise StorageError(f"{what} ({exc})", label) from None
    log.info("boot.storage_volume", volume=label, device=dev, formatted=st.formatted, action=settings.action)
    if label == settings.kubeconfig_volume:
        if settings.action == "open":
            st.kubeconfig = purge_kubeconfig(f"/dev/mapper/{mapper}", settings.purge_mount, settings.fstype,
                                             extend_rtmr3, volume=label)
        else:
            st.kubeconfig = "skipped (test-passphrase: nothing mounted)"
    if nxt is not None and rotate:
        _add_next(cs, st, settings)
    elif nxt is not None:
        log.warning("boot.storage_rotation_skipped", volume=label, why="no confirm nonce")
    return st


def _first_use_format(cs: Cryptsetup, st: VolumeState, settings: StorageSettings) -> None:
    log.info("boot.storage_first_use", volume=st.label, device=st.device)
    err = blockdev.wipe_signatures(st.device)
    if err:
        log.warning("boot.storage_wipefs_failed", volume=st.label, error=err)
    try:
        blockdev.zero_head(st.device)
    except blockdev.DeviceError as exc:
        raise StorageError(str(exc), st.label) from None
    try:
        cs.format_luks2(st.device, st.key, label=st.label, kdf=settings.kdf)
    except CryptsetupError as exc:
        raise StorageError(f"first-use luksFormat failed ({exc})", st.label) from None
    st.header = unlock_validated(cs, st.device, st.mapper, st.key, settings.header_dir, settings.action)
    if settings.action == "open":
        proc = subprocess.run([settings.mkfs, "-L", st.label, f"/dev/mapper/{st.mapper}"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StorageError(f"{settings.mkfs} failed: {proc.stderr.strip() or proc.returncode}", st.label)


def _add_next(cs: Cryptsetup, st: VolumeState, settings: StorageSettings) -> None:
    """Add the rotation slot; every failure here is non-fatal (``rotated: false``)."""
    assert st.next is not None
    if settings.generation == "1.4":
        try:
            st.old_slots = cs.keyslots(st.device)
        except CryptsetupError as exc:
            log.warning("boot.storage_add_key_skipped", volume=st.label, error=str(exc))
            return
        if not st.old_slots:
            log.warning("boot.storage_add_key_skipped", volume=st.label, error="no keyslots listed")
            return
    try:
        cs.add_key(st.device, st.key, st.next, kdf=settings.kdf)
    except CryptsetupError as exc:
        log.warning("boot.storage_add_key_failed", volume=st.label, error=str(exc))
        return
    st.next_added = True
    log.info("boot.storage_next_added", volume=st.label, old_slots=st.old_slots)


# -- kubeconfig purge ----------------------------------------------------------------------------

def purge_kubeconfig(device: str, mountpoint: str, fstype: str, extend_rtmr3: ExtendFn | None, *,
                     volume: str = "storage", subpath: str = KUBECONFIG_SUBPATH) -> str:
    """Delete the admin kubeconfig k3s left on the storage volume; returns "purged" or "absent".

    If it survives the delete, its SHA-384 is extended into RTMR3 (so every later quote shows it)
    and :class:`StorageError` is raised. Needs a real mount: only with ``unlock_action = "open"``.
    """
    try:
        blockdev.mount_rw(device, mountpoint, fstype)
    except blockdev.DeviceError as exc:
        raise StorageError(f"kubeconfig purge: {exc}", volume) from None
    path = os.path.join(mountpoint, subpath)
    digest: bytes | None = None
    try:
        existed = os.path.lexists(path)
        if existed:
            try:
                os.unlink(path)
            except OSError as exc:
                log.error("boot.kubeconfig_purge_failed", volume=volume, error=exc.strerror)
        if os.path.lexists(path):
            digest = _sha384_nofollow(path)
        os.sync()
    finally:
        try:
            blockdev.umount(mountpoint)
        except blockdev.DeviceError as exc:
            log.warning("boot.kubeconfig_umount_failed", error=str(exc))
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)
    if digest is None and not existed:
        return "absent"
    if digest is None:
        log.info("boot.kubeconfig_purged", volume=volume)
        return "purged"
    if extend_rtmr3 is not None:
        try:
            extend_rtmr3(digest)
        except Exception as exc:
            raise StorageError(f"admin kubeconfig survived the purge and the RTMR3 extend failed ({exc})",
                               volume) from None
    raise StorageError(f"admin kubeconfig {subpath} survived the purge (sha384 {digest.hex()} "
                       f"{'extended into RTMR3' if extend_rtmr3 else 'not measured'})", volume)


def _sha384_nofollow(path: str) -> bytes:
    h = hashlib.sha384()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return h.digest()  # a link or unreadable entry: still a non-baseline measurement
    try:
        while chunk := os.read(fd, 1 << 20):  # os.read: a directory fails here (EISDIR), not in fdopen
            h.update(chunk)
    except OSError:
        pass  # a directory or an I/O error: what was read is still a non-baseline measurement
    finally:
        os.close(fd)
    return h.digest()


# -- confirm and finalize --------------------------------------------------------------------------

def confirm_body(states: Sequence[VolumeState]) -> dict[str, object]:
    """``{"volumes": {label: {"rotated": bool}}}`` for ``luks/confirm`` / ``provision/confirm``."""
    return {"volumes": {st.label: {"rotated": st.rotated} for st in states}}


def finalize(cs: Cryptsetup, states: Sequence[VolumeState], answer: ConfirmAnswer | None,
             generation: str) -> bool | None:
    """Slot clean-up after the confirm, per volume on what ``answer`` proves (None = no proven answer).

    Returns :attr:`StorageResult.confirmed`. 1.4.0 raises :class:`StorageError` when the answer leaves
    any volume's key unproven (its slots are kept as they are).
    """
    unproven: list[str] = []
    for st in states:
        got = "no answer" if answer is None else answer.result(st.label)
        if not st.next_added:
            st.outcome = "formatted" if st.formatted else "unchanged"
            # Nothing to clean up; but the validator must hold the key the volume opens with now:
            # ``next`` for one formatted with it (rotated: true), ``current`` otherwise (rotated: false).
            if answer is not None and not answer.refused and (got == "promoted") != st.rotated:
                st.outcome += " (unproven)"
                unproven.append(f"{st.label} (sent rotated={str(st.rotated).lower()}, result {got})")
                log.warning("boot.storage_confirm_mismatch", volume=st.label, rotated=st.rotated, result=got)
            continue
        assert st.next is not None
        if answer is None or not (answer.refused or answer.promoted(st.label)):
            st.outcome = "kept-both"
            unproven.append(f"{st.label} (result {got})")
            log.warning("boot.storage_confirm_unknown", volume=st.label, result=got, action="kept both keyslots")
            continue
        if generation == "1.4":
            _finalize_14(cs, st, answer.promoted(st.label))
        else:
            _finalize_13(cs, st, answer.promoted(st.label))
    if unproven and generation == "1.4":
        what = ("no answer to the storage confirm" if answer is None
                else "the storage confirm answer does not prove which key the validator holds")
        raise StorageError(f"{what}: {', '.join(unproven)}; keyslots kept as they are (both keys where next "
                           "was added)")
    if answer is None or unproven:
        return None
    return not answer.refused


def _finalize_14(cs: Cryptsetup, st: VolumeState, confirmed: bool) -> None:
    assert st.next is not None
    if confirmed:
        for slot in st.old_slots:
            try:
                cs.kill_slot(st.device, slot, st.next)
            except CryptsetupError as exc:
                raise StorageError(f"key slot clean-up failed at slot {slot} ({exc})", st.label) from None
        st.outcome = "rotated"
    else:
        try:
            cs.remove_key(st.device, st.next)
        except CryptsetupError as exc:
            raise StorageError(f"key slot rollback failed ({exc})", st.label) from None
        st.outcome = "reverted"
    log.info("boot.storage_finalized", volume=st.label, outcome=st.outcome)


def _finalize_13(cs: Cryptsetup, st: VolumeState, confirmed: bool) -> None:
    assert st.next is not None
    drop, st.outcome = (st.key, "rotated") if confirmed else (st.next, "reverted")
    try:
        cs.remove_key(st.device, drop)
    except CryptsetupError as exc:
        st.outcome = "kept-both"
        log.warning("boot.storage_finalize_failed", volume=st.label, confirmed=confirmed, error=str(exc),
                    why="non-fatal in 1.3.x")
        return
    log.info("boot.storage_finalized", volume=st.label, outcome=st.outcome)


# -- whole step ------------------------------------------------------------------------------------

async def prepare_volumes(cs: Cryptsetup, keys: Mapping[str, VolumeKeys], settings: StorageSettings, *,
                          rotate: bool, extend_rtmr3: ExtendFn | None = None) -> list[VolumeState]:
    """:func:`prepare_volume` for every configured label, in order (blocking work off the loop)."""
    if settings.generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {settings.generation!r}")
    states: list[VolumeState] = []
    for label in settings.labels:
        vk = keys.get(label)
        if vk is None:
            raise StorageError("the validator's answer has no entry for this volume", label)
        states.append(await asyncio.to_thread(prepare_volume, cs, label, vk, settings, rotate=rotate,
                                              extend_rtmr3=extend_rtmr3))
    return states


async def setup_storage(cs: Cryptsetup, keys: Mapping[str, VolumeKeys], settings: StorageSettings, *,
                        confirm: ConfirmFn | None, extend_rtmr3: ExtendFn | None = None,
                        before_confirm: Callable[[], Awaitable[None]] | None = None) -> StorageResult:
    """Every volume, the confirm (``confirm(body)`` → what the answer proves, raising when it proves
    nothing; None when there is no confirm nonce: no rotation then), and the slot clean-up. Raises
    :class:`StorageError` to fail closed.

    ``before_confirm`` runs between the volumes and the confirm (the k3s encryption config is written
    there in sek8s).
    """
    states = await prepare_volumes(cs, keys, settings, rotate=confirm is not None, extend_rtmr3=extend_rtmr3)
    body = confirm_body(states)
    if before_confirm is not None:
        await before_confirm()
    if confirm is None:
        await asyncio.to_thread(finalize, cs, states, None, settings.generation)  # nothing was added
        return StorageResult(states, body, None)
    answer: ConfirmAnswer | None
    try:
        answer = await confirm(body)
    except Exception as exc:
        log.warning("boot.storage_confirm_no_answer", error=f"{type(exc).__name__}: {exc}")
        answer = None
    confirmed = await asyncio.to_thread(finalize, cs, states, answer, settings.generation)
    return StorageResult(states, body, confirmed)


# -- k3s secrets encryption config ---------------------------------------------------------------

K3S_CONFIG_TEMPLATE = """\
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
      - configmaps
    providers:
      - secretbox:
          keys:
            - name: key1
              secret: {key}
      - identity: {}
"""


def write_k3s_encryption_config(path: str, key_b64: Secret | None, *, generation: str = "1.4") -> None:
    """``/run/chutes/k3s-encryption-config.yaml`` (0600): secretbox ``key1`` then identity (§5).

    One writer for the file (:func:`agent.boot.artifacts.write_k3s_encryption_config`: the key is checked by
    its shape, never decoded into a spare copy); this wrapper only picks the generation's marker
    (1.3.x ``K3S-ENCRYPTION-KEY-MISSING``, 1.4.0 ``STORAGE-SETUP-FAILED``). Missing or malformed → fail closed.
    """
    marker = K3S_MARKER if generation == "1.3" else MARKER
    if key_b64 is None or not len(key_b64):
        raise StorageError("k3s_encryption_key missing from the validator's answer", marker=marker)
    try:
        artifacts.write_k3s_encryption_config(path, key_b64.reveal())
    except artifacts.ArtifactError as exc:
        raise StorageError(exc.detail, marker=marker) from None
