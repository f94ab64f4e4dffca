"""Stage 1: the real initramfs unlocks a real LUKS2 root under qemu with the key the validator released.

Every part is real except the quote source (simulated, explicitly configured in the baked agent.toml):
Debian's kernel and initramfs-tools, the project's hook and scripts, cryptsetup + dm-crypt, the agent
over real TLS (nginx terminator) to the faithful validator on the host's loopback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.log import Secret
from agent.sim.validator import Fault

from .conftest import FAILED, REPO, boot_vm, vmlib

pytestmark = pytest.mark.vm

UNLOCK_STAGES = [
    "config",
    "network",
    "tee",
    "client_cert",
    "nonce",
    "quote",
    "self_check",
    "attestation",
    "luks_header",
    "unlock",
    "handoff",
]


def _assert_failed_closed(console, reason_part: str) -> str:
    """Failure line present with a reason, VM powered off, root never mounted, stage-1 init never ran."""
    lines = console.lines_with(f"{FAILED}:")
    assert lines, console.text[-3000:]
    assert reason_part in lines[0], lines[0]
    assert "reboot: Power down" in console.text
    assert "STAGE1-" not in console.text
    assert not console.lines_with("EXT4-fs (dm-")  # no device-mapper volume was ever mounted
    assert ("unlock", "ok") not in console.stages()
    return lines[0]


def _record_timing(name: str, data: dict) -> None:
    out = REPO / ".cache" / "vm" / "logs" / "timings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    allt = json.loads(out.read_text()) if out.exists() else {}
    allt[name] = data
    out.write_text(json.dumps(allt, indent=2))


async def test_unlock_with_released_key(tmp_path: Path, stage1_images, validator) -> None:
    root: vmlib.LuksDisk = stage1_images["root"]
    validator.add_vm(vmlib.HOSTNAME, vmlib.MINER_SS58, Secret(root.passphrase))
    console = await boot_vm(tmp_path, stage1_images["initrd"], [root.image, stage1_images["config"]], "stage1-ok")

    assert FAILED not in console.text, console.text[-3000:]
    assert console.lines_with("EXT4-fs (dm-0): mounted filesystem")  # the opened root, mounted by initramfs-tools
    stages = console.stages()
    assert [s for s, _ in stages] == UNLOCK_STAGES, stages
    assert all(r == "ok" for _, r in stages), stages
    # the init that ran is the one on the unlocked disk, reading the marker from it
    assert console.lines_with("STAGE1-ROOT:") == ["/dev/mapper/root"]
    assert console.lines_with("STAGE1-MARKER:") == [root.marker]
    stats = console.lines_with("STAGE1-STAT:")
    assert [s.split()[0] for s in stats] == ["/run/chutes/vm-name", "/run/chutes/hotkey", "/run/chutes/boot-token"]
    assert all("mode=600 uid=0" in s for s in stats), stats
    assert console.lines_with("STAGE1-VMNAME:") == [vmlib.HOSTNAME]
    assert console.lines_with("STAGE1-HOTKEY:") == [vmlib.MINER_SS58]
    tokens = list(validator.state.boot_tokens)
    assert len(tokens) == 1
    assert console.lines_with("STAGE1-BOOT-TOKEN-SHA256:") == [hashlib.sha256(tokens[0].encode()).hexdigest()]

    # the validator saw exactly one nonce and one attestation, correctly bound
    nonces = [e for e in validator.events if e["endpoint"] == "nonce"]
    atts = [e for e in validator.events if e["endpoint"] == "attestation"]
    assert len(nonces) == 1 and len(atts) == 1, validator.events
    att = atts[0]
    assert att["status"] == 200 and att["nonce"] == nonces[0]["nonce"]
    assert att["report_data_nonce_match"] and att["cert_hash_match"] and att["quote_verified"]
    assert att["vm_name"] == vmlib.HOSTNAME and att["miner_hotkey"] == vmlib.MINER_SS58
    assert nonces[0]["client_cert"]  # the hotkey travels in the attestation body (checked above), not the nonce
    assert att["measurement"] == "simulated-dev"

    # boot-to-unlock, read from the console: kernel timestamps around the agent + its own accounting
    t0, t1 = console.kmsg_time("chutes-attest: agent starting"), console.kmsg_time("chutes-attest: agent done")
    done = console.events("boot.done")
    assert t0 is not None and t1 is not None and done and done[-1]["outcome"] == "unlocked"
    _record_timing(
        "stage1",
        {
            "agent_process_s": round(t1 - t0, 3),
            **done[-1],
            "stages_ms": {s["stage"]: s["duration_ms"] for s in console.events("boot.stage")},
        },
    )


async def test_validator_fails_every_attempt(tmp_path: Path, stage1_images, validator) -> None:
    """A retryable failure (5xx) is retried up to boot.max_attempts, each time with a fresh nonce, then the
    boot fails closed (401/403/404 give up at once: agent.validator.retry, unit-tested there)."""
    root: vmlib.LuksDisk = stage1_images["root"]
    validator.add_vm(vmlib.HOSTNAME, vmlib.MINER_SS58, Secret(root.passphrase))
    validator.inject("attestation", Fault("status", status=503, times=None, detail="unavailable by test"))
    console = await boot_vm(tmp_path, stage1_images["initrd"], [root.image, stage1_images["config"]], "stage1-503")
    _assert_failed_closed(console, "503")
    atts = [e for e in validator.events if e["endpoint"] == "attestation"]
    nonces = [e["nonce"] for e in validator.events if e["endpoint"] == "nonce"]
    assert len(atts) == 3 and all(e["status"] == 503 for e in atts)  # boot.max_attempts = 3
    assert len(nonces) == 3 and len(set(nonces)) == 3  # a fresh nonce for every attempt
    assert not validator.state.boot_tokens


async def test_wrong_key_never_unlocks(tmp_path: Path, stage1_images, validator) -> None:
    root: vmlib.LuksDisk = stage1_images["root"]
    validator.add_vm(vmlib.HOSTNAME, vmlib.MINER_SS58, Secret(b"0" * 64))
    console = await boot_vm(tmp_path, stage1_images["initrd"], [root.image, stage1_images["config"]], "stage1-wrongkey")
    line = _assert_failed_closed(console, "unlock")
    assert "does not open the root volume" in line
    assert ("luks_header", "ok") in console.stages() and ("unlock", "failed") in console.stages()
    assert len([e for e in validator.events if e["endpoint"] == "attestation" and e["status"] == 200]) == 1


async def test_cipher_null_header_refused_before_key_use(tmp_path: Path, stage1_images, validator) -> None:
    root: vmlib.LuksDisk = stage1_images["root"]
    tampered = vmlib.cipher_null_copy(root, tmp_path / "root-cipher-null.img")
    validator.add_vm(vmlib.HOSTNAME, vmlib.MINER_SS58, Secret(root.passphrase))  # the correct key
    console = await boot_vm(tmp_path, stage1_images["initrd"], [tampered, stage1_images["config"]], "stage1-ciphernull")
    line = _assert_failed_closed(console, "luks_header")
    assert "cipher_null" in line
    assert ("luks_header", "failed") in console.stages()
    assert "unlock" not in [s for s, _ in console.stages()]  # the key was never handed to cryptsetup open


async def test_validator_unreachable(tmp_path: Path, stage1_images) -> None:
    root: vmlib.LuksDisk = stage1_images["root"]
    console = await boot_vm(
        tmp_path, stage1_images["initrd"], [root.image, stage1_images["config"]], "stage1-unreachable"
    )
    _assert_failed_closed(console, "nonce")
    assert [s for s, r in console.stages() if s == "nonce" and r == "failed"], console.stages()
