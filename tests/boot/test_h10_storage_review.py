"""Security review (H10) regressions for storage volumes, on real LUKS2 images and real mounts.

1. A volume the host hands over raw although the validator holds a ``current`` key is formatted with
   ``current``; if ``next`` then cannot be added, the confirm must say ``rotated: false`` (the validator
   keeps ``current``, which opens the volume), never ``true`` (the validator would promote ``next``, which
   no keyslot holds: every later boot fails on that volume).
2. An admin kubeconfig path that is a directory survives the purge: that must fail closed with the
   storage marker (a :class:`StorageError`), not escape as a bare ``IsADirectoryError``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.boot import storage
from agent.boot.confirm import ConfirmAnswer
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.storage import StorageError, StorageSettings, VolumeKeys, setup_storage
from agent.log import Secret
from agent.sim.luks_image import FAST_KDF, FaultyCryptsetup, make_ext4_image

pytestmark = pytest.mark.integration

CUR, NXT = "s" * 128, "S" * 128


class Validator:
    """What the validator keeps after the confirm: ``rotated: true`` promotes ``next``, else ``current``."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.bodies: list[dict[str, object]] = []

    async def __call__(self, body: dict[str, object]) -> ConfirmAnswer:
        self.bodies.append(body)
        if not self.answer:
            return ConfirmAnswer(refused=True, detail="HTTP 401 (bad nonce)")
        vols: Any = body["volumes"]
        return ConfirmAnswer(results={n: "promoted" if v["rotated"] else "discarded" for n, v in vols.items()})

    def holds(self) -> str:
        rotated = self.bodies[0]["volumes"]["storage"]["rotated"]  # type: ignore[index]
        return NXT if (self.answer and rotated) else CUR


@pytest.mark.parametrize("fault", ["add_key", "keyslots"])
@pytest.mark.parametrize("answer", [True, False])
async def test_raw_volume_with_current_and_failed_add_never_promotes_a_missing_key(
        tmp_path: Path, fault: str, answer: bool) -> None:
    dev = str(tmp_path / "storage.img")
    make_ext4_image(dev, {}, label="storage", size_mb=24)
    s = StorageSettings(devices={"storage": dev}, labels=("storage",), action="test-passphrase",
                        header_dir=str(tmp_path / "hdr"), wait_s=0.0, kdf=FAST_KDF, generation="1.4")
    validator = Validator(answer)
    cs = FaultyCryptsetup(fault, nth=1)
    res = await setup_storage(cs, {"storage": VolumeKeys(Secret(CUR), Secret(NXT))}, s, confirm=validator)
    assert cs.injected
    v = res.volumes[0]
    assert (v.formatted, v.next_added) == (True, False)
    assert validator.bodies == [{"volumes": {"storage": {"rotated": False}}}]
    assert Cryptsetup().test_key(dev, Secret(validator.holds())), "the key the validator keeps must open the volume"


async def test_raw_volume_with_null_current_still_reports_rotated(tmp_path: Path) -> None:
    """The first-use case proper (current null, formatted with next) keeps ``rotated: true``."""
    dev = str(tmp_path / "storage.img")
    make_ext4_image(dev, {}, label="storage", size_mb=24)
    s = StorageSettings(devices={"storage": dev}, labels=("storage",), action="test-passphrase",
                        header_dir=str(tmp_path / "hdr"), wait_s=0.0, kdf=FAST_KDF, generation="1.4")
    validator = Validator(True)
    await setup_storage(Cryptsetup(), {"storage": VolumeKeys(None, Secret(NXT))}, s, confirm=validator)
    assert validator.bodies == [{"volumes": {"storage": {"rotated": True}}}]
    assert Cryptsetup().test_key(dev, Secret(validator.holds()))


def test_kubeconfig_directory_fails_closed_with_the_storage_marker(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "rancher-config" / "k3s.yaml").mkdir(parents=True)
    (src / "rancher-config" / "k3s.yaml" / "inner").write_text("x\n")
    img = str(tmp_path / "st.img")
    with open(img, "wb") as fh:
        fh.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "storage", "-d", str(src), img], check=True)
    extended: list[bytes] = []
    mnt = tmp_path / "purge"
    with pytest.raises(StorageError, match="survived the purge") as ei:
        storage.purge_kubeconfig(img, str(mnt), "ext4", extended.append)
    assert ei.value.line().startswith("STORAGE-SETUP-FAILED: storage: admin kubeconfig")
    assert len(extended) == 1 and len(extended[0]) == 48  # measured into RTMR3 before failing
    assert not mnt.exists()  # unmounted and removed on this path too
