"""What the initramfs must carry, per configuration (agent.commands.initramfs_files, `config initramfs-files`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.commands.initramfs_files import required_files


def _files(toml: str, tmp_path: Path) -> dict[str, tuple[str, str]]:
    f = tmp_path / "agent.toml"
    f.write_text(toml)
    cfg = config_mod.load(f, environ={})
    return {x.key: (x.kind, x.path) for x in required_files(cfg, str(f))}


def test_defaults_need_everything_every_generation_reads(tmp_path: Path) -> None:
    """boot.protocol = "auto": the validator may answer as any generation, so the image needs all of it."""
    assert _files("", tmp_path) == {
        "boot.ca_bundle": ("file", "/etc/ssl/certs/ca-certificates.crt"),
        "boot.cryptsetup": ("program", "cryptsetup"),
        "boot.measure_conf": ("file", "/etc/tdx-measure.conf"),
        "boot.rtmr3_manifest": ("file", "/etc/tdx-rtmr3-expected-hashes"),
        "boot.storage_mkfs": ("program", "mkfs.xfs"),
        "boot.signing_root_key": ("file", "/etc/chutes/root-signing-key.pem"),
        "boot.proxy_tls_group": ("group", "tdx-attest"),
    }


def test_per_generation_and_switches(tmp_path: Path) -> None:
    only = {"boot.ca_bundle", "boot.cryptsetup"}
    assert set(_files('[boot]\nprotocol = "1.2"\n', tmp_path)) == only
    v13 = _files('[boot]\nprotocol = "1.3"\n', tmp_path)
    assert set(v13) == only | {"boot.measure_conf", "boot.rtmr3_manifest", "boot.storage_mkfs"}
    # rtmr3_chain = false: no list, no manifest; test-passphrase: storage volumes are never formatted
    off = _files('[boot]\nrtmr3_chain = false\nunlock_action = "test-passphrase"\n', tmp_path)
    assert set(off) == only | {"boot.signing_root_key", "boot.proxy_tls_group"}


def test_scheme_names_and_configured_paths(tmp_path: Path) -> None:
    nxt = _files('[boot]\nrtmr3_scheme = "next"\n', tmp_path)
    assert nxt["boot.measure_conf"] == ("file", "/etc/tee-measure.conf")
    assert nxt["boot.rtmr3_manifest"] == ("file", "/etc/rootfs-manifest")
    own = _files('[boot]\nca_bundle = "/etc/v/ca.pem"\nmeasure_conf = "/etc/m.conf"\nrtmr3_manifest = "/etc/m.sha"\n'
                 'signing_root_key = "/etc/k.pem"\nstorage_mkfs = "/usr/sbin/mkfs.ext4"\nproxy_tls_group = "g"\n'
                 'cryptsetup = "/usr/sbin/cryptsetup"\n', tmp_path)
    assert own == {
        "boot.ca_bundle": ("file", "/etc/v/ca.pem"),
        "boot.cryptsetup": ("program", "/usr/sbin/cryptsetup"),
        "boot.measure_conf": ("file", "/etc/m.conf"),
        "boot.rtmr3_manifest": ("file", "/etc/m.sha"),
        "boot.storage_mkfs": ("program", "/usr/sbin/mkfs.ext4"),
        "boot.signing_root_key": ("file", "/etc/k.pem"),
        "boot.proxy_tls_group": ("group", "g"),
    }
    # an empty ca_bundle means the system bundle, for the boot and for the image
    assert _files('[boot]\nca_bundle = ""\n', tmp_path)["boot.ca_bundle"][1] == "/etc/ssl/certs/ca-certificates.crt"


def test_hints_name_key_config_and_remedy(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text("")
    hints = {x.key: x.hint for x in required_files(config_mod.load(f, environ={}), str(f))}
    assert hints["boot.ca_bundle"] == f"install ca-certificates or set boot.ca_bundle in {f}"
    assert "install xfsprogs" in hints["boot.storage_mkfs"]
    assert f"set boot.signing_root_key in {f}" in hints["boot.signing_root_key"]
    assert 'boot.protocol = "1.2"' in hints["boot.measure_conf"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})


def test_cli_lines_are_the_hooks_format_and_ignore_environment(tmp_path: Path) -> None:
    """key<TAB>kind<TAB>path<TAB>hint; the boot ignores CHUTES_ATTEST_* (and the image gets no --set), so
    the list does too: it describes the boot under the file alone."""
    f = tmp_path / "agent.toml"
    f.write_text('[boot]\nprotocol = "1.2"\nca_bundle = "/etc/v/ca.pem"\n')
    p = _cli("--config", str(f), "config", "initramfs-files", "--config-name", "THE TOML",
             env={"CHUTES_ATTEST_BOOT_CA_BUNDLE": "/elsewhere.pem", "CHUTES_ATTEST_BOOT_PROTOCOL": "auto"})
    assert p.returncode == 0, p.stderr
    rows = [line.split("\t") for line in p.stdout.splitlines()]
    assert [r[:3] for r in rows] == [["boot.ca_bundle", "file", "/etc/v/ca.pem"],
                                     ["boot.cryptsetup", "program", "cryptsetup"]]
    assert all(len(r) == 4 for r in rows) and rows[0][3].endswith("set boot.ca_bundle in THE TOML")
    j = _cli("--config", str(f), "config", "initramfs-files", "--json")
    assert [x["key"] for x in json.loads(j.stdout)] == ["boot.ca_bundle", "boot.cryptsetup"]
    # plain `config` is unchanged
    assert json.loads(_cli("--config", str(f), "config", "--json").stdout)["boot"]["protocol"] == "1.2"


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[boot]\nno_such_key = 1\n')
    p = _cli("--config", str(f), "config", "initramfs-files")
    assert p.returncode == 2 and "boot.no_such_key" in p.stderr


@pytest.mark.parametrize("bad", ["a\tb", "a\nb"])
def test_a_tab_or_newline_cannot_break_a_line(tmp_path: Path, bad: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(f"[boot]\nca_bundle = {json.dumps(bad)}\n")
    with pytest.raises(ValueError, match="tab or newline"):
        [x.line() for x in required_files(config_mod.load(f, environ={}), "x")]
