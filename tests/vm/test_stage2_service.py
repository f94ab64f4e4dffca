"""Stage 2: attested unlock, then Debian's systemd starts chutes-attest.socket/.service from the unlocked root.

A oneshot unit in the image (guest_check.py) calls the compat and chute sockets, reads the journal and
``systemctl show``, prints ``STAGE2-RESULT:`` lines on the serial console and powers the VM off.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.log import Secret, message_id
from agent.quote import parse_quote
from agent.sim.validator_state import VolumeKeys

from .conftest import FAILED, boot_vm, vmlib

pytestmark = pytest.mark.vm


def _results(text: str) -> dict[str, dict]:
    out = {}
    for line in text.splitlines():
        if "STAGE2-RESULT: " in line:
            r = json.loads(line.split("STAGE2-RESULT: ", 1)[1])
            out[r["check"]] = r
    return out


async def test_service_under_systemd(tmp_path: Path, stage1_images, validator) -> None:
    root = vmlib.root2()
    validator.add_vm(vmlib.HOSTNAME, vmlib.MINER_SS58, Secret(root.passphrase))
    console = await boot_vm(
        tmp_path, stage1_images["initrd"], [root.image, stage1_images["config"]], "stage2", timeout_s=900, append="rw"
    )
    assert FAILED not in console.text, console.text[-3000:]
    assert ("unlock", "ok") in console.stages()
    assert "STAGE2-DONE" in console.text, console.text[-5000:]
    res = _results(console.text)
    diag = "\n".join(dict.fromkeys(console.lines_with("STAGE2-DIAG:")))  # the service's journal on failure
    assert "guest_check_crashed" not in res, f"{res}\nservice journal:\n{diag}"
    expected = [
        "socket_unit",
        "socket_paths",
        "compat_health",
        "compat_tdx_quote",
        "compat_attest",
        "compat_bad_nonce",
        "chute_evidence_doc",
        "chute_evidence_quote",
        "chute_status",
        "service_active_watchdog",
        "run_chutes_namespace",
        "journald_fields",
    ]
    assert sorted(res) == sorted(expected), sorted(res)
    failed = {k: v for k, v in res.items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1) + f"\nservice journal:\n{diag}"
    for check in ("compat_tdx_quote", "compat_attest", "chute_evidence_quote"):
        assert res[check]["nonce_bound"] and res[check]["cert_bound"] and res[check]["signature_ok"]
        assert res[check]["version"] == 4 and not res[check]["debug"]
    svc = res["service_active_watchdog"]
    assert svc["ActiveState"] == "active" and svc["Type"] == "notify" and svc["User"] == "chutes-attest"
    assert svc["WatchdogUSec"] == "30s"
    _assert_run_chutes_private(res["run_chutes_namespace"], {"boot-status.json"})
    jf = res["journald_fields"]
    assert {"MESSAGE_ID", "EVENT", "PRIORITY", "SYSLOG_IDENTIFIER"} <= set(jf["sample_fields"])
    assert jf["sample_message_id"] == message_id(jf["sample_event"])
    assert res["chute_status"]["quote_source"] == "simulated"
    assert "reboot: Power down" in console.text


def _assert_run_chutes_private(ns: dict, binds: set[str]) -> None:
    """/run/chutes 0700 root (§12.6); the service runs as its own unprivileged uid and sees, in its mount
    namespace, only what its unit binds; it reads those and nothing else there, and nothing at all outside."""
    assert ns["ok"], json.dumps(ns, indent=1)
    assert ns["host_mode"] == "0o700" and ns["host_uid"] == 0
    assert ns["service_user_uid"] != 0 and set(ns["service_uids"]) == {str(ns["service_user_uid"])}
    assert set(ns["ns_entries"]) == binds, ns
    assert all(v == "read" for v in ns["service_reads"].values()) and "boot-status.json" in ns["service_reads"]
    assert ns["denied_in_namespace"] and all("No such file" in v for v in ns["denied_in_namespace"].values()), ns
    assert set(ns["denied_outside"]) >= set(ns["denied_in_namespace"]) | set(ns["service_reads"])
    assert all("Permission denied" in v for v in ns["denied_outside"].values()), ns


def _leaf(console) -> x509.Certificate:
    lines = console.lines_with("STAGE2-LEAF-PEM:")
    begin = lines.index("-----BEGIN CERTIFICATE-----")
    end = lines.index("-----END CERTIFICATE-----", begin)
    return x509.load_pem_x509_certificate(("\n".join(lines[begin : end + 1]) + "\n").encode())


async def test_service_with_v14_handoff(tmp_path: Path) -> None:
    """A real 1.4.0 boot hands off the CA-signed proxy leaf; the installed service (User=chutes-attest, in
    tdx-attest) starts with it as its identity, creates no self-signed certificate, and the validator's
    side (here, on the host, as its API client does: the leaf checked against the ``vm_root_ca_cert`` it
    stored at /provision) finds /attest's report_data[32:64] = SHA-256(SPKI of that leaf)."""
    root = vmlib.root2()
    m = vmlib.Measurement.of(root)
    initrd = vmlib.initramfs_v14(m)
    config = vmlib.config_volume(miner=vmlib.miner_ss58_v14(), seed=vmlib.MINER_SEED)
    disk = vmlib.writable_root(root, tmp_path / "root.img")
    keys = {label: secrets.token_hex(64).encode() for label in ("storage", "tdx-cache")}
    vols = [vmlib.storage_disk(label, tmp_path / f"{label}.img", k) for label, k in keys.items()]
    async with vmlib.faithful_validator(tmp_path / "validator", generation="1.4", runtime_rtmr3=m.rtmr3) as v:
        v.add_vm(vmlib.HOSTNAME, vmlib.miner_ss58_v14(), Secret(root.passphrase))
        for label, k in keys.items():
            v.vm(vmlib.HOSTNAME).volumes[label] = VolumeKeys(current=Secret(k))
        console = await boot_vm(tmp_path, initrd, [disk, config, *vols], "stage2-v14", timeout_s=900,
                                append="rw", writable=[disk, *vols])
        assert FAILED not in console.text and "-FAILED:" not in console.text, console.text[-4000:]
        assert "STAGE2-DONE" in console.text, console.text[-5000:]
        res = _results(console.text)
        diag = "\n".join(dict.fromkeys(console.lines_with("STAGE2-DIAG:")))
        failed = {k: r for k, r in res.items() if not r["ok"]}
        assert not failed and "handoff_identity" in res, json.dumps(res, indent=1) + f"\nservice journal:\n{diag}"
        ident = res["handoff_identity"]
        assert ident["cert"] == "/run/chutes/proxy-tls/server.crt" and not ident["self_signed_created"]
        assert ident["key_mode"] == "0o640" and ident["key_gid"] == int((initrd.parent / "tdx-attest.gid").read_text())
        svc = res["service_active_watchdog"]
        assert svc["ActiveState"] == "active" and svc["User"] == "chutes-attest"
        ns = res["run_chutes_namespace"]
        _assert_run_chutes_private(ns, {"boot-status.json", "proxy-tls", "vm-root-ca"})
        assert ns["ns_vm_root_ca"] == ["ca.crt"]
        assert {"proxy-tls/server.key", "proxy-tls/server.crt", "vm-root-ca/ca.crt"} <= set(ns["service_reads"])
        for secret in ("validator-ss58", "validator-auth.env", "registry-tls/client.key", "luks-quote-nonce",
                       "k3s-encryption-config.yaml", "hotkey"):
            assert secret in ns["denied_in_namespace"], (secret, ns)
        for check in ("compat_tdx_quote", "compat_attest", "chute_evidence_quote"):
            assert res[check]["nonce_bound"] and res[check]["cert_bound"] and res[check]["signature_ok"]

        # validator side: the leaf must chain to the CA stored at /provision ...
        ca = v.stored_ca(vmlib.HOSTNAME)
        assert ca is not None
        leaf = _leaf(console)
        ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(),
                               leaf.signature_hash_algorithm)
        assert leaf.issuer == ca.subject
        # ... and /attest's quote must be bound to the nonce it sent and to that leaf's key
        att = json.loads(console.lines_with("STAGE2-ATTEST:")[0])
        q = parse_quote(base64.b64decode(att["tdx_quote"], validate=True))
        assert q.version == 4  # its signature is checked in the guest (signature_ok above: the image's sim PKI)
        spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        rd = bytes(q.report_data)
        assert rd[:32].hex() == att["nonce"]
        assert rd[32:64] == hashlib.sha256(spki).digest()
        assert v.key_state(vmlib.HOSTNAME)["root"] == "rotated"
    assert "reboot: Power down" in console.text
