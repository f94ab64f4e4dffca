"""CLI: one registry, --help lists every subcommand, config errors exit 2 with the key named."""

from __future__ import annotations

import json
import subprocess
import sys

from agent import cli


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_help_lists_registered_commands() -> None:
    res = run("--help")
    assert res.returncode == 0
    for name in cli.COMMANDS:
        assert name in res.stdout
    assert "Exit codes" in res.stdout


def test_config_show_json_applies_overrides() -> None:
    res = run("--set", "quote.retries=5", "config", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["quote"]["retries"] == 5


def test_config_error_exit_code() -> None:
    res = run("--set", "quote.retries=lots", "config")
    assert res.returncode == cli.EXIT_USAGE
    assert "quote.retries" in res.stderr


def _boot(tmp_path, *args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    conf = tmp_path / "agent.toml"
    conf.write_text(f'[boot]\nvalidator_url = "https://127.0.0.1:9"\nconfig_device = "{tmp_path}/absent.img"\n'
                    f'device_wait_s = 0\nkmsg_path = "{tmp_path}/kmsg"\nhandoff_dir = "{tmp_path}/run"\n')
    env = {**os.environ, **env_extra}
    return run("--config", str(conf), *args, "boot", "--no-poweroff", env=env)


def test_boot_ignores_environment_overrides(tmp_path) -> None:
    """The kernel command line (host-controlled) becomes init's environment: it must not steer the boot."""
    res = _boot(tmp_path, env_extra={"CHUTES_ATTEST_BOOT_VALIDATOR_URL": "http://10.0.0.1:8080",
                                     "CHUTES_ATTEST_BOOT_POWEROFF": "false"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "TDX-LUKS-UNLOCK-FAILED: " in out
    assert "10.0.0.1" not in out and "https://" not in out.split("TDX-LUKS-UNLOCK-FAILED: ")[1].splitlines()[0]


def test_boot_refuses_plain_http_validator(tmp_path) -> None:
    res = _boot(tmp_path, "--set", "boot.validator_url=http://10.0.0.1:8080", env_extra={})
    line = next(x for x in (res.stdout + res.stderr).splitlines() if "TDX-LUKS-UNLOCK-FAILED" in x)
    assert "must be an https:// URL" in line
    assert res.returncode == cli.EXIT_USAGE
