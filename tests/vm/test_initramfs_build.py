"""The initramfs pieces without booting: ELF closure resolution, the staged runtime, the built image's contents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, vmlib

sys.path.insert(0, str(REPO / "initramfs"))
import elf_closure

pytestmark = pytest.mark.integration


def _cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("a C compiler is needed (build-essential, scripts/install-deps.sh)")
    return cc


def test_runpath_origin_and_rpath_inheritance(tmp_path: Path) -> None:
    """$ORIGIN RUNPATH is expanded; an executable's DT_RPATH serves its libraries' lookups (ld.so(8))."""
    cc = _cc()
    (tmp_path / "deep").mkdir()
    (tmp_path / "libs").mkdir()
    (tmp_path / "deep.c").write_text("int deep(void){return 7;}\n")
    (tmp_path / "mid.c").write_text("int deep(void); int mid(void){return deep();}\n")
    (tmp_path / "main.c").write_text("int mid(void); int main(void){return mid()==7?0:1;}\n")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(tmp_path / "deep/libdeep.so"), str(tmp_path / "deep.c")], check=True
    )
    # libmid has no RUNPATH/RPATH of its own: libdeep must be found through main's (inherited) DT_RPATH
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-o",
            str(tmp_path / "libs/libmid.so"),
            str(tmp_path / "mid.c"),
            "-L",
            str(tmp_path / "deep"),
            "-ldeep",
        ],
        check=True,
    )
    subprocess.run(
        [
            cc,
            "-o",
            str(tmp_path / "main"),
            str(tmp_path / "main.c"),
            "-L",
            str(tmp_path / "libs"),
            "-lmid",
            "-Wl,-rpath-link," + str(tmp_path / "deep"),
            "-Wl,--disable-new-dtags",
            "-Wl,-rpath,$ORIGIN/libs:$ORIGIN/deep",
        ],
        check=True,
    )
    assert subprocess.run([str(tmp_path / "main")]).returncode == 0  # the real loader agrees
    info = elf_closure.read_elf(tmp_path / "main")
    assert info.rpath == ("$ORIGIN/libs", "$ORIGIN/deep") and info.runpath == ()
    res = elf_closure.Resolver().closure([tmp_path / "main"])
    assert not res.missing
    names = {p.name: p for p in res.libraries}
    assert names["libmid.so"] == tmp_path / "libs/libmid.so"
    assert names["libdeep.so"] == tmp_path / "deep/libdeep.so"
    assert "libc.so.6" in names

    # with DT_RUNPATH (new dtags) the executable's path is NOT inherited: libdeep is then unresolvable
    subprocess.run(
        [
            cc,
            "-o",
            str(tmp_path / "main2"),
            str(tmp_path / "main.c"),
            "-L",
            str(tmp_path / "libs"),
            "-lmid",
            "-Wl,-rpath-link," + str(tmp_path / "deep"),
            "-Wl,--enable-new-dtags",
            "-Wl,-rpath,$ORIGIN/libs",
        ],
        check=True,
    )
    res2 = elf_closure.Resolver().closure([tmp_path / "main2"])
    assert [(p.name, s) for p, s in res2.missing] == [("libmid.so", "libdeep.so")]


def test_cli_lists_closure_and_fails_on_missing(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "initramfs/elf_closure.py"), "--interp", shutil.which("cryptsetup")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert any(p.endswith("/libcryptsetup.so.12") for p in out)
    assert any(p.endswith("/libdevmapper.so.1.02.1") for p in out)
    assert any("ld-linux-x86-64.so.2" in p for p in out)
    broken = tmp_path / "broken"
    cc = _cc()
    (tmp_path / "x.c").write_text("int x(void){return 1;}\n")
    (tmp_path / "m.c").write_text("int x(void); int main(void){return x();}\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libx.so"), str(tmp_path / "x.c")], check=True)
    subprocess.run([cc, "-o", str(broken), str(tmp_path / "m.c"), "-L", str(tmp_path), "-lx"], check=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "initramfs/elf_closure.py"), str(broken)], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "needed library libx.so not found" in proc.stderr


@pytest.mark.parametrize("python", ["venv-base", "/usr/bin/python3.11"])
def test_staged_runtime_imports_agent_and_is_trimmed(tmp_path: Path, python: str) -> None:
    """Both interpreters (pyenv's/the venv's base and Debian's) run the agent from the trimmed copy."""
    if python != "venv-base" and not Path(python).exists():
        pytest.fail(f"{python} missing (Debian python3.11)")
    args = ["--dest", str(tmp_path), "--with-sim"] + ([] if python == "venv-base" else ["--python", python])
    libs = subprocess.run(
        [str(vmlib.VENV_PY), str(REPO / "initramfs/stage_runtime.py"), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    prefix = tmp_path / "usr/lib/chutes-attest"
    lib = next((prefix / "lib").glob("python3.*"))
    for gone in ("test", "tkinter", "idlelib", "ensurepip", "lib2to3", "pydoc_data", "unittest"):
        assert not (lib / gone).exists(), gone
    assert not list((lib / "lib-dynload").glob("_tkinter*")) and not list((lib / "lib-dynload").glob("_test*"))
    site = prefix / "site"
    for present in ("agent", "aiohttp", "cryptography", "structlog", "multidict", "yarl", "cffi"):
        assert (site / present).is_dir(), present
    for absent in ("pynvml.py", "elftools", "dcap_qvl", "tpm2_pytss", "pytest", "hypothesis", "systemd"):
        assert not (site / absent).exists(), absent
    assert list((site / "agent/quote").glob("_tdxquote*.so"))
    assert any(p.endswith("libssl.so.3") for p in libs)  # _ssl's dependency, listed for copy_file
    py = next((prefix / "bin").glob("python3.*"))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent.cli, aiohttp, structlog, yaml;"
        "import cryptography.hazmat.bindings._rust; from agent.quote import parse_quote;"
        "print(sys.prefix)"
    )
    out = subprocess.run(
        [str(py), "-I", "-S", "-c", code, str(site)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(prefix)  # found its own trimmed stdlib, not the host's
    wrapper = (tmp_path / "usr/bin/chutes-attest").read_text()
    assert "-I -S /usr/lib/chutes-attest/launcher.py" in wrapper


@pytest.mark.vm
def test_built_initramfs_contents() -> None:
    """The image mkinitramfs built through an installed-style CONFDIR holds everything the unlock needs."""
    initrd = vmlib.initramfs(vmlib.agent_toml_stage1())
    listing = set(
        subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True, check=True).stdout.split()
    )
    for need in (
        "usr/bin/chutes-attest",
        "usr/sbin/cryptsetup",
        "usr/sbin/mkfs.ext4",
        "usr/sbin/blkid",
        "usr/lib/chutes-attest/launcher.py",
        "scripts/init-top/chutes-attest",
        "scripts/init-premount/chutes-attest",
        "etc/chutes-attest/agent.toml",
        "etc/chutes-attest/validator-ca.pem",
        "usr/lib/x86_64-linux-gnu/libcryptsetup.so.12",
    ):
        assert need in listing, need
    joined = "\n".join(sorted(listing))
    for pattern in (
        "dm-crypt.ko",
        "algif_skcipher.ko",
        "xts.ko",
        "virtio_net.ko",
        "_rust.abi3.so",
        "agent/quote/_tdxquote",
        "aiohttp/_http_parser",
    ):
        assert pattern in joined, pattern
    # the image's interpreter is Debian's python3.11 from the installed package's root (static libpython)
    for soname in elf_closure.read_elf(Path("/usr/bin/python3.11")).needed:
        if soname.startswith("libpython"):
            assert soname in joined
    for absent in ("/tkinter/", "/idlelib/", "pynvml", "/elftools/", "/site/pytest/", "/lib/python3.11/test/"):
        assert absent not in joined, absent
