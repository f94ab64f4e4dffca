"""vTPM evidence reaches the chute API and doctor; compat routes are unaffected by a TPM."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.evidence.tpm_verify import verify_tpm_evidence
from agent.serve.server import Service
from agent.sim.swtpm import Swtpm
from tests.serve.helpers import make_cfg, toml_for, unix_client

pytestmark = pytest.mark.integration


async def test_v1_evidence_carries_tpm_evidence_that_self_checks(swtpm: Swtpm, tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tpm-svc-", dir="/tmp") as short:
        cfg = make_cfg(Path(short), tmp_path / "sim", tpm__mode="auto", tpm__tcti=swtpm.tcti,
                       tpm__event_log=str(tmp_path / "none"))
        svc = Service(cfg)
        await svc.start()
        try:
            nonce = secrets.token_hex(32)
            async with unix_client(cfg.serve.chute_socket) as s, s.get(f"http://l/v1/evidence?nonce={nonce}") as r:
                assert r.status == 200
                body = await r.json()
            tpm_ev = body["tpm"]
            assert tpm_ev is not None and tpm_ev["ek_certificate"]
            assert verify_tpm_evidence(tpm_ev, bytes.fromhex(nonce)).ok
            assert not verify_tpm_evidence(tpm_ev, bytes.fromhex(secrets.token_hex(32))).ok
            async with unix_client(cfg.serve.compat_socket) as s, s.get(f"http://l/attest?nonce={nonce}") as r:
                assert r.status == 200
                assert set(await r.json()) == {"tdx_quote", "nvtrust_evidence"}
        finally:
            await svc.stop()


def test_doctor_reports_tpm(swtpm: Swtpm, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, tmp_path / "sim", tpm__mode="auto", tpm__tcti=swtpm.tcti)
    conf = tmp_path / "agent.toml"
    conf.write_text(toml_for(cfg))
    from agent.evidence import tpm

    tpm.close_session()  # swtpm serves one client at a time; let the doctor process connect
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(conf), "doctor", "--skip-quote", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.stdout, res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["tpm"]["status"] == "ok", checks["tpm"]
    assert "EK certificate present" in checks["tpm"]["detail"]
    res = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(conf), "--set", "tpm.mode=off",
                          "doctor", "--skip-quote", "--json"], capture_output=True, text=True, timeout=120)
    assert {c["name"]: c for c in json.loads(res.stdout)["checks"]}["tpm"]["status"] == "skip"
