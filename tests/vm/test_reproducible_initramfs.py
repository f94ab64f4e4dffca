"""The initramfs is byte-reproducible: two builds from the same package, kernel and configuration, in
different temporary roots, from different working directories, at different wall-clock times, give the
same SHA-384 of the whole compressed image (what RTMR2 measures). On a difference, compare the two
images with diffoscope (Debian package `diffoscope`): `diffoscope a/initrd.img b/initrd.img`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import vmlib

pytestmark = pytest.mark.vm


def _sha384(path: Path) -> str:
    return hashlib.sha384(path.read_bytes()).hexdigest()


def test_initramfs_twice_identical_sha384(tmp_path: Path) -> None:
    toml = vmlib.agent_toml_stage1()
    deb = tmp_path / vmlib.package().name  # one package for all builds (the checkout may change meanwhile)
    shutil.copy2(vmlib.package(), deb)
    one, two = tmp_path / "one" / "initrd.img", tmp_path / "two" / "initrd.img"
    cwd_one = tmp_path / "cwd-one"
    cwd_one.mkdir()
    vmlib.build_initramfs(one, toml, True, tmp_path / "work-one", cwd=cwd_one, deb=deb)
    time.sleep(1.5)  # the builds take minutes anyway; never the same second
    work_two = Path(tempfile.mkdtemp(prefix="chutes-repro-", dir="/var/tmp"))
    vmlib.build_initramfs(two, toml, True, work_two / "elsewhere", cwd=Path("/"), deb=deb)
    h1, h2 = _sha384(one), _sha384(two)
    print(f"\ninitramfs SHA-384 build 1: {h1}\ninitramfs SHA-384 build 2: {h2}\nsize {one.stat().st_size} B")
    (vmlib.CACHE / "logs").mkdir(parents=True, exist_ok=True)
    (vmlib.CACHE / "logs" / "reproducible-initramfs.txt").write_text(f"{h1}\n{h2}\n{one.stat().st_size}\n")
    assert h1 == h2, f"initramfs differs between builds: diffoscope {one} {two}"

    # it is the real thing: the agent is in it, as bytecode recording in-image paths and fixed mtimes
    unpacked = tmp_path / "unpacked"
    subprocess.run(["unmkinitramfs", str(one), str(unpacked)], check=True)
    root = unpacked / "main" if (unpacked / "main").is_dir() else unpacked
    cli_pyc = root / "usr/lib/chutes-attest/site/agent/cli.pyc"
    data = cli_pyc.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 0b01  # PEP 552 flags: hash-based, unchecked
    assert b"/usr/lib/chutes-attest/site/agent/cli.py" in data
    for f in (root / "usr/lib/chutes-attest").rglob("*"):
        if f.is_file():
            assert b"mkinitramfs_" not in f.read_bytes(), f  # no staging path leaked
    assert os.lstat(cli_pyc).st_mtime == vmlib.SOURCE_DATE_EPOCH

    # and the value is sensitive to what it measures: another SOURCE_DATE_EPOCH is another image
    three = tmp_path / "three" / "initrd.img"
    vmlib.build_initramfs(three, toml, True, tmp_path / "work-three", epoch=vmlib.SOURCE_DATE_EPOCH + 86400,
                          deb=deb)
    assert _sha384(three) != h1
