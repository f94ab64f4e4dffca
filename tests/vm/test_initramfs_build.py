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
    # the config is pinned to ≤1.2: the hook copied what that generation reads (the CA bundle above), no
    # RTMR3 list, manifest or signing root (agent.commands.initramfs_files)
    for absent in ("etc/tdx-measure.conf", "etc/tdx-rtmr3-expected-hashes", "etc/chutes/root-signing-key.pem"):
        assert absent not in listing, absent


# ----------------------------------------------- what the boot reads: in the image, or no image


def _hook_env(tmp_path: Path, toml: str, extra: str = "") -> tuple[Path, dict[str, str]]:
    """A CONFDIR + DESTDIR for running the hook the way mkinitramfs does (hook-functions, DESTDIR, CONFDIR)."""
    if not Path("/usr/share/initramfs-tools/hook-functions").exists():
        pytest.fail("initramfs-tools is needed (scripts/install-deps.sh)")
    (tmp_path / "agent.toml").write_text(toml)
    conf = tmp_path / "confdir"
    conf.mkdir(exist_ok=True)
    (conf / "chutes-attest.conf").write_text(
        f"CHUTES_ATTEST_INITRAMFS=yes\nCHUTES_ATTEST_BUILD_PYTHON={vmlib.VENV_PY}\n"
        f"CHUTES_ATTEST_AGENT_TOML={tmp_path / 'agent.toml'}\n{extra}")
    dest = tmp_path / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    return dest, {"DESTDIR": str(dest), "CONFDIR": str(conf), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                  "verbose": "n"}


def test_hook_refuses_an_image_without_what_the_boot_reads(tmp_path: Path) -> None:
    """The hook, run as mkinitramfs runs it, on a config naming files this root lacks: one line per missing
    thing (config key, path, how to provide it), then exit 1 before anything is staged. A file present but
    shipped through CHUTES_ATTEST_EXTRA_TREE is refused too: what the agent requires comes from the root."""
    present = tmp_path / "present.conf"
    present.write_text("/etc\n")
    toml = (f'[boot]\nca_bundle = "{tmp_path}/no-such-ca.pem"\nmeasure_conf = "{present}"\n'
            f'rtmr3_manifest = "{tmp_path}/no-such-manifest"\nsigning_root_key = "{tmp_path}/no-such-key.pem"\n'
            f'storage_mkfs = "mkfs.no-such-fs"\nproxy_tls_group = "no-such-group-x"\n')
    dest, env = _hook_env(tmp_path, toml)
    p = subprocess.run(["sh", str(REPO / "initramfs/hooks/chutes-attest")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr
    where = tmp_path / "agent.toml"
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("chutes-attest hook: ")]
    assert lines[0] == (f"chutes-attest hook: boot.ca_bundle = {tmp_path}/no-such-ca.pem: not found in the image "
                        f"root; put the validator's CA bundle (PEM) there or set boot.ca_bundle in {where}")
    for key, path, what in (("boot.rtmr3_manifest", f"{tmp_path}/no-such-manifest", "not found in the image root"),
                            ("boot.signing_root_key", f"{tmp_path}/no-such-key.pem", "not found in the image root"),
                            ("boot.storage_mkfs", "mkfs.no-such-fs", "no such program in the image root"),
                            ("boot.proxy_tls_group", "no-such-group-x",
                             "no such group in the image root's /etc/group")):
        line = next((ln for ln in lines if ln.startswith(f"chutes-attest hook: {key} = {path}: {what}; ")), None)
        assert line is not None and f"set {key} in {where}" in line, (key, lines)
    assert not any("boot.measure_conf" in ln or "boot.cryptsetup" in ln for ln in lines), lines  # those exist
    assert lines[-1].startswith("chutes-attest hook: 5 of what the boot under") and lines[-1].endswith("not building")
    assert list(dest.iterdir()) == []  # refused before staging anything

    # everything present, but the list travels in the extra tree: refused as well
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    extra = tmp_path / "extra"
    (extra / str(present).lstrip("/")).parent.mkdir(parents=True)
    (extra / str(present).lstrip("/")).write_text("/usr\n")
    toml = (f'[boot]\nprotocol = "1.3"\nca_bundle = "{ca}"\nmeasure_conf = "{present}"\nrtmr3_manifest = "{ca}"\n'
            'storage_mkfs = "mkfs.ext4"\n')
    dest, env = _hook_env(tmp_path, toml, f"CHUTES_ATTEST_EXTRA_TREE={extra}\n")
    p = subprocess.run(["sh", str(REPO / "initramfs/hooks/chutes-attest")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1, p.stderr
    assert (f"chutes-attest hook: boot.measure_conf = {present}: CHUTES_ATTEST_EXTRA_TREE ({extra}) holds it, but "
            "what the agent requires must come from the image root: remove it there") in p.stderr, p.stderr
    assert "1 of what the boot under" in p.stderr and list(dest.iterdir()) == []


def _production_toml() -> str:
    """A production-shaped baked config: the defaults (protocol auto, configfs quotes, the system CA bundle,
    the 1.4 scheme's list and manifest names, the signing root key), ext4 for first-use storage volumes
    (the test root has no xfsprogs)."""
    return '[boot]\nroot_device = "/dev/vda"\nstorage_mkfs = "mkfs.ext4"\n'


@pytest.mark.vm
def test_package_only_image_carries_what_the_boot_reads_or_is_not_built(tmp_path: Path) -> None:
    """An image built only from the package (`apt-get install ./…deb`, the hook enabled, `update-initramfs`),
    no extra tree and no simulation: first with a root lacking what the config needs (update-initramfs fails,
    naming each key and path), then with the files in the root (the image holds exactly those, byte for
    byte, plus the tdx-attest group entry with the root's gid)."""
    work = tmp_path / "work"
    tree = work / "root"
    vmlib.installed_tree(tree)
    try:
        vmlib.configure_initramfs_tree(tree, _production_toml(), sim=False)
        conf = (tree / "etc/initramfs-tools/chutes-attest.conf").read_text()
        assert "CHUTES_ATTEST_EXTRA_TREE=" not in conf.replace("#CHUTES_ATTEST_EXTRA_TREE=", "")
        assert "CHUTES_ATTEST_WITH_SIM=yes" not in conf
        failed = vmlib.update_initramfs(tree, None, check=False)
        assert failed.returncode != 0
        toml = "/root/vm-initramfs/agent.toml"
        assert ("chutes-attest hook: boot.ca_bundle = /etc/ssl/certs/ca-certificates.crt: not found in the image "
                f"root; install ca-certificates or set boot.ca_bundle in {toml}") in failed.stderr, failed.stderr
        for key, path in (("boot.measure_conf", "/etc/tdx-measure.conf"),
                          ("boot.rtmr3_manifest", "/etc/tdx-rtmr3-expected-hashes"),
                          ("boot.signing_root_key", "/etc/chutes/root-signing-key.pem")):
            assert f"chutes-attest hook: {key} = {path}: not found in the image root; " in failed.stderr, key
        assert "boot.proxy_tls_group" not in failed.stderr  # the package's sysusers.d made it in this root
        assert "4 of what the boot under /root/vm-initramfs/agent.toml reads missing" in failed.stderr
        assert not list((tree / "boot").glob("initrd.img-*"))

        files = {
            "/etc/ssl/certs/ca-certificates.crt": (vmlib.tls() / "ca.pem").read_bytes(),
            "/etc/tdx-measure.conf": b"/etc\n/etc/default/rtmr3-verify\n",
            "/etc/tdx-rtmr3-expected-hashes": b"# none checked\n",
            "/etc/chutes/root-signing-key.pem": vmlib.signing_root().public_pem,
        }
        for path, data in files.items():
            (tree / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tree / path.lstrip("/")).write_bytes(data)
        initrd = tmp_path / "out" / "initrd.img"
        vmlib.update_initramfs(tree, initrd)
        gid = (initrd.parent / "tdx-attest.gid").read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    unpacked = tmp_path / "unpacked"
    subprocess.run(["unmkinitramfs", str(initrd), str(unpacked)], check=True)
    root = unpacked / "main" if (unpacked / "main").is_dir() else unpacked
    for path, data in files.items():
        assert (root / path.lstrip("/")).read_bytes() == data, path
    assert (root / "etc/chutes-attest/agent.toml").read_text() == _production_toml()
    assert f"tdx-attest:x:{gid}:" in (root / "etc/group").read_text().splitlines()
    assert (root / "usr/sbin/cryptsetup").is_file() and (root / "usr/sbin/mkfs.ext4").is_file()
    # nothing the config does not name, and no test-only part
    assert not (root / "etc/chutes-attest/validator-ca.pem").exists()  # in the root, but not what it names
    assert not (root / "etc/chutes-attest/sim").exists() and not (root / "usr/lib/chutes-vm-test").exists()
    assert not list(root.glob("usr/lib/chutes-attest/site/agent/sim"))
