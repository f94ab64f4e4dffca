"""Every command agrees on exit codes (README "Exit codes"): 2 configuration, 4 malformed input, 5 missing device;
``serve``'s start failures too (5 a socket or certificate problem, 2 a configuration problem).

Each case runs the real ``chutes-attest`` entry point in a subprocess with a config file of its own, so the
machine's /etc/chutes-attest and environment cannot change the answer.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

NONCE = "ab" * 32


def write_service_cert(tmp_path: Path) -> None:
    """A real certificate at serve.cert_path, so `quote get` fails only on what a test injects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.certs import self_signed

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, "exit-code-test", dt.timedelta(days=1))
    (tmp_path / "svc.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "svc.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "svc.key").chmod(0o600)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    write_service_cert(tmp_path)
    if not cfg.exists():
        cfg.write_text(f'[serve]\ncert_path = "{tmp_path}/svc.crt"\nkey_path = "{tmp_path}/svc.key"\n'
                       f'handoff_cert_path = "{tmp_path}/no/server.crt"\n'
                       f'handoff_key_path = "{tmp_path}/no/server.key"\n'
                       f'vm_root_ca_path = "{tmp_path}/no/ca.crt"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def commands(tmp_path: Path) -> dict[str, list[str]]:
    """One valid invocation per command (so only the injected fault can fail it)."""
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "etc" / "f").write_text("x")
    (tmp_path / "k").write_bytes(b"MZ")
    (tmp_path / "i").write_bytes(b"initrd")
    return {
        "quote parse": ["quote", "parse", str(tmp_path / "k")],
        "quote get": ["quote", "get", "--nonce", NONCE],
        "evidence": ["evidence", "--nonce", NONCE],
        "devices": ["devices"],
        "doctor": ["doctor", "--skip-quote"],
        "rtmr3 predict": ["rtmr3", "predict", "--root", str(tmp_path / "root"), "--paths", "/etc"],
        "measure": ["measure", "--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "i"), "--cmdline", "x"],
        "config": ["config"],
    }


@pytest.mark.parametrize("name", ["quote parse", "quote get", "evidence", "devices", "doctor", "rtmr3 predict",
                                  "measure", "config"])
def test_unknown_config_key_exits_2_everywhere(tmp_path: Path, name: str) -> None:
    argv = commands(tmp_path)[name]
    p = run(tmp_path, "--set", "boot.no_such_key=1", *argv)
    assert p.returncode == 2, p.stderr
    assert "boot.no_such_key" in p.stderr


@pytest.mark.parametrize("name", ["devices", "evidence"])
def test_bad_gpu_emulate_is_a_config_error_in_every_command(tmp_path: Path, name: str) -> None:
    """The issue's example: a bad gpu.emulate used to exit 2 from devices but 1 from evidence."""
    argv = commands(tmp_path)[name]
    p = run(tmp_path, "--set", "gpu.emulate=bogus", "--set", "quote.source=simulated",
            "--set", f"quote.simulated_state_dir={tmp_path}/sim", *argv)
    assert p.returncode == 2, p.stderr
    assert "gpu.emulate" in p.stderr or "bogus" in p.stderr


@pytest.mark.parametrize(("argv", "needle"), [
    (["quote", "parse", "-"], "malformed"),
    (["quote", "get", "--nonce", "zz"], "nonce"),
    (["evidence", "--nonce", "zz"], "nonce"),
    (["devices", "--gpu-ids", "not-a-gpu-id"], "not-a-gpu-id"),
])
def test_malformed_input_exits_4(tmp_path: Path, argv: list[str], needle: str) -> None:
    sim = ["--set", "quote.source=simulated", "--set", f"quote.simulated_state_dir={tmp_path}/sim",
           "--set", "gpu.emulate=h100x2"]
    cfg = tmp_path / "agent.toml"
    write_service_cert(tmp_path)
    cfg.write_text(f'[serve]\ncert_path = "{tmp_path}/svc.crt"\n')
    p = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(cfg), *sim, *argv],
                       input="garbage", capture_output=True, text=True, timeout=120, check=False,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 4, p.stderr
    assert needle in p.stderr


def test_measure_of_a_non_kernel_exits_4(tmp_path: Path) -> None:
    p = run(tmp_path, *commands(tmp_path)["measure"])
    assert p.returncode == 4, p.stderr


@pytest.mark.parametrize(("argv", "settings"), [
    (["quote", "get", "--nonce", NONCE], ["quote.configfs_root=/nonexistent/tsm/report"]),
    (["devices"], ["gpu.nvml_library=/nonexistent/libnvidia-ml.so.1"]),
    (["evidence", "--nonce", NONCE], ["quote.configfs_root=/nonexistent/tsm/report", "gpu.enabled=false"]),
])
def test_missing_device_exits_5(tmp_path: Path, argv: list[str], settings: list[str]) -> None:
    sets = [x for s in settings for x in ("--set", s)]
    (tmp_path / "svc.crt").parent.mkdir(exist_ok=True)
    p = run(tmp_path, *sets, *argv)
    assert p.returncode == 5, p.stdout + p.stderr


# -- serve start failures: the code of their error's class, a clear stderr line, never ready ---------------

@pytest.fixture
def serve_tmp() -> Iterator[Path]:
    """A short directory (unix socket paths stay under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="ec-") as d:
        yield Path(d)


def serve_config(tmp: Path) -> Path:
    """A serve configuration that starts on any machine: simulated quotes, no GPUs, sockets under ``tmp``."""
    cfg = tmp / "agent.toml"
    cfg.write_text(f'[quote]\nsource = "simulated"\nsimulated_state_dir = "{tmp}/sim"\nretries = 0\n'
                   f'[gpu]\nenabled = false\n[tpm]\nmode = "off"\n'
                   f'[serve]\ncompat_socket = "{tmp}/compat/a.sock"\nchute_socket = "{tmp}/chute/c.sock"\n'
                   f'cert_path = "{tmp}/certs/svc.crt"\nkey_path = "{tmp}/certs/svc.key"\n'
                   f'handoff_cert_path = "{tmp}/no/server.crt"\nhandoff_key_path = "{tmp}/no/server.key"\n'
                   f'vm_root_ca_path = "{tmp}/no/ca.crt"\nboot_status_path = "{tmp}/boot-status.json"\n'
                   f'watchdog = false\n')
    return cfg


def serve(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``chutes-attest serve``; a start failure must end it (the timeout is only a backstop)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp)}
    return subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(serve_config(tmp)),
                           "--log-format", "json", *args, "serve"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def cli_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one line ``cli.main`` prints for the error (log lines are JSON)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("chutes-attest serve: ")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return lines[0]


def _occupied_by_a_file(tmp: Path) -> str:
    (tmp / "compat").mkdir()
    (tmp / "compat" / "a.sock").write_text("not a socket")
    return f"{tmp}/compat/a.sock: exists and is not a socket"


def _directory_is_a_file(tmp: Path) -> str:
    (tmp / "chute").write_text("a file where the socket's directory should be")
    return f"{tmp}/chute"


def _garbage_certificate(tmp: Path) -> str:
    (tmp / "certs").mkdir()
    (tmp / "certs" / "svc.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp / "certs" / "svc.key").write_text("not a key")
    return f"service certificate {tmp}/certs/svc.crt"


def _unreadable_certificate(tmp: Path) -> str:
    (tmp / "certs" / "svc.crt").mkdir(parents=True)  # unreadable even for root, unlike a mode
    (tmp / "certs" / "svc.key").write_text("")
    return f"service certificate {tmp}/certs/svc.crt"


def _key_of_another_certificate(tmp: Path) -> str:
    write_service_cert(tmp)
    (tmp / "certs").mkdir()
    (tmp / "svc.crt").rename(tmp / "certs" / "svc.crt")
    other = tmp / "other"
    other.mkdir()
    write_service_cert(other)
    (other / "svc.key").rename(tmp / "certs" / "svc.key")
    return "does not match certificate"


@pytest.mark.parametrize("fault", [_occupied_by_a_file, _directory_is_a_file, _garbage_certificate,
                                   _unreadable_certificate, _key_of_another_certificate],
                         ids=lambda f: f.__name__.strip("_"))
def test_serve_socket_or_certificate_problem_exits_5(serve_tmp: Path, fault: Callable[[Path], str]) -> None:
    needle = fault(serve_tmp)
    p = serve(serve_tmp)
    assert p.returncode == 5, p.stderr
    assert needle in cli_line(p)
    assert '"serve.start_failed"' in p.stderr  # the journal says it too
    assert not (serve_tmp / "chute" / "c.sock").exists() or (serve_tmp / "chute").is_file()


@pytest.mark.parametrize(("settings", "needle"), [
    (["serve.socket_mode=0o7777"], "serve.socket_mode"),
    (["serve.no_such_key=1"], "serve.no_such_key"),
    (["gpu.enabled=true", "gpu.emulate=bogus"], "gpu.emulate"),  # found at start-up, not while loading
])
def test_serve_configuration_problem_exits_2(serve_tmp: Path, settings: list[str], needle: str) -> None:
    p = serve(serve_tmp, *[x for s in settings for x in ("--set", s)])
    assert p.returncode == 2, p.stderr
    assert needle in cli_line(p)
    assert not (serve_tmp / "compat" / "a.sock").exists()


def test_serve_failed_self_check_exits_5(serve_tmp: Path) -> None:
    p = serve(serve_tmp, "--set", "quote.source=configfs", "--set", "quote.tee=tdx",  # pinned: no device probe
              "--set", f"quote.configfs_root={serve_tmp}/no-tsm/report")
    assert p.returncode == 5, p.stderr
    assert "self-check quote" in cli_line(p)
    assert not (serve_tmp / "compat" / "a.sock").exists()
