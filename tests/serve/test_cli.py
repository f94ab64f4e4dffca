"""``chutes-attest evidence`` and ``chutes-attest doctor`` as real subprocesses."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.serve.helpers import REPO, make_cfg, report_data_of, spki_sha256_of, toml_for
from tests.serve.proc import NotifyListener, spawn, stop


def cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(conf), "--log-level", "error", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))


def write_conf(short_tmp: Path, sim_dir: Path, **kw) -> tuple[Path, object]:
    cfg = make_cfg(short_tmp, sim_dir, **kw)
    conf = short_tmp / "cli.toml"
    conf.write_text(toml_for(cfg))
    return conf, cfg


def test_evidence_json_matches_v1_evidence_binding(short_tmp: Path, sim_dir: Path) -> None:
    conf, cfg = write_conf(short_tmp, sim_dir)
    nonce = secrets.token_hex(32)
    r = cli(conf, "evidence", "--nonce", nonce, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"tee", "nonce", "report_data", "quote_version", "quote", "gpu_evidence", "certificate",
                        "tpm"}
    assert doc["tee"] == "tdx"
    spki = spki_sha256_of(cfg.serve.cert_path)  # created on first use, like serve does
    assert report_data_of(base64.b64decode(doc["quote"])) == bytes.fromhex(nonce) + spki
    assert len(doc["gpu_evidence"]) == 2
    assert doc["certificate"] == Path(cfg.serve.cert_path).read_text()


def test_evidence_text_output(short_tmp: Path, sim_dir: Path) -> None:
    conf, _ = write_conf(short_tmp, sim_dir)
    nonce = secrets.token_hex(32)
    r = cli(conf, "evidence", "--nonce", nonce)
    assert r.returncode == 0, r.stderr
    assert f"nonce        {nonce}" in r.stdout and "gpu evidence 2 item(s)" in r.stdout


def test_evidence_bad_input_exit_codes(short_tmp: Path, sim_dir: Path) -> None:
    conf, _ = write_conf(short_tmp, sim_dir)
    r = cli(conf, "evidence", "--nonce", "abc")
    assert r.returncode == 4 and "nonce: expected 64 hex characters" in r.stderr
    r = cli(conf, "evidence", "--nonce", "ab" * 32, "--gpu-ids", "bogus")
    assert r.returncode == 4 and "gpu_ids" in r.stderr
    r = cli(conf, "evidence", "--nonce", "ab" * 32, "--gpu-ids", "f" * 32)
    assert r.returncode == 4 and "no GPU with id" in r.stderr


def test_evidence_unavailable_source(short_tmp: Path, sim_dir: Path) -> None:
    conf, _ = write_conf(short_tmp, sim_dir)
    r = cli(conf, "--set", "quote.source=configfs", "--set", "quote.tee=tdx",
            "--set", f"quote.configfs_root={short_tmp}/none/report",
            "--set", "quote.retries=0", "evidence", "--nonce", "ab" * 32)
    assert r.returncode == 5, r.stderr
    assert r.stderr.startswith("chutes-attest evidence: ")


def test_doctor_reports_each_check(short_tmp: Path, sim_dir: Path) -> None:
    conf, cfg = write_conf(short_tmp, sim_dir)
    notify = NotifyListener(short_tmp / "n.sock")
    proc = spawn(cfg, short_tmp, env={"NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY=1")
        r = cli(conf, "doctor", "--json")
        text = cli(conf, "doctor")
    finally:
        stop(proc)
        notify.close()
    doc = json.loads(r.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert list(checks) == ["tee", "tdx_guest", "tsm", "quote", "nvml", "cc_mode", "tpm", "service_cert",
                            "compat_socket", "chute_socket", "service_load"]
    # quote.source=simulated, quote.tee=auto: the simulated TDX source, said so
    assert checks["tee"]["status"] == "warn" and "Intel TDX" in checks["tee"]["detail"]
    assert checks["tpm"]["status"] == "skip"  # tpm.mode=off in these tests
    if not Path("/dev/tdx_guest").exists():  # this machine: not a TDX guest
        assert checks["tdx_guest"]["status"] == "fail" and r.returncode == 5 and doc["ok"] is False
    assert checks["tsm"]["status"] == "warn" and "simulated" in checks["tsm"]["detail"]
    assert checks["quote"]["status"] == "warn" and "SIMULATED" in checks["quote"]["detail"]
    assert checks["nvml"]["status"] == "warn" and "2 GPU(s)" in checks["nvml"]["detail"]
    assert checks["cc_mode"]["status"] == "ok"
    assert checks["service_cert"]["status"] == "ok"
    assert checks["compat_socket"]["status"] == "ok" and checks["chute_socket"]["status"] == "ok"
    # node-wide figures (every caller) come from the compat socket; the service answered the two health checks
    load = checks["service_load"]
    assert load["status"] == "ok", load
    assert "requests (0 5xx)" in load["detail"] and "rint nonces 0/65536" in load["detail"]
    assert int(load["detail"].split(" requests")[0]) >= 2
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 11 and lines[1].split()[:2] == [checks["tdx_guest"]["status"].upper(), "tdx_guest"]


def test_doctor_sockets_missing(short_tmp: Path, sim_dir: Path) -> None:
    conf, _ = write_conf(short_tmp, sim_dir)
    r = cli(conf, "doctor", "--json", "--skip-quote")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert r.returncode == 5
    assert checks["quote"]["status"] == "skip"
    assert checks["compat_socket"]["status"] == "fail" and "missing" in checks["compat_socket"]["detail"]
    assert checks["service_cert"]["status"] == "fail"


def test_doctor_node_summary_flags_refused_v5_and_failures() -> None:
    from agent.commands.doctor import summarize_node_status

    doc = {"counters": {"requests": {"compat /attest 200": 5, "compat /attest 503": 2, "chute /v1/status 200": 1},
                        "rate_limited": {"evidence": 1, "nonce": 0, "relay": 3},
                        "quotes": {"ok": 5, "failed": 0, "v5_refused": 2},
                        "connections": {"compat": {"open": 1, "refused": 4}, "chute": {"open": 2, "refused": 0}}},
           "rint": {"live_nonces": 7, "cap": 65536, "refused_full": 0}, "queue": {"depth": 3}}
    verdict, line = summarize_node_status(doc)
    assert verdict == "warn"
    assert line == ("8 requests (2 5xx), rate-limited 4, quotes ok 5 failed 0 v5-refused 2, queue depth 3, "
                    "rint nonces 7/65536, connections open 3 refused 4")
    doc["counters"]["quotes"]["v5_refused"] = 0
    assert summarize_node_status(doc)[0] == "ok"
