"""The whole boot flow against the faithful validator over real TLS, ending in real cryptsetup."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.boot.cryptsetup import Cryptsetup
from agent.quote import parse_quote
from agent.sim.validator import Fault
from tests.boot.conftest import BootRig

pytestmark = pytest.mark.integration


async def test_full_boot_unlocks_and_hands_off(rig: BootRig) -> None:
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.exit_code == 0

    # the validator saw one nonce and one attestation that bound nonce and client cert
    nonces = [e for e in rig.validator.events if e["endpoint"] == "nonce"]
    # ≤1.2 (reference §4.1): the nonce call carries no query; the client cert is presented
    assert len(nonces) == 1 and nonces[0].get("miner_hotkey") is None and nonces[0]["client_cert"]
    (att,) = rig.validator.attestations()
    assert att["status"] == 200
    assert att["nonce"] == nonces[0]["nonce"]
    assert att["report_data_nonce_match"] and att["cert_hash_match"] and att["quote_verified"]
    assert att["client_verify"].startswith("FAILED")  # self-signed under optional_no_ca, as in production
    assert att["measurement"] == "simulated-dev"
    assert att["vm_name"] == rig.vm_name

    # cache volume: first boot → PUT, formatted LUKS2 with that passphrase and the label
    assert [e["endpoint"] for e in rig.validator.events if e["endpoint"].startswith("luks")] == ["luks_put"]
    cs = Cryptsetup()
    meta = cs.dump_json(rig.cfg.boot.cache_device)
    assert meta["segments"]["0"]["encryption"] == "aes-xts-plain64"
    cache_key = rig.validator.state.vms[rig.vm_name].cache
    assert cache_key is not None
    cs.open(rig.cfg.boot.cache_device, "x", cache_key, test_only=True)

    # hand-off files, 0600, with the right content
    run = Path(rig.cfg.boot.handoff_dir)
    for name in ("vm-name", "hotkey", "boot-token"):
        assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o600
    assert (run / "vm-name").read_text() == rig.vm_name + "\n"  # text + newline (reference §7)
    assert (run / "hotkey").read_text() == rig.hotkey + "\n"
    assert (run / "boot-token").read_text() in rig.validator.state.boot_tokens

    # boot-status.json: non-secret summary with measurements of our own quote
    status = json.loads(Path(rig.cfg.serve.boot_status_path).read_text())
    assert status["outcome"] == "unlocked"
    q = parse_quote(rig.source.get_quote(bytes(64)))
    assert status["measurements"]["mr_td"] == q.mr_td.hex()
    assert status["measurements"]["rtmr3"] == "00" * 48
    assert status["validator_fields"] == ["boot_token", "key"]
    assert status["root_header"]["label"] == "root-luks"
    stages = [s["stage"] for s in status["stages"]]
    assert stages == ["config", "network", "tee", "client_cert", "nonce", "quote", "self_check", "attestation",
                      "luks_header", "unlock", "cache_key_put", "cache_volume", "handoff"]
    assert all(s["result"] in ("ok", "skipped") for s in status["stages"])
    assert status["timings"]["agent_overhead_ms"] > 0

    # network: the netplan subset became these ip commands and resolv.conf
    assert rig.ip_commands == [
        ["ip", "link", "set", "dev", "enp0s2", "up"],
        ["ip", "addr", "replace", "10.20.30.40/24", "dev", "enp0s2"],
        ["ip", "route", "replace", "default", "via", "10.20.30.1", "dev", "enp0s2"],
    ]
    assert (rig.tmp / "resolv.conf").read_text() == "nameserver 1.1.1.1\nnameserver 8.8.8.8\n"

    # every stage logged as boot.stage and printed on the console
    events = [json.loads(line) for line in rig.logs.getvalue().splitlines() if line.startswith("{")]
    logged = [e["stage"] for e in events if e["event"] == "boot.stage"]
    assert logged == stages
    assert "[unlock" in rig.console.getvalue()
    assert not os.listdir(rig.cfg.boot.header_dir)  # the validated header copy is gone
    assert not os.path.exists(rig.cfg.boot.config_mount)  # config volume unmounted
    rig.assert_no_secret_leaked()


async def test_second_boot_gets_existing_cache_key(rig: BootRig) -> None:
    assert (await rig.run()).ok
    rig.validator.state.events.clear()
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert [e["endpoint"] for e in rig.validator.events if e["endpoint"].startswith("luks")] == ["luks_get"]
    rig.assert_no_secret_leaked()


async def test_unknown_fields_are_tolerated_and_recorded(rig: BootRig) -> None:
    rig.validator.state.response_extras = {"future_field": "ab" * 32}
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.status["validator_fields"] == ["boot_token", "future_field", "key"]
    assert outcome.status["generation"] == "1.2"


async def test_answer_of_another_generation_than_pinned_fails_closed(rig: BootRig) -> None:
    rig.validator.state.response_extras = {"luks_quote_nonce": "ab" * 32, "boot_token": None}
    outcome = await rig.run()
    assert not outcome.ok
    assert "boot.protocol = '1.2' but the validator answered as 1.3" in rig.failure_reason(outcome)
    assert len([e for e in rig.validator.events if e["endpoint"] == "nonce"]) == 1  # final: not retried
    assert "ab" * 32 not in rig.logs.getvalue() and "ab" * 32 not in Path(rig.cfg.serve.boot_status_path).read_text()


async def test_full_boot_with_emulated_configfs_tsm(rig: BootRig) -> None:
    """The production ConfigfsTsmSource, unmodified, against the FUSE configfs-tsm emulator."""
    from agent.evidence.sources import make_quote_source
    from agent.sim.tsm_emulator import mounted_tsm

    with mounted_tsm(str(rig.tmp / "sim")) as (mnt, faults):
        rig.cfg.quote.source = "configfs"
        rig.cfg.quote.configfs_root = mnt
        rig.cfg.quote.tee = "tdx"  # no /dev/tdx_guest here: "auto" would fail closed
        rig.source = make_quote_source(rig.cfg)
        assert rig.source.name != "simulated"
        outcome = await rig.run()
        quotes = faults.quotes_generated
    assert outcome.ok, outcome.reason
    assert quotes == 1
    (att,) = rig.validator.attestations()
    assert att["status"] == 200 and att["cert_hash_match"]
    rig.assert_no_secret_leaked()


async def test_cli_boot_command(rig: BootRig) -> None:
    """``chutes-attest boot --no-poweroff`` as a process, configured only through its config file."""
    import asyncio
    import sys

    b = rig.cfg.boot
    conf = rig.tmp / "agent.toml"
    conf.write_text(f"""
[quote]
source = "simulated"
simulated_state_dir = "{rig.tmp / 'sim'}"
[boot]
validator_url = "{b.validator_url}"
ca_bundle = "{b.ca_bundle}"
network = "initramfs"
config_device = "{b.config_device}"
config_mount = "{b.config_mount}"
root_device = "{b.root_device}"
cache_device = "{b.cache_device}"
header_dir = "{b.header_dir}"
handoff_dir = "{b.handoff_dir}"
kmsg_path = "{b.kmsg_path}"
unlock_action = "test-passphrase"
protocol = "1.2"
legacy_cache_endpoints = true
device_wait_s = 0
format_pbkdf = "pbkdf2"
format_pbkdf_iterations = 1000
[serve]
boot_status_path = "{rig.cfg.serve.boot_status_path}"
""")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "--config", str(conf), "--log-format", "json", "boot", "--no-poweroff",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "WARNING: --no-poweroff" in text
    assert "[unlock        ] ok" in text
    assert (Path(b.handoff_dir) / "vm-name").read_text() == rig.vm_name + "\n"
    for s in rig.secrets():
        assert s not in out and s not in err

    # and a failure: exit code 1 with the marker, no power-off because of --no-poweroff
    rig.validator.inject("attestation", Fault("status", status=404, times=None))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "--config", str(conf), "boot", "--no-poweroff",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1
    assert "TDX-LUKS-UNLOCK-FAILED: attestation: attestation failed after 1 attempt(s)" in err.decode()
    assert "TDX-LUKS-UNLOCK-FAILED: attestation" in Path(b.kmsg_path).read_text()
