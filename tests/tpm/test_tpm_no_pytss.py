"""The agent without the ``tpm`` extra: tpm2-pytss blocked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PRELUDE = """
import json, sys
sys.modules["tpm2_pytss"] = None  # import tpm2_pytss -> ImportError, as when the extra is absent
from agent import log
log.configure(level="debug", fmt="json")
from agent.config import AgentConfig
from agent.evidence import tpm
from agent.evidence.base import EvidenceError
cfg = AgentConfig()
cfg.tpm.event_log = ""
"""


def _run(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + body], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_auto_mode_with_a_device_but_no_pytss_is_none_with_a_logged_reason(tmp_path: Path) -> None:
    device = tmp_path / "tpmrm0"
    device.write_bytes(b"")  # a "device" exists, so auto mode would use it
    res = _run(f"""
tpm.DEVICE_PATH = {str(device)!r}
print("RESULT", json.dumps([tpm.collect_tpm_evidence(cfg, b"n" * 32), tpm.tpm_status(cfg)]))
""")
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    evidence, status = json.loads(line[len("RESULT "):])
    assert evidence is None
    assert status["present"] is False and status["pytss"] is False
    assert status["tcti"] == f"device:{device}" and "tpm2-pytss not installed" in status["error"]
    events = [json.loads(x) for x in res.stderr.splitlines() if x.startswith("{")]
    warn = [e for e in events if e.get("event") == "tpm.unavailable"]
    assert warn and "tpm2-pytss not installed" in warn[0]["reason"]
    assert "Traceback" not in res.stderr


def test_explicit_tcti_without_pytss_is_a_clear_error() -> None:
    res = _run("""
cfg.tpm.tcti = "swtpm:host=127.0.0.1,port=2321"
try:
    tpm.collect_tpm_evidence(cfg, b"n" * 32)
except tpm.TpmError as exc:
    print("ERROR", isinstance(exc, EvidenceError), exc)
""")
    assert res.returncode == 0, res.stderr
    assert ("ERROR True tpm.tcti is set (swtpm:host=127.0.0.1,port=2321) but tpm2-pytss is not installed "
            "(install the 'tpm' extra)") in res.stdout


def test_self_check_runs_without_pytss() -> None:
    """The verifier parses TPM structures itself: a validator does not need the TPM extra."""
    res = _run("""
from agent.evidence.tpm_verify import verify_tpm_evidence
r = verify_tpm_evidence({"attest": "AAAA", "signature": "AAAA", "pcrs": {}, "ak_public": ""}, b"n")
print("RESULT", r.ok, r.checks[0].detail)
""")
    assert res.returncode == 0, res.stderr
    assert "RESULT False pcrs: expected a non-empty object of banks" in res.stdout
