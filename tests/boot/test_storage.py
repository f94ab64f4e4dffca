"""Storage volumes (1.3.x luks/attest, 1.4.0 provision) on real LUKS2 images and loop devices: discovery,
first-use format, per-boot rotation with current/next, confirm outcomes, kubeconfig purge, k3s config."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config
from agent.boot import blockdev, storage
from agent.boot.confirm import ConfirmAnswer
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.storage import StorageError, StorageSettings, VolumeKeys, setup_storage
from agent.log import Secret
from agent.sim.luks_image import (
    FAST_KDF,
    FaultyCryptsetup,
    make_ext4_image,
    make_luks_image,
    null_cipher_segment,
    tamper_luks2_metadata,
)

pytestmark = pytest.mark.integration

CUR = {"storage": "s" * 128, "tdx-cache": "c" * 128}
NXT = {"storage": "S" * 128, "tdx-cache": "C" * 128}


def opens(dev: str, key: str) -> bool:
    return Cryptsetup().test_key(dev, Secret(key))


def keys_on(dev: str, label: str) -> set[str]:
    return {name for name, k in (("current", CUR[label]), ("next", NXT[label])) if opens(dev, k)}


def settings(tmp: Path, devices: dict[str, str], generation: str = "1.4", **kw: Any) -> StorageSettings:
    return StorageSettings(devices=devices, action="test-passphrase", header_dir=str(tmp / "hdr"), wait_s=0.0,
                           kdf=FAST_KDF, generation=generation, **kw)


@pytest.fixture
def vols(tmp_path: Path) -> dict[str, str]:
    """Both volumes already LUKS2, each opened by its current key."""
    out = {}
    for label in ("storage", "tdx-cache"):
        path = str(tmp_path / f"{label}.img")
        make_luks_image(path, Secret(CUR[label]), label=label)
        out[label] = path
    return out


def rotating() -> dict[str, VolumeKeys]:
    return {lbl: VolumeKeys(Secret(CUR[lbl]), Secret(NXT[lbl])) for lbl in ("storage", "tdx-cache")}


def confirmation(body: dict[str, object]) -> ConfirmAnswer:
    """What the validator's confirmation says for ``body`` (its ``_promote``: rotated → promoted, else discarded)."""
    vols: Any = body["volumes"]
    return ConfirmAnswer(results={n: "promoted" if v["rotated"] else "discarded" for n, v in vols.items()})


class Confirm:
    """True: the validator's confirmation; False: a refusal it states; an answer or exception as given."""

    def __init__(self, result: bool | Exception | ConfirmAnswer) -> None:
        self.result = result
        self.bodies: list[dict[str, object]] = []

    async def __call__(self, body: dict[str, object]) -> ConfirmAnswer:
        self.bodies.append(body)
        if isinstance(self.result, Exception):
            raise self.result
        if isinstance(self.result, ConfirmAnswer):
            return self.result
        return confirmation(body) if self.result else ConfirmAnswer(refused=True, detail="HTTP 401 (bad nonce)")


# -- 1.4.0 rotation ------------------------------------------------------------------------------

async def test_rotation_confirmed(vols: dict[str, str], tmp_path: Path) -> None:
    confirm = Confirm(True)
    res = await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=confirm)
    assert confirm.bodies == [{"volumes": {"storage": {"rotated": True}, "tdx-cache": {"rotated": True}}}]
    assert res.confirmed is True and res.confirm_body == confirm.bodies[0]
    assert [(v.label, v.formatted, v.old_slots, v.outcome) for v in res.volumes] == [
        ("storage", False, [0], "rotated"), ("tdx-cache", False, [0], "rotated")]
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"next"}
        assert Cryptsetup().keyslots(dev) == [1]
    assert res.volumes[0].header is not None and res.volumes[0].header.label == "storage"
    assert res.volumes[0].kubeconfig.startswith("skipped")  # nothing mapped in test-passphrase mode


async def test_rotation_refused_reverts_to_current(vols: dict[str, str], tmp_path: Path) -> None:
    res = await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=Confirm(False))
    assert res.confirmed is False
    assert [v.outcome for v in res.volumes] == ["reverted", "reverted"]
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"current"}
        assert Cryptsetup().keyslots(dev) == [0]


async def test_confirm_without_answer_keeps_both_and_fails_closed(vols: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no answer to the storage confirm") as ei:
        await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=Confirm(TimeoutError()))
    assert ei.value.line().startswith("STORAGE-SETUP-FAILED: no answer")
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"current", "next"}


async def test_no_confirm_nonce_means_no_rotation(vols: dict[str, str], tmp_path: Path) -> None:
    res = await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=None)
    assert res.confirmed is None
    assert res.confirm_body == {"volumes": {"storage": {"rotated": False}, "tdx-cache": {"rotated": False}}}
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"current"}


async def test_add_key_failure_is_not_fatal(vols: dict[str, str], tmp_path: Path) -> None:
    """luksAddKey fails on storage only: rotated false for it, the cache still rotates."""
    confirm = Confirm(True)
    res = await setup_storage(FaultyCryptsetup("add_key", nth=1), rotating(), settings(tmp_path, vols),
                              confirm=confirm)
    assert confirm.bodies[0] == {"volumes": {"storage": {"rotated": False}, "tdx-cache": {"rotated": True}}}
    assert [v.outcome for v in res.volumes] == ["unchanged", "rotated"]
    assert keys_on(vols["storage"], "storage") == {"current"}
    assert keys_on(vols["tdx-cache"], "tdx-cache") == {"next"}


# (fault, nth, after, confirm, expected error fragment or None, keys on storage, keys on tdx-cache)
FAULTS_14 = [
    ("kill_slot", 1, False, True, "slot clean-up failed at slot 0", {"current", "next"}, {"current", "next"}),
    ("kill_slot", 2, False, True, "slot clean-up failed at slot 0", {"next"}, {"current", "next"}),
    ("kill_slot", 2, True, True, "slot clean-up failed at slot 0", {"next"}, {"next"}),
    ("remove_key", 1, False, False, "rollback failed", {"current", "next"}, {"current", "next"}),
    ("remove_key", 2, True, False, "rollback failed", {"current"}, {"current"}),
    ("keyslots", 1, False, True, None, {"current"}, {"next"}),  # no slot list: no add for storage
    ("add_key", 2, True, True, None, {"next"}, {"current", "next"}),  # added but "failed": rotated false
]


@pytest.mark.parametrize(("fault", "nth", "after", "confirmed", "error", "k_storage", "k_cache"), FAULTS_14)
async def test_14_failure_points_never_lock_a_volume(
    vols: dict[str, str], tmp_path: Path, fault: str, nth: int, after: bool, confirmed: bool, error: str | None,
    k_storage: set[str], k_cache: set[str],
) -> None:
    cs = FaultyCryptsetup(fault, nth=nth, after=after)
    if error is None:
        await setup_storage(cs, rotating(), settings(tmp_path, vols), confirm=Confirm(confirmed))
    else:
        with pytest.raises(StorageError, match=error):
            await setup_storage(cs, rotating(), settings(tmp_path, vols), confirm=Confirm(confirmed))
    assert cs.injected
    got = {lbl: keys_on(vols[lbl], lbl) for lbl in vols}
    assert all(got.values()), f"a volume no key opens: {got}"
    assert got == {"storage": k_storage, "tdx-cache": k_cache}


async def test_failure_on_second_volume_leaves_first_openable(vols: dict[str, str], tmp_path: Path) -> None:
    """storage got its next slot, then the cache key is wrong: fail closed before any confirm."""
    keys = rotating()
    keys["tdx-cache"] = VolumeKeys(Secret("wrong"), Secret(NXT["tdx-cache"]))
    confirm = Confirm(True)
    with pytest.raises(StorageError, match="tdx-cache: the validator's key does not open it"):
        await setup_storage(Cryptsetup(), keys, settings(tmp_path, vols), confirm=confirm)
    assert confirm.bodies == []
    assert keys_on(vols["storage"], "storage") == {"current", "next"}
    assert keys_on(vols["tdx-cache"], "tdx-cache") == {"current"}


# -- 1.3.x --------------------------------------------------------------------------------------

async def test_13_confirmed_removes_current_by_passphrase(vols: dict[str, str], tmp_path: Path) -> None:
    res = await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols, "1.3"), confirm=Confirm(True))
    assert [v.old_slots for v in res.volumes] == [[], []]  # 1.3.x does not record slots
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"next"}


async def test_13_refused_removes_next(vols: dict[str, str], tmp_path: Path) -> None:
    await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols, "1.3"), confirm=Confirm(False))
    for label, dev in vols.items():
        assert keys_on(dev, label) == {"current"}


@pytest.mark.parametrize("confirmed", [True, False, OSError("reset")])
async def test_13_cleanup_failures_are_not_fatal(vols: dict[str, str], tmp_path: Path,
                                                 confirmed: bool | Exception) -> None:
    res = await setup_storage(FaultyCryptsetup("remove_key"), rotating(), settings(tmp_path, vols, "1.3"),
                              confirm=Confirm(confirmed))
    assert res.volumes[0].outcome == "kept-both"
    assert keys_on(vols["storage"], "storage") == {"current", "next"}
    if confirmed is True:
        assert keys_on(vols["tdx-cache"], "tdx-cache") == {"next"}


# -- first use ----------------------------------------------------------------------------------

@pytest.mark.parametrize("generation", ["1.3", "1.4"])
async def test_first_use_formats_with_next_when_current_is_null(tmp_path: Path, generation: str) -> None:
    devices = {}
    for label in ("storage", "tdx-cache"):  # what the host hands over: a labelled filesystem, not LUKS
        devices[label] = str(tmp_path / f"{label}.img")
        make_ext4_image(devices[label], {"old.txt": "host data"}, label=label, size_mb=24)
    keys = {lbl: VolumeKeys(None, Secret(NXT[lbl])) for lbl in devices}
    confirm = Confirm(True)
    res = await setup_storage(Cryptsetup(), keys, settings(tmp_path, devices, generation), confirm=confirm)
    assert confirm.bodies[0] == {"volumes": {"storage": {"rotated": True}, "tdx-cache": {"rotated": True}}}
    cs = Cryptsetup()
    for v in res.volumes:
        assert (v.formatted, v.next_added, v.outcome) == (True, False, "formatted")
        assert cs.is_luks(v.device) and cs.label(v.device) == v.label and cs.keyslots(v.device) == [0]
        assert keys_on(v.device, v.label) == {"next"}
        probe = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", v.device], capture_output=True, text=True)
        assert probe.stdout.strip() == "crypto_LUKS"  # the host's ext4 is gone
        meta = cs.dump_json(v.device)
        assert meta["segments"]["0"]["encryption"] == "aes-xts-plain64"


async def test_first_use_with_current_formats_then_rotates(tmp_path: Path) -> None:
    dev = str(tmp_path / "storage.img")
    make_ext4_image(dev, {}, label="storage", size_mb=24)
    keys = {"storage": VolumeKeys(Secret(CUR["storage"]), Secret(NXT["storage"]))}
    res = await setup_storage(Cryptsetup(), keys, settings(tmp_path, {"storage": dev}, labels=("storage",)),
                              confirm=Confirm(True))
    v = res.volumes[0]
    assert (v.formatted, v.next_added, v.old_slots, v.outcome) == (True, True, [0], "rotated")
    assert keys_on(dev, "storage") == {"next"}


async def test_format_failure_fails_closed(tmp_path: Path) -> None:
    dev = str(tmp_path / "storage.img")
    make_ext4_image(dev, {}, label="storage", size_mb=24)
    with pytest.raises(StorageError, match="storage: first-use luksFormat failed"):
        await setup_storage(FaultyCryptsetup("format_luks2"), {"storage": VolumeKeys(None, Secret("k"))},
                            settings(tmp_path, {"storage": dev}, labels=("storage",)), confirm=Confirm(True))


# -- refusals -----------------------------------------------------------------------------------

async def test_missing_device_fails_with_marker(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as ei:
        await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, {"storage": str(tmp_path / "nope.img")}),
                            confirm=Confirm(True))
    assert ei.value.line() == "STORAGE-SETUP-FAILED: storage: no device labelled 'storage'"


async def test_missing_volume_in_answer(vols: dict[str, str], tmp_path: Path) -> None:
    keys = rotating()
    del keys["tdx-cache"]
    with pytest.raises(StorageError, match="tdx-cache: the validator's answer has no entry"):
        await setup_storage(Cryptsetup(), keys, settings(tmp_path, vols), confirm=Confirm(True))


async def test_no_passphrase_at_all(vols: dict[str, str], tmp_path: Path) -> None:
    keys = rotating()
    keys["storage"] = VolumeKeys(None, None)
    with pytest.raises(StorageError, match="storage: the validator sent no passphrase"):
        await setup_storage(Cryptsetup(), keys, settings(tmp_path, vols), confirm=Confirm(True))


async def test_tampered_header_is_refused_never_reformatted(vols: dict[str, str], tmp_path: Path) -> None:
    tamper_luks2_metadata(vols["storage"], null_cipher_segment)
    with pytest.raises(StorageError, match=r"storage: header refused: segments\.0\.encryption"):
        await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=Confirm(True))
    assert Cryptsetup().is_luks(vols["storage"])
    assert Cryptsetup().keyslots(vols["storage"]) == [0]


async def test_unreadable_device_is_never_treated_as_first_use(tmp_path: Path) -> None:
    """An isLuks error other than "not LUKS" must not lead to wipefs + luksFormat."""
    d = tmp_path / "storage.img"
    d.mkdir()  # exists, but cryptsetup cannot read it as a device
    with pytest.raises(StorageError, match="cannot tell whether"):
        await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, {"storage": str(d)}), confirm=Confirm(True))


# -- discovery by label (loop devices) ----------------------------------------------------------

@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[tuple[str, str]]:
    label = "st-" + os.urandom(4).hex()
    img = str(tmp_path / "loop.img")
    make_luks_image(img, Secret("pw"), label=label)
    dev = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["udevadm", "settle"], check=False, capture_output=True)
        yield dev, label
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_discover_by_label_and_by_luks_header_scan(loopdev: tuple[str, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dev, label = loopdev
    cs = Cryptsetup()
    s = settings(tmp_path, {})
    assert storage.discover(cs, label, s) == dev  # blkid LABEL=
    monkeypatch.setattr(blockdev, "find_by_label", lambda *_a, **_k: None)
    scanned = StorageSettings(wait_s=0.0, scan=lambda: ["/dev/null", str(tmp_path / "loop.img"), dev])
    assert storage.discover(cs, label, scanned) == dev  # isLuks + luksDump label; non-block entries skipped
    assert storage.discover(cs, "other-label", scanned) is None


# -- kubeconfig purge (real mount of an ext4 image through a loop device) -------------------------

@pytest.fixture
def kube_img(tmp_path: Path) -> str:
    src = tmp_path / "src"
    (src / "rancher-config").mkdir(parents=True)
    (src / "rancher-config" / "k3s.yaml").write_text("admin kubeconfig\n")
    img = str(tmp_path / "st.img")
    with open(img, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "storage", "-d", str(src), img], check=True)
    return img


def _mount_ro(img: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ext4", "-o", "loop,ro", img, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_kubeconfig_purged_then_absent(kube_img: str, tmp_path: Path) -> None:
    extended: list[bytes] = []
    mnt = str(tmp_path / "purge")
    assert storage.purge_kubeconfig(kube_img, mnt, "ext4", extended.append) == "purged"
    assert not os.path.exists(mnt)  # unmounted and removed
    for m in _mount_ro(kube_img, tmp_path / "check"):
        assert not (m / "rancher-config" / "k3s.yaml").exists()
        assert (m / "rancher-config").is_dir()
    assert storage.purge_kubeconfig(kube_img, mnt, "ext4", extended.append) == "absent"
    assert extended == []  # the expected state extends nothing: RTMR3 baseline unchanged


def test_kubeconfig_that_survives_is_measured_and_fails(kube_img: str, tmp_path: Path) -> None:
    mnt = tmp_path / "set"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", "-o", "loop", kube_img, str(mnt)], check=True)
    subprocess.run(["chattr", "+i", str(mnt / "rancher-config" / "k3s.yaml")], check=True)
    subprocess.run(["umount", str(mnt)], check=True)
    extended: list[bytes] = []
    with pytest.raises(StorageError, match="survived the purge") as ei:
        storage.purge_kubeconfig(kube_img, str(tmp_path / "purge"), "ext4", extended.append)
    assert extended == [hashlib.sha384(b"admin kubeconfig\n").digest()]
    assert ei.value.line().startswith("STORAGE-SETUP-FAILED: storage: admin kubeconfig")


def test_kubeconfig_mount_failure_fails(tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(1 << 20))
    with pytest.raises(StorageError, match="kubeconfig purge: mount"):
        storage.purge_kubeconfig(str(raw), str(tmp_path / "purge"), "ext4", None)


# -- k3s encryption config ----------------------------------------------------------------------

def test_k3s_config_exact(tmp_path: Path) -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    path = tmp_path / "run-chutes" / "k3s-encryption-config.yaml"
    storage.write_k3s_encryption_config(str(path), Secret(key))
    assert path.stat().st_mode & 0o777 == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc == {
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets", "configmaps"],
                       "providers": [{"secretbox": {"keys": [{"name": "key1", "secret": key}]}}, {"identity": {}}]}],
    }


@pytest.mark.parametrize(("value", "generation", "marker", "message"), [
    (None, "1.3", "K3S-ENCRYPTION-KEY-MISSING", "missing"),
    (None, "1.4", "STORAGE-SETUP-FAILED", "missing"),
    ("", "1.4", "STORAGE-SETUP-FAILED", "missing"),
    ("not base64!", "1.4", "STORAGE-SETUP-FAILED", "standard base64 of exactly 32 bytes"),
    (base64.b64encode(bytes(16)).decode(), "1.4", "STORAGE-SETUP-FAILED", "standard base64 of exactly 32 bytes"),
    (base64.b64encode(bytes(32)).decode() + "\n", "1.4", "STORAGE-SETUP-FAILED", "standard base64 of exactly 32"),
])
def test_k3s_config_refusals(tmp_path: Path, value: str | None, generation: str, marker: str, message: str) -> None:
    path = tmp_path / "k3s.yaml"
    with pytest.raises(StorageError, match=message) as ei:
        storage.write_k3s_encryption_config(str(path), None if value is None else Secret(value), generation=generation)
    assert ei.value.line().startswith(marker + ": ")
    assert not path.exists()


# -- secrets ------------------------------------------------------------------------------------

async def test_storage_keys_never_in_argv(vols: dict[str, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    argvs: list[list[str]] = []
    real = subprocess.Popen

    def spy(argv: list[str], **kw: Any) -> Any:
        argvs.append(list(argv))
        for fd in kw.get("pass_fds", ()):
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:luks-key")
        return real(argv, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    await setup_storage(Cryptsetup(), rotating(), settings(tmp_path, vols), confirm=Confirm(True))
    assert {a[1] for a in argvs if a[0] == "cryptsetup"} >= {"isLuks", "luksHeaderBackup", "luksDump", "open",
                                                             "luksAddKey", "luksKillSlot"}
    blob = "\0".join("\0".join(a) for a in argvs).encode()
    for k in (*CUR.values(), *NXT.values()):
        assert k.encode() not in blob
    assert not list((tmp_path / "hdr").iterdir())  # header copies removed


def test_settings_from_config() -> None:
    cfg = config.AgentConfig()
    cfg.boot.tdx_cache_device = "/dev/vdc"
    cfg.boot.format_pbkdf, cfg.boot.format_pbkdf_iterations = "pbkdf2", 5000
    s = storage.settings_from_config(cfg.boot, "1.3")
    assert (tuple(s.labels), dict(s.devices), s.action, s.generation, s.mkfs, s.kubeconfig_volume) == (
        ("storage", "tdx-cache"), {"tdx-cache": "/dev/vdc"}, "open", "1.3", "mkfs.xfs", "storage")
    assert s.fstype == "xfs"
    # the purge mounts what storage_mkfs made (an ext4-formatted volume mounted as xfs fails the boot)
    cfg.boot.storage_mkfs = "/usr/sbin/mkfs.ext4"
    assert storage.settings_from_config(cfg.boot, "1.4").fstype == "ext4"
    assert s.kdf.args() == ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "5000"]
    assert cfg.boot.root_confirm_failure == "poweroff"
    assert config.load(None, ["boot.root_confirm_failure=continue"], environ={}).boot.root_confirm_failure == "continue"
    with pytest.raises(config.ConfigError, match=r"boot\.root_confirm_failure: must be one of continue, poweroff"):
        config.load(None, ["boot.root_confirm_failure=maybe"], environ={})


def test_cryptsetup_error_on_missing_device_is_precise(tmp_path: Path) -> None:
    with pytest.raises(CryptsetupError, match="luksDump"):
        Cryptsetup().keyslots(str(tmp_path / "none.img"))
