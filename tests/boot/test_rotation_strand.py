"""Issue 18 item 9, end to end: whole 1.4.0 boots against the faithful validator (nginx fronts, real TLS,
real LUKS2 images) whose root or storage confirm answer is lost or is not the validator's confirmation.

Every such boot fails closed with the step's marker and leaves BOTH keys on the disk; the next boot then
opens with whichever key the validator releases and rotates cleanly. Before the fix: a 502/cut answer after
the validator committed removed the new key (the next boot could not unlock: the validator holds only the
new key), and a 200 that was not the confirmation killed the old slots (stranded when the validator had not
promoted). Also: a ``vm_auth_ss58`` with a bad checksum stops the boot before any ``luksAddKey``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.boot.cryptsetup import Cryptsetup, Kdf
from agent.log import Secret
from agent.sim.validator import Fault
from agent.validator.proof import BASE58_ALPHABET, Hotkey, SS58Error, ss58_decode
from tests.boot.test_generations import GenRig, _line, make_rig, mr, rigs  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

#: Answers that prove nothing about the root confirm: (id, fault, did the validator commit)
ROOT_LOST = [
    ("502 after commit", Fault("status", status=502, detail="Bad Gateway", applied=True), True),
    ("500 json detail, committed", Fault("status", status=500, applied=True), True),
    ("cut connection after commit", Fault("drop", applied=True), True),
    ("200 html after commit", Fault("garbage", applied=True), True),
    ("200 html, nothing committed", Fault("garbage"), False),
    ("502, nothing committed", Fault("status", status=502, detail="Bad Gateway"), False),
    ("200 json without the root result", Fault("missing_fields", fields=[("volumes", "root", "result")]), True),
    ("200 json without status", Fault("missing_fields", fields=["status"]), True),
    ("200 result not promoted", Fault("override", fields={("volumes", "root", "result"): "discarded"}), True),
]


def _root(rig: GenRig) -> str:
    return str(rig.cfg.boot.root_device)


def _dev(rig: GenRig, label: str) -> str:
    return str(getattr(rig.cfg.boot, f"{label.replace('-', '_')}_device"))


@pytest.mark.parametrize(("fault", "committed"), [(f, c) for _, f, c in ROOT_LOST], ids=[i for i, _, _ in ROOT_LOST])
async def test_unproven_root_confirm_keeps_both_keys_and_the_next_boot_unlocks(
        rigs: Any, fault: Fault, committed: bool) -> None:  # noqa: F811
    rig: GenRig = await rigs("1.4")
    cs = Cryptsetup()
    rig.v.inject("root_confirm", fault)  # times=1: only this boot's root confirm
    outcome = await rig.run()
    line = _line(rig, outcome)
    assert line.startswith("TDX-LUKS-UNLOCK-FAILED: root_rotation: root rotation, confirm:"), line
    assert "outcome unknown, both keyslots kept" in line and "disk opens with: old+new key" in line
    assert outcome.status["root_rotation"] == {"step": "confirm", "keys": "old+new"}
    # both keys really open the image: the build passphrase and this boot's root_next
    assert len(cs.keyslots(_root(rig))) == 2
    assert cs.test_key(_root(rig), rig.build_key)
    held = Secret(bytes(rig.v.root_key(rig.vm).reveal()))  # a copy: the validator wipes keys it replaces
    assert cs.test_key(_root(rig), held)  # whichever the validator holds now
    assert (bytes(held.reveal()) != bytes(rig.build_key.reveal())) is committed
    assert not (rig.run_dir / "luks-quote-nonce").exists() and not (rig.run_dir / "vm-root-ca").joinpath(
        "ca.crt").exists()
    assert [c.get("endpoint") for c in rig.v.events].count("provision") == 0  # stopped before /provision

    second = await rig.run()
    assert second.ok, second.reason
    assert second.status["root_rotation"]["confirmed"] is True
    assert second.status["root_rotation"]["killed"] == [0, 1]  # the stale slot goes by number
    assert len(cs.keyslots(_root(rig))) == 1
    assert cs.test_key(_root(rig), rig.v.root_key(rig.vm))
    assert not cs.test_key(_root(rig), rig.build_key) and not cs.test_key(_root(rig), held)


STORAGE_LOST = [
    ("502 after commit", Fault("status", status=502, detail="Bad Gateway", applied=True), True),
    ("cut connection after commit", Fault("drop", applied=True), True),
    ("200 html, nothing committed", Fault("garbage"), False),
    ("200 json without results", Fault("missing_fields", fields=[("volumes", "storage", "result"),
                                                                 ("volumes", "tdx-cache", "result")]), True),
]


@pytest.mark.parametrize(("fault", "committed"), [(f, c) for _, f, c in STORAGE_LOST],
                         ids=[i for i, _, _ in STORAGE_LOST])
async def test_unproven_storage_confirm_keeps_both_keys_and_the_next_boot_unlocks(
        rigs: Any, fault: Fault, committed: bool) -> None:  # noqa: F811
    rig: GenRig = await rigs("1.4")
    cs = Cryptsetup()
    assert (await rig.run()).ok  # first boot: formats both volumes with the validator's keys
    before = {lbl: bytes(rig.v.volume_key(rig.vm, lbl).reveal()) for lbl in ("storage", "tdx-cache")}  # type: ignore[union-attr]
    rig.v.inject("storage_confirm", fault)
    outcome = await rig.run()
    line = _line(rig, outcome)
    assert line.startswith("STORAGE-SETUP-FAILED: "), line
    assert "keyslots kept as they are" in line or "no answer to the storage confirm" in line
    for lbl in ("storage", "tdx-cache"):
        dev = _dev(rig, lbl)
        assert len(cs.keyslots(dev)) == 2, lbl  # current and next
        assert cs.test_key(dev, Secret(before[lbl]))  # the key of the first boot (current)
        held = rig.v.volume_key(rig.vm, lbl)
        assert held is not None and cs.test_key(dev, held)
        assert (bytes(held.reveal()) != before[lbl]) is committed
    assert not (rig.run_dir / "k3s-encryption-config.yaml").exists()

    third = await rig.run()
    assert third.ok, third.reason
    for lbl in ("storage", "tdx-cache"):
        dev = _dev(rig, lbl)
        assert third.status["storage"][lbl]["outcome"] == "rotated"
        assert len(cs.keyslots(dev)) == 1
        held = rig.v.volume_key(rig.vm, lbl)
        assert held is not None and cs.test_key(dev, held) and not cs.test_key(dev, Secret(before[lbl]))


# -- vm_auth_ss58 checksum ----------------------------------------------------------------------------

def _flip_last(ss58: str) -> str:
    """The same address with its last character (part of the 2-byte checksum) changed."""
    last = ss58[-1]
    return ss58[:-1] + BASE58_ALPHABET[(BASE58_ALPHABET.index(last) + 1) % len(BASE58_ALPHABET)]


@pytest.mark.parametrize("valid", [True, False], ids=["valid ss58", "checksum flipped"])
async def test_vm_auth_ss58_checksum_is_checked_before_any_rotation(
        rigs: Any, monkeypatch: pytest.MonkeyPatch, valid: bool) -> None:  # noqa: F811
    good = Hotkey.from_seed_hex("ab" * 32).ss58  # a real prefix-42 address
    ss58 = good if valid else _flip_last(good)
    if not valid:
        with pytest.raises(SS58Error, match="checksum mismatch"):
            ss58_decode(ss58)
    added: list[str] = []
    real_add = Cryptsetup.add_key

    def add_key(self: Cryptsetup, device: str, key: Secret, new: Secret, *, kdf: Kdf | None = None) -> None:
        added.append(device)
        real_add(self, device, key, new, kdf=kdf)

    monkeypatch.setattr(Cryptsetup, "add_key", add_key)
    rig: GenRig = await rigs("1.4")
    rig.v.state.response_extras = {"vm_auth_ss58": ss58}
    outcome = await rig.run()
    cs = Cryptsetup()
    if valid:
        assert outcome.ok, outcome.reason
        assert (rig.run_dir / "validator-auth.env").read_text() == f"ALLOWED_VALIDATORS={ss58}\n"
        assert _root(rig) in added
        return
    line = _line(rig, outcome)
    assert "field 'vm_auth_ss58' is not a valid SS58 address: SS58 address checksum mismatch" in line, line
    assert added == []  # no luksAddKey on any device
    assert cs.keyslots(_root(rig)) == [0] and cs.test_key(_root(rig), rig.build_key)
    assert cs.token_exists(_root(rig), 15)  # the root was not even opened
    endpoints = [c.get("endpoint") for c in rig.v.events]
    assert "attestation" in endpoints and "provision_confirm" not in endpoints and "provision" not in endpoints
    assert not Path(rig.run_dir / "validator-auth.env").exists()
