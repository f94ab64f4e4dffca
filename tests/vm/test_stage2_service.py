"""Stage 2: attested unlock, then Debian's systemd starts chutes-attest.socket/.service from the unlocked root.

A oneshot unit in the image (guest_check.py) calls the compat and chute sockets, reads the journal and
``systemctl show``, prints ``STAGE2-RESULT:`` lines on the serial console and powers the VM off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.log import Secret, message_id

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
    jf = res["journald_fields"]
    assert {"MESSAGE_ID", "EVENT", "PRIORITY", "SYSLOG_IDENTIFIER"} <= set(jf["sample_fields"])
    assert jf["sample_message_id"] == message_id(jf["sample_event"])
    assert res["chute_status"]["quote_source"] == "simulated"
    assert "reboot: Power down" in console.text
