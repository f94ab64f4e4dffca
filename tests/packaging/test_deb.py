"""The Debian package as scripts/build-deb.sh builds it: lintian-clean, the promised contents, the locked
dependency set, no build paths, a working command (integration tier: dpkg-buildpackage, network to PyPI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run([str(REPO / "scripts/build-deb.sh"), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # includes lintian's verdict
    return Path(proc.stdout.strip().splitlines()[-1])


def _contents(deb: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return {line.split()[5].removeprefix("."): line.split()[0] for line in out.splitlines()}


def test_contents_and_metadata(deb: Path, tmp_path: Path) -> None:
    files = _contents(deb)
    for path, mode in {
        "/usr/bin/chutes-attest": "-rwxr-xr-x",
        "/lib/systemd/system/chutes-attest.socket": "-rw-r--r--",
        "/lib/systemd/system/chutes-attest.service": "-rw-r--r--",
        "/usr/lib/sysusers.d/chutes-attest.conf": "-rw-r--r--",
        "/usr/lib/tmpfiles.d/chutes-attest.conf": "-rw-r--r--",
        "/usr/share/initramfs-tools/hooks/chutes-attest": "-rwxr-xr-x",
        "/usr/share/initramfs-tools/scripts/init-top/chutes-attest": "-rwxr-xr-x",
        "/usr/share/initramfs-tools/scripts/init-premount/chutes-attest": "-rwxr-xr-x",
        "/usr/share/chutes-attest/initramfs/stage_runtime.py": "-rw-r--r--",
        "/etc/chutes-attest/agent.toml": "-rw-r--r--",
        "/usr/share/man/man8/chutes-attest.8.gz": "-rw-r--r--",
        "/usr/share/doc/chutes-attest/README.md.gz": "-rw-r--r--",
    }.items():
        assert files.get(path) == mode, (path, files.get(path))
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]  # bytecode: postinst's job
    ctl = tmp_path / "ctl"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(ctl)], check=True)
    assert (ctl / "conffiles").read_text().split() == [
        "/etc/chutes-attest/agent.toml", "/etc/initramfs-tools/chutes-attest.conf"]
    postinst = (ctl / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    assert "deb-systemd-helper enable 'chutes-attest.socket'" in postinst
    # the service is never enabled on its own (only re-enabled if the admin had enabled it)
    before = postinst.split("was-enabled 'chutes-attest.service'")[0]
    assert "deb-systemd-helper enable 'chutes-attest.service'" not in before
    assert "rm -rf /var/lib/chutes-attest" in (ctl / "postrm").read_text()
    assert "activate-noawait update-initramfs" in (ctl / "triggers").read_text()


def test_private_tree_is_the_lock_and_runs(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    site = root / "usr/lib/chutes-attest/lib/python3.11/site-packages"
    names = [d.name.removesuffix(".dist-info").rsplit("-", 1) for d in site.glob("*.dist-info")]
    installed = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in names}
    pins = re.finditer(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", (REPO / "requirements/runtime.txt").read_text(), re.M)
    lock = {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2] for m in pins}
    assert installed.pop("chutes-attest-agent")
    assert installed == lock  # exactly the locked set, nothing more, nothing less
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            assert b"/tmp/chutes-attest-deb." not in data, f  # no build path anywhere
    # the packaged interpreter runs the CLI from the extracted tree (its python symlink is absolute)
    py = root / "usr/lib/chutes-attest/bin/python3.11"
    assert py.is_symlink() and str(py.readlink()).endswith("bin/python3.11")
    proc = subprocess.run(["/usr/bin/python3.11", "-I", "-c",
                           f"import sys; sys.path.insert(0, {str(site)!r}); from agent.cli import main;"
                           "sys.exit(main(['measure', '--help']))"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--initrd-arg" in proc.stdout, proc.stderr
    man = subprocess.run(["zcat", str(root / "usr/share/man/man8/chutes-attest.8.gz")], capture_output=True,
                         text=True, check=True).stdout
    assert ".TH CHUTES-ATTEST 8" in man and ".SH CHUTES-ATTEST MEASURE" in man and "--initrd-arg" in man
