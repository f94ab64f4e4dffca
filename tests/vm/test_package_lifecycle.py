"""The .deb's life in a Debian root: install (postinst: user, dirs, socket enabled, bytecode), the command
works, `apt remove` keeps the operator's config and the service's state, `apt purge` removes what the
package and its service created and leaves the system user (Debian practice)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import vmlib

pytestmark = pytest.mark.vm

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def _in(tree: Path, *argv: str) -> str:
    proc = subprocess.run(["chroot", str(tree), *argv], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def test_install_remove_purge(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    vmlib.installed_tree(tree)
    etc = tree / "etc"
    with vmlib._mounts(tree):
        assert _in(tree, "chutes-attest", "--version").strip().startswith("chutes-attest ")
        cfg = _in(tree, "chutes-attest", "config", "--json")
    assert '"source": "configfs"' in cfg  # the shipped example config is all comments: defaults
    assert (etc / "systemd/system/sockets.target.wants/chutes-attest.socket").is_symlink()
    assert not (etc / "systemd/system/multi-user.target.wants/chutes-attest.service").exists()
    passwd = (etc / "passwd").read_text()
    assert "\nchutes-attest:" in "\n" + passwd
    uid = int(next(ln for ln in passwd.splitlines() if ln.startswith("chutes-attest:")).split(":")[2])
    assert (etc / "attestation-service/certs").stat().st_uid == uid  # tmpfiles ran
    assert (etc / "chutes-attest").stat().st_mode & 0o777 == 0o750
    site = tree / "usr/lib/chutes-attest/lib/python3.11/site-packages"
    assert list((site / "agent/__pycache__").glob("cli.*.pyc"))  # postinst compiled the bytecode
    assert (etc / "initramfs-tools/chutes-attest.conf").read_text().count("CHUTES_ATTEST_INITRAMFS=no") == 1

    # the operator edits the config; the service made its certificate and state
    (etc / "chutes-attest/agent.toml").write_text('[quote]\nsource = "simulated"\n')
    (etc / "attestation-service/certs/server.crt").write_text("cert")
    (etc / "attestation-service/certs/server.key").write_text("key")
    (tree / "var/lib/chutes-attest").mkdir(exist_ok=True)
    (tree / "var/lib/chutes-attest/state").write_text("x")

    with vmlib._mounts(tree):
        _in(tree, "apt-get", "remove", "-y", "-q", "chutes-attest")
    assert not (tree / "usr/lib/chutes-attest").exists()  # bytecode too (prerm)
    assert not (tree / "usr/bin/chutes-attest").exists()
    assert (etc / "chutes-attest/agent.toml").read_text() == '[quote]\nsource = "simulated"\n'
    assert (etc / "attestation-service/certs/server.key").exists()
    assert (tree / "var/lib/chutes-attest/state").exists()

    with vmlib._mounts(tree):
        _in(tree, "apt-get", "purge", "-y", "-q", "chutes-attest")
    for gone in ("etc/chutes-attest", "etc/initramfs-tools/chutes-attest.conf", "etc/attestation-service",
                 "var/lib/chutes-attest", "etc/systemd/system/sockets.target.wants/chutes-attest.socket"):
        assert not (tree / gone).exists() and not (tree / gone).is_symlink(), gone
    assert "\nchutes-attest:" in "\n" + (etc / "passwd").read_text()  # the system user stays
