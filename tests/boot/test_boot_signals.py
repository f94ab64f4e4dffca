"""Issue 18 item 9: SIGTERM / SIGINT during ``chutes-attest boot`` run the failure clean-up of what the boot
wrote on tmpfs (the CA files, ``luks-quote-nonce``, ``cert-hash``, the k3s secrets key), print the marker
line, and exit non-zero (128 + the signal).

The boot runs as the real command in a subprocess (the demo's simulated VM: faithful validator behind nginx,
the configfs-tsm and RTMR FUSE emulators, real LUKS2 images). The validator holds the storage confirm open,
so the signal lands while every secret hand-off file exists and both keys sit on the storage volumes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import pytest

from agent.boot.cryptsetup import Cryptsetup
from agent.log import Secret
from agent.sim.quote_sim import DEFAULT_MR_TD, load_or_create_sim_pki
from agent.sim.validator import FaithfulValidator, Fault

pytestmark = pytest.mark.integration

DELAY_S = 5.0
SECRET_FILES = ("luks-quote-nonce", "cert-hash", "k3s-encryption-config.yaml", "vm-root-ca/ca.crt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_boot_wipes_the_hand_off_secrets(tmp_path: Path, signum: signal.Signals) -> None:
    # imported here: the demo needs libfuse, which only the integration tier requires (collecting this module
    # for `-m unit` on a machine without it must not fail)
    from agent.sim import demo
    from agent.sim.tsm_mr_emulator import MrState

    p = demo.DemoPaths(tmp_path / "w")
    p.work.mkdir(parents=True)
    (p.work / "kmsg").touch()
    p.handoff.mkdir(parents=True)
    pki = load_or_create_sim_pki(p.sim)
    demo.make_rootfs(p)
    predicted = demo.predict_rtmr3(p)
    v = FaithfulValidator(p.validator, root_ca_pem=pki.root_ca_pem, generation="1.4", runtime_rtmr3=predicted,
                          legacy_luks=False)
    hotkey, build_key, image_key = demo.make_images(p, v, "1.4", "none")
    state = MrState(DEFAULT_MR_TD)
    demo._fresh_td(state)
    rig = demo.DemoRig(p, v, "1.4", demo.VM_NAME, hotkey, build_key, image_key, state, predicted, "emulated")
    # the confirm stays in flight for DELAY_S (short: the validator's shutdown waits for its handler)
    v.inject("storage_confirm", Fault("delay", delay_s=DELAY_S))
    with demo.emulators(p, state, "emulated"):
        async with v:
            demo.write_config(rig)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "--config", str(p.config), "--log-level", "warning", "boot",
                "--no-poweroff", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                deadline = time.monotonic() + 180
                while not any(e.get("fault_target") == "storage_confirm" for e in v.events):
                    assert proc.returncode is None, "the boot ended before the storage confirm"
                    assert time.monotonic() < deadline, "the boot never reached the storage confirm"
                    await asyncio.sleep(0.05)
                present = {n: (p.handoff / n).exists() for n in SECRET_FILES}
                assert all(present.values()), present  # the point where the secrets are on tmpfs
                assert not (p.handoff / "vm-root-ca" / "ca.key").exists()  # never written (vm_ca.write_ca)
                # the keys the validator holds now (copies: it wipes keys it replaces or drops)
                root_key = Secret(bytes(v.root_key(demo.VM_NAME).reveal()))
                formatted = {lbl: Secret(bytes(k.reveal())) for lbl in ("storage", "tdx-cache")
                             if (k := v.volume_key(demo.VM_NAME, lbl, pending=True)) is not None}
                proc.send_signal(signum)
                t0 = time.monotonic()
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                stopped_s = time.monotonic() - t0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    text = err.decode() + out.decode()
    assert proc.returncode == 128 + signum, text
    assert stopped_s < 10, f"the boot took {stopped_s:.1f}s to stop"
    line = f"TDX-LUKS-UNLOCK-FAILED: signal: stopped by {signum.name} before the boot finished; hand-off secrets wiped"
    assert line in text
    assert line in (p.work / "kmsg").read_text()
    for name in SECRET_FILES:
        assert not (p.handoff / name).exists(), name
    status = json.loads((p.handoff / "boot-status.json").read_text())
    assert (status["outcome"], status["reason_code"]) == ("failed", "boot_signal")
    # the root confirm completed before the signal: the root opens with the key the validator holds; each
    # first-use volume opens with the key it was formatted with (the validator's pending one)
    cs = Cryptsetup()
    assert cs.keyslots(str(p.root_image)) == [1] and cs.test_key(str(p.root_image), root_key)
    assert sorted(formatted) == ["storage", "tdx-cache"]
    for label, image in (("storage", p.storage_image), ("tdx-cache", p.tdx_cache_image)):
        assert cs.keyslots(str(image)) == [0] and cs.test_key(str(image), formatted[label]), label
