"""``chutes-attest devices`` as a subprocess against the explicitly configured NVML emulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from agent.sim.fake_nvml import simulated_gpus

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["uuid", "name", "memory", "major", "minor", "clock_rate", "ecc", "model_short_ref"]


def _run(
    tmp_path: Path, *args: str, emulate: str | None = "h100x4", config: str = "",
) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUTES_ATTEST_")}
    env["CHUTES_ATTEST_CONFIG"] = str(cfg)
    if emulate is not None:
        env["CHUTES_ATTEST_GPU_EMULATE"] = emulate
    return subprocess.run([sys.executable, "-m", "agent.cli", "--log-format", "json", "devices", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_devices_json(tmp_path):
    p = _run(tmp_path, "--json")
    assert p.returncode == 0, p.stderr
    devs = json.loads(p.stdout)
    expected = [g.uuid[4:].replace("-", "") for g in simulated_gpus(4, "h100")]
    assert [d["uuid"] for d in devs] == expected
    for d in devs:
        assert list(d) == FIELDS
        assert (d["name"], d["memory"], d["major"], d["minor"], d["clock_rate"], d["ecc"], d["model_short_ref"]) == (
            "NVIDIA H100 80GB HBM3", 85520809984, 9, 0, 1980000.0, True, "hbm3")
    assert "gpu.emulated" in p.stderr  # emulation is never silent


def test_devices_filter_and_bad_ids(tmp_path):
    uuids = [g.uuid for g in simulated_gpus(4, "h100")]
    p = _run(tmp_path, "--json", "--gpu-ids", f"{uuids[3]},{uuids[1][4:]}")
    assert p.returncode == 0, p.stderr
    assert [d["uuid"] for d in json.loads(p.stdout)] == [uuids[1][4:].replace("-", ""), uuids[3][4:].replace("-", "")]
    p = _run(tmp_path, "--json", "--gpu-ids", "not-a-uuid")
    assert p.returncode == 4 and "'not-a-uuid' is not a GPU UUID" in p.stderr and p.stdout == ""
    p = _run(tmp_path, "--json", "--gpu-ids", "GPU-d52bd152-0847-8ba8-ca49-e07ec1f002e6")
    assert p.returncode == 4 and "no GPU with id d52bd15208478ba8ca49e07ec1f002e6" in p.stderr


def test_devices_table(tmp_path):
    p = _run(tmp_path, emulate="b200x2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("UUID") and len(lines) == 3 and "NVIDIA B200" in lines[1]


def test_bad_emulate_value_is_a_usage_error(tmp_path):
    p = _run(tmp_path, "--json", emulate="h100x0")
    assert p.returncode == 2 and "gpu.emulate" in p.stderr


def test_without_emulation_nvml_is_unavailable(tmp_path):
    missing = tmp_path / "libnvidia-ml.so.1"  # the real loader path, pointed at a library that is not there
    p = _run(tmp_path, "--json", emulate=None, config=f'[gpu]\nnvml_library = "{missing}"\n')
    assert p.returncode == 5 and "libnvidia-ml.so.1" in p.stderr
