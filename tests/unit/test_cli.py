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
