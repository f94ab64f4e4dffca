"""VM test images and the qemu runner, built from Debian packages only and cached by input hash.

Everything lives under ``.cache/vm/`` (``$CHUTES_ATTEST_VM_CACHE``), one directory per artifact named
``<kind>-<hash of its inputs>``; a build goes to a temporary directory and is renamed into place, so an
interrupted build never poisons the cache. Artifacts:

- ``sim-state``: the simulated quote PKI (the VM's quotes chain to its root; the validator trusts it);
- ``tls``: a CA and a server certificate for the validator's TLS terminator (SAN 10.0.2.2, 127.0.0.1);
- ``deb``: the package, built by ``scripts/build-deb.sh`` from this checkout;
- ``initramfs``: the package installed with ``apt-get install ./chutes-attest_*.deb`` into the Debian root,
  its hook enabled in /etc/initramfs-tools/chutes-attest.conf, then ``update-initramfs -c`` in that root
  (host kernel modules bind-mounted read-only; fixed SOURCE_DATE_EPOCH: the image is byte-reproducible);
- ``root1``: stage-1 root (busybox + its ELF closure, a marker, an init that reports and powers off),
  ext4 made offline with ``mkfs.ext4 -d`` and encrypted offline with ``cryptsetup reencrypt --encrypt``;
- ``config``: the ``tdx-config`` volume (hostname, miner-ss58, network-config.yaml);
- ``debian``: a bookworm root tarball from mmdebstrap (systemd, python3.11, initramfs-tools) and ``root2``:
  that root with the package installed the same way (postinst: sysusers, tmpfiles, socket enabled) plus
  the test's agent.toml and e2e check unit, as a LUKS2 disk.

A new boot generation/protocol is one more ``agent_toml_stage1(**boot)`` (its [boot] keys) handed to
:func:`initramfs`: each configuration is its own cached image. Generation 1.4.0: :func:`initramfs_v14` (the
validator's cvm/api fronts on CVM_PORT/API_PORT, the root's RTMR3 registration (:class:`Measurement`, made
with each root) and the signing root baked in, FUSE configfs-tsm + RTMR emulators started from a test-only
init-top script), ``config_volume(seed=MINER_SEED)``, :func:`writable_root` (token 15, a copy the guest
writes), :func:`storage_disk` (LUKS2 ``storage``/``tdx-cache``), ``faithful_validator(generation="1.4")``.

Command line: ``python scripts/vm/vmlib.py build`` builds (or finds) everything and prints the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CHUTES_ATTEST_VM_CACHE", str(REPO / ".cache" / "vm")))
VENV_PY = Path(os.environ.get("CHUTES_ATTEST_VENV", str(REPO / ".venv"))) / "bin" / "python"
sys.path.insert(0, str(REPO / "initramfs"))
from elf_closure import Resolver  # noqa: E402

#: The validator as the guest sees it: slirp maps 10.0.2.2 to the host's loopback. The port is fixed
#: because it is baked into the initramfs config (a per-run port would rebuild the image every run).
VALIDATOR_PORT = int(os.environ.get("CHUTES_ATTEST_VM_VALIDATOR_PORT", "47443"))
VALIDATOR_URL = f"https://10.0.2.2:{VALIDATOR_PORT}"
HOSTNAME = "chutes-vm-e2e"
MINER_SS58 = "5DAAnrj7VHTznn2AWBemMuyBwZWs6FNFjdyVXUeYum3PTXFy"
NETWORK_YAML = """\
network:
  version: 2
  ethernets:
    nic0:
      match:
        name: "en*"
      addresses: [10.0.2.15/24]
      routes:
        - to: default
          via: 10.0.2.2
      nameservers:
        addresses: [10.0.2.3]
"""
BUSYBOX_APPLETS = ("sh", "cat", "mount", "stat", "poweroff", "echo", "awk", "sha256sum", "ls", "sleep", "find",
                   "sort", "tr")
#: 1.4.0 runs: the validator's mTLS (cvm) and public API fronts, fixed like VALIDATOR_PORT (baked in).
CVM_PORT = VALIDATOR_PORT + 1
API_PORT = VALIDATOR_PORT + 2
#: 1.4.0 runs: the miner seed on the config volume (RFC 8032 test 1 secret; sr25519-expanded by the agent).
MINER_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
#: 1.4.0 runs: the stage-1 root's measured-path list (/etc/tdx-measure.conf), shaped like Chutes' own
#: (chutes-vm-generations.md §12.1): comments, overlapping entries (a directory and a file or directory under
#: it again: measured twice on 1.4.0), paths absent on purpose (their reappearance changes RTMR3).
STAGE1_MEASURE_CONF = """\
# /etc/tdx-measure.conf: what the RTMR3 rootfs chain measures (test image, shaped like Chutes' 1.4.0 list)
/sbin
/sbin/init        # named again under /sbin: extended twice
/usr/bin          # busybox (the applets are symlinks: not measured)
/usr
/marker

# absent on purpose, as in Chutes' list: their reappearance would change RTMR3
/etc/default/rtmr3-verify
/etc/ld.so.preload
"""
#: 1.4.0 runs: the stage-2 (Debian) root's measured-path list.
STAGE2_MEASURE_CONF = """\
# /etc/tdx-measure.conf (test image): the Debian root's configuration, the agent's unit among it
/etc
/etc/hostname      # again: extended twice
/etc/chutes-attest # a directory under /etc, again
/marker
/etc/default/rtmr3-verify   # absent on purpose
"""
#: The independent stand-in for Chutes' manifest generator (tests/vm; stdlib only, not the agent's code).
ROOTFS_MANIFEST_SCRIPT = REPO / "tests/vm/chutes_rootfs_manifest.py"
#: In the 1.4.0 test initramfs: where guest_emulators.py mounts the configfs-tsm and RTMR emulators.
EMU_BASE = "/run/tdx-emu"


# --------------------------------------------------------------------------------------------- cache


def kernel_version() -> str:
    """Newest kernel with both a vmlinuz in /boot and modules (linux-image-amd64)."""
    env = os.environ.get("CHUTES_ATTEST_VM_KVER")
    if env:
        return env
    kvers = sorted(
        p.name[len("vmlinuz-") :]
        for p in Path("/boot").glob("vmlinuz-*")
        if (Path("/lib/modules") / p.name[len("vmlinuz-") :]).is_dir()
    )
    if not kvers:
        raise RuntimeError("no kernel: install linux-image-amd64 (scripts/install-deps.sh)")
    return kvers[-1]


def digest(*parts: object, builder: bool = True) -> str:
    """Hash of strings/bytes and files or directory trees (paths + contents); with ``builder`` this
    module's own source is part of it, so a change in how an image is made rebuilds it."""
    h = hashlib.sha256(Path(__file__).read_bytes() if builder else b"")
    for part in parts:
        if isinstance(part, Path):
            files = (
                [part]
                if part.is_file()
                else sorted(p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            )
            for f in files:
                h.update(str(f.relative_to(part) if f != part else f.name).encode() + b"\0")
                h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x01")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".lock-{name}", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def cached(kind: str, key: str, build: Callable[[Path], None], keep: int = 2) -> Path:
    """``CACHE/<kind>-<key>``, built by ``build(tmpdir)`` when missing; older builds of a kind pruned."""
    final = CACHE / f"{kind}-{key}"
    with _lock(kind):
        if (final / ".done").exists():
            return final
        tmp = CACHE / f".{kind}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        build(tmp)
        (tmp / ".done").write_text(f"{time.monotonic() - t0:.1f}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        olds = sorted((p for p in CACHE.glob(f"{kind}-*") if p != final), key=lambda p: p.stat().st_mtime)
        for old in olds[: max(0, len(olds) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run(check=True), with captured stderr quoted in the error."""
    try:
        return subprocess.run(argv, check=True, **kw)
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise RuntimeError(f"{' '.join(argv)}: exit {exc.returncode}\n{err[-2000:]}") from None


def _nice(argv: list[str]) -> list[str]:
    return ["nice", "-n", "10", *argv]


# ---------------------------------------------------------------------------------- keys and certs


def sim_state() -> Path:
    """Simulated quote PKI state dir (baked into the initramfs; the validator trusts its root)."""

    def build(out: Path) -> None:
        _run(
            [
                str(VENV_PY),
                "-c",
                "import sys; from agent.sim.quote_sim import load_or_create_sim_pki as f; f(sys.argv[1])",
                str(out / "state"),
            ],
            cwd=REPO,
        )

    return cached("sim-state", digest("v1"), build, keep=1) / "state"


def tls() -> Path:
    """CA + server cert/key for the validator's TLS terminator: ca.pem, server.pem, server.key."""

    def build(out: Path) -> None:
        import datetime as dt
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = dt.datetime.now(dt.UTC)
        life = (now - dt.timedelta(days=1), now + dt.timedelta(days=3650))

        def cert(subject: str, issuer: x509.Name | None, pub, signer, ca: bool, san=None) -> x509.Certificate:
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
            b = x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(pub)
            b = b.serial_number(x509.random_serial_number()).not_valid_before(life[0]).not_valid_after(life[1])
            b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            if san is not None:
                b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
            return b.sign(signer, hashes.SHA256())

        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = cert("chutes-attest VM test CA", None, ca_key.public_key(), ca_key, True)
        ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("10.0.2.2", "127.0.0.1")]
        srv = cert("10.0.2.2", ca.subject, key.public_key(), ca_key, False, [*ips, x509.DNSName("localhost")])
        pem = serialization.Encoding.PEM
        (out / "ca.pem").write_bytes(ca.public_bytes(pem))
        (out / "server.pem").write_bytes(srv.public_bytes(pem))
        raw = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _write_secret(out / "server.key", raw)

    return cached("tls", digest("v1"), build, keep=1)


# ------------------------------------------------------------------------------------------ initramfs


def agent_toml_stage1(**boot: object) -> str:
    """The agent config baked into the test initramfs (quote source explicitly simulated). Pinned to the ≤1.2
    generation the stage-1/2 roots are registered for: the image then needs no RTMR3 list, manifest or
    signing root (the hook requires exactly what the pinned generation reads)."""
    settings = {
        "validator_url": VALIDATOR_URL,
        "protocol": "1.2",
        "ca_bundle": VALIDATOR_CA_PATH,
        "network": "static",
        "root_device": "/dev/vda",
        "root_mapper": "root",
        "cache_enabled": False,
        "max_attempts": 3,
        "total_timeout_s": 120.0,
        "request_timeout_s": 20.0,
        "backoff_s": 1.0,
        "backoff_max_s": 2.0,
        "device_wait_s": 20.0,
        "poweroff": True,
    }
    settings.update(boot)
    lines = [
        "[log]",
        'level = "info"',
        'format = "json"',
        "",
        "[quote]",
        'source = "simulated"',
        'simulated_state_dir = "/etc/chutes-attest/sim"',
        "",
        "[gpu]",
        "enabled = false",
        "",
        "[boot]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


#: Where the test configs put the validator's CA bundle (boot.ca_bundle): a file of the image root.
VALIDATOR_CA_PATH = "/etc/chutes-attest/validator-ca.pem"


def initramfs(
    agent_toml: str, with_agent: bool = True, *, root_files: dict[str, bytes] | None = None, emulators: bool = False
) -> Path:
    """The test initramfs (``initrd.img`` in the returned dir): the built package installed into the Debian
    root, the hook enabled in its /etc/initramfs-tools/chutes-attest.conf, ``update-initramfs -c`` in that
    root (what an image builder does). The boot generation/protocol under test travels in ``agent_toml``
    (see :func:`agent_toml_stage1`, :func:`agent_toml_v14`), so another generation is another cached image.
    ``root_files`` (path → bytes) are written into that root, as an image build provides them (the validator
    CA bundle at :data:`VALIDATOR_CA_PATH` always): the hook copies what the baked config needs from there.
    The extra tree holds test-only additions alone: the simulated quote PKI and, with ``emulators``, the
    FUSE emulators of configfs-tsm and the RTMR sysfs (tests/vm/guest_emulators.py, started from init-top).
    The directory also holds ``tdx-attest.gid``: the group's gid in the root the image was built from."""
    sim, certs = sim_state(), tls()
    deb = package()
    files = sorted((root_files or {}).items())
    files_key = json.dumps([(k, hashlib.sha256(v).hexdigest()) for k, v in files])
    emu_files = [EMULATOR_INIT_TOP, EMULATOR_INIT_BOTTOM, REPO / "tests/vm/guest_emulators.py", _fusepy(), _LIBFUSE]
    emu_key = emu_files if emulators else []
    key = digest(agent_toml, sim, certs / "ca.pem", with_agent, deb.parent.name, debian_base().parent.name,
                 kernel_version(), SOURCE_DATE_EPOCH, files_key, *emu_key)

    def build(out: Path) -> None:
        build_initramfs(out / "initrd.img", agent_toml, with_agent, out / "work", deb=deb,
                        root_files=dict(files), emulators=emulators)

    # keep 4: a session uses three agent images at once (≤1.2, 1.4.0 for root1, 1.4.0 for root2); with keep=2 the
    # third build pruned the first while a session fixture still held its path
    return cached("initramfs" if with_agent else "initramfs-plain", key, build, keep=4) / "initrd.img"


def build_initramfs(
    dest: Path,
    agent_toml: str,
    with_agent: bool,
    work: Path,
    cwd: Path | None = None,
    epoch: int | None = None,
    deb: Path | None = None,
    root_files: dict[str, bytes] | None = None,
    emulators: bool = False,
    sim: bool = True,
) -> None:
    """Uncached: install the package (``deb``, default :func:`package`) into a fresh root under ``work`` and
    build ``dest`` with update-initramfs there (``cwd``: the directory it runs from; ``epoch``:
    SOURCE_DATE_EPOCH; the rest: :func:`configure_initramfs_tree`)."""
    tree = work / "root"
    installed_tree(tree, deb)
    try:
        configure_initramfs_tree(tree, agent_toml, with_agent, root_files, emulators=emulators, sim=sim)
        update_initramfs(tree, dest, cwd=cwd, epoch=epoch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def configure_initramfs_tree(
    tree: Path, agent_toml: str, with_agent: bool = True, root_files: dict[str, bytes] | None = None, *,
    emulators: bool = False, sim: bool = True, conf_extra: dict[str, str] | None = None,
) -> None:
    """An installed root (:func:`installed_tree`) made ready for update-initramfs, as an image build does it:
    ``root_files`` (path → bytes; the validator CA bundle at :data:`VALIDATOR_CA_PATH` always) written into
    the root, the hook enabled in its /etc/initramfs-tools/chutes-attest.conf with ``agent_toml`` baked.
    ``sim``: the test-only extras (the simulated quote PKI, agent/sim and, with ``emulators``, the FUSE
    emulators) through CHUTES_ATTEST_EXTRA_TREE; ``sim=False``: no extra tree at all. ``conf_extra``: more
    lines for chutes-attest.conf (they come last, so they win)."""
    vm = tree / "root/vm-initramfs"
    vm.mkdir(parents=True, exist_ok=True)
    (vm / "agent.toml").write_text(agent_toml)
    files = {VALIDATOR_CA_PATH: (tls() / "ca.pem").read_bytes(), **(root_files or {})}
    for path, data in files.items():  # what the image build puts into its root
        f = tree / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    settings = {
        "CHUTES_ATTEST_INITRAMFS": "yes" if with_agent else "no",
        "CHUTES_ATTEST_AGENT_TOML": "/root/vm-initramfs/agent.toml",
    }
    if sim:  # test-only extras: the simulated quote PKI (the emulators' too), the emulators themselves
        (vm / "extra/etc/chutes-attest").mkdir(parents=True, exist_ok=True)
        shutil.copytree(sim_state(), vm / "extra/etc/chutes-attest/sim", dirs_exist_ok=True)
        if emulators:
            _add_emulators(tree, vm / "extra")
        settings.update(CHUTES_ATTEST_EXTRA_TREE="/root/vm-initramfs/extra", CHUTES_ATTEST_WITH_SIM="yes")
    settings.update(conf_extra or {})
    conf = tree / "etc/initramfs-tools/chutes-attest.conf"
    conf.write_text(conf.read_text() + "".join(f"{k}={v}\n" for k, v in settings.items()))


def update_initramfs(tree: Path, dest: Path | None, cwd: Path | None = None, epoch: int | None = None,
                     check: bool = True) -> subprocess.CompletedProcess:
    """``update-initramfs -c`` in ``tree`` (host kernel modules bind-mounted read-only), the image copied to
    ``dest``, the root's tdx-attest gid next to it (``tdx-attest.gid``). A failed build raises RuntimeError
    with the tail of its stderr (the hook's messages); ``check=False``: returned instead (stderr as text),
    and the image is copied only when it was built."""
    kver = kernel_version()
    shutil.copy2(f"/boot/config-{kver}", tree / "boot" / f"config-{kver}")
    (tree / "lib/modules" / kver).mkdir(parents=True, exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH if epoch is None else epoch)}
    argv = ["chroot", str(tree), "update-initramfs", "-c", "-k", kver]
    with _mounts(tree, (Path("/lib/modules") / kver, Path("lib/modules") / kver)):
        proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode and check:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    if proc.returncode == 0 and dest is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / "boot" / f"initrd.img-{kver}", dest)
        groups = [ln.split(":") for ln in (tree / "etc/group").read_text().splitlines()]
        gid = next((g[2] for g in groups if g[0] == "tdx-attest"), "")
        (dest.parent / "tdx-attest.gid").write_text(gid)
    return proc


# ------------------------------------------------------------------------------------------- disks


def copy_elf_with_closure(binary: Path, root: Path) -> None:
    """Copy ``binary`` and its pyelftools-resolved libraries (+ ld.so) into ``root`` at the same paths."""
    res = Resolver().closure([binary])
    if res.missing:
        raise RuntimeError(f"{binary}: missing libraries {res.missing}")

    def merged(p: Path) -> Path:
        parts = p.parts
        return Path("/usr", *parts[1:]) if len(parts) > 1 and parts[1] in ("bin", "lib", "lib64", "sbin") else p

    for src in [binary, *res.libraries, *res.interpreters]:
        real, link = merged(src.resolve()), merged(src)
        dst = root / str(real).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(real, dst)
        ldst = root / str(link).lstrip("/")
        if link != real and not ldst.exists() and not ldst.is_symlink():
            ldst.parent.mkdir(parents=True, exist_ok=True)
            ldst.symlink_to(os.path.relpath(real, link.parent))


def stage1_tree(tree: Path, marker: str) -> None:
    """Tiny root: busybox, a marker, and an init that proves it runs from the unlocked disk."""
    for d in ("proc", "sys", "dev", "run", "tmp", "sbin", "etc"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    # usr-merged like Debian: /bin, /lib, /lib64 point into /usr
    (tree / "usr/bin").mkdir(parents=True)
    for d in ("bin", "lib", "lib64"):
        (tree / "usr" / d).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tree / d, ignore_errors=True)
        (tree / d).symlink_to(f"usr/{d}")
    copy_elf_with_closure(Path("/usr/bin/busybox"), tree)
    for applet in BUSYBOX_APPLETS:
        (tree / "usr/bin" / applet).symlink_to("busybox")
    (tree / "marker").write_text(marker + "\n")
    init = tree / "sbin/init"
    init.write_text(STAGE1_INIT)
    init.chmod(0o755)


STAGE1_INIT = """\
#!/bin/sh
# Stage-1 root init: report what the initramfs handed over, then power off.
export PATH=/usr/bin:/bin
mount -t proc proc /proc 2>/dev/null
echo "STAGE1-ROOT: $(awk '$2 == "/" {print $1}' /proc/mounts)"
echo "STAGE1-MARKER: $(cat /marker)"
for f in /run/chutes/vm-name /run/chutes/hotkey /run/chutes/boot-token; do
    echo "STAGE1-STAT: $(stat -c '%n mode=%a uid=%u size=%s' "$f" 2>&1)"
done
echo "STAGE1-VMNAME: $(cat /run/chutes/vm-name 2>&1)"
echo "STAGE1-HOTKEY: $(cat /run/chutes/hotkey 2>&1)"
echo "STAGE1-BOOT-TOKEN-SHA256: $(sha256sum /run/chutes/boot-token 2>&1 | awk '{print $1}')"
# the whole hand-off (1.4.0: CA, leaves, validator auth ...), the boot status, the opened volumes
find /run/chutes | sort | while read -r f; do echo "STAGE1-FILE: $(stat -c '%n %F mode=%a uid=%u gid=%g' "$f")"; done
echo "STAGE1-MAPPER: $(ls /dev/mapper | sort | tr '\\n' ' ')"
[ -f /run/chutes/boot-status.json ] && echo "STAGE1-BOOT-STATUS: $(tr -d '\\n' < /run/chutes/boot-status.json)"
for f in /run/chutes/proxy-tls/server.crt /run/chutes/vm-root-ca/ca.crt; do
    [ -f "$f" ] && awk -v f="$f" '{print "STAGE1-PEM: " f " " $0}' "$f"
done
echo "STAGE1-DONE"
poweroff -f
"""


def luks_encrypt_offline(tree: Path, img: Path, passphrase: bytes, fs_mb: int, fs_label: str = "root") -> None:
    """ext4 from ``tree`` (mkfs.ext4 -d), then offline LUKS2 encryption in place (fast PBKDF: tests). The
    device shrinks by 32 MiB so that the data segment starts at 16 MiB, as on production images
    (``boot.luks_data_offset``)."""
    header_mb = 32
    with open(img, "wb") as fh:
        fh.truncate((fs_mb + header_mb) * 1024 * 1024)
    _run(["mkfs.ext4", "-q", "-L", fs_label, "-d", str(tree), str(img), f"{fs_mb}M"])
    _run(
        [
            "cryptsetup",
            "reencrypt",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            f"{header_mb}M",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--batch-mode",
            "--key-file",
            "-",
            str(img),
        ],
        input=passphrase,
        stdout=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class LuksDisk:
    image: Path
    passphrase: bytes  # handed to the faithful validator only
    marker: str


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def root1() -> LuksDisk:
    """Stage-1 LUKS2 root disk (the cached passphrase file is test-harness state, mode 0600)."""
    key = digest(STAGE1_INIT, BUSYBOX_APPLETS, Path("/usr/bin/busybox"), STAGE1_MEASURE_CONF, ROOTFS_MANIFEST_SCRIPT,
                 "v3")

    def build(out: Path) -> None:
        marker = "root-marker-" + secrets.token_hex(8)
        passphrase = secrets.token_hex(32).encode()
        stage1_tree(out / "tree", marker)
        _write_measurement(out / "tree", STAGE1_MEASURE_CONF, out)
        luks_encrypt_offline(out / "tree", out / "root.img", passphrase, fs_mb=16)
        shutil.rmtree(out / "tree")
        _write_secret(out / "passphrase", passphrase)
        (out / "marker").write_text(marker)

    d = cached("root1", key, build)
    return LuksDisk(d / "root.img", (d / "passphrase").read_bytes(), (d / "marker").read_text())


def _rewrite_luks2_json(img: Path, edit: Callable[[dict], None]) -> None:
    """Edit the LUKS2 JSON metadata of both header copies in place and fix their checksums."""
    with open(img, "r+b") as fh:
        primary = fh.read(4096)
        if primary[:6] != b"LUKS\xba\xbe":
            raise ValueError(f"{img}: not a LUKS2 header")
        hdr_size = int.from_bytes(primary[8:16], "big")
        for offset in (0, hdr_size):
            fh.seek(offset)
            area = bytearray(fh.read(hdr_size))
            meta = json.loads(bytes(area[4096:]).rstrip(b"\0"))
            edit(meta)
            text = json.dumps(meta, separators=(",", ":")).encode()
            area[4096:] = text + bytes(hdr_size - 4096 - len(text))
            area[448:512] = bytes(64)
            area[448:480] = hashlib.sha256(area).digest()
            fh.seek(offset)
            fh.write(area)


def cipher_null_copy(disk: LuksDisk, dest: Path) -> Path:
    """A copy of ``disk`` whose LUKS2 header says the data segment is ``cipher_null-ecb``.

    The header-swap attack (prior-art.md): the keyslots still accept the real passphrase, so a naive
    client unlocks a volume whose 'encryption' is the identity and whose contents the host chose. The
    agent must refuse this header before using the key.
    """
    shutil.copyfile(disk.image, dest)

    def edit(meta: dict) -> None:
        for seg in meta["segments"].values():
            seg["encryption"] = "cipher_null-ecb"

    _rewrite_luks2_json(dest, edit)
    return dest


def config_volume(
    hostname: str = HOSTNAME, miner: str = MINER_SS58, network_yaml: str = NETWORK_YAML, seed: str | None = None
) -> Path:
    """ext4 labelled tdx-config with the three files the host tooling writes (+ ``miner-seed``: 1.4.0)."""

    def build(out: Path) -> None:
        tree = out / "tree"
        tree.mkdir()
        (tree / "hostname").write_text(hostname + "\n")
        (tree / "miner-ss58").write_text(miner + "\n")
        (tree / "network-config.yaml").write_text(network_yaml)
        if seed is not None:
            (tree / "miner-seed").write_text(seed + "\n")
        img = out / "config.img"
        with open(img, "wb") as fh:
            fh.truncate(8 * 1024 * 1024)
        _run(["mkfs.ext4", "-q", "-L", "tdx-config", "-d", str(tree), str(img)])
        shutil.rmtree(tree)

    key = digest(hostname, miner, network_yaml, *([] if seed is None else ["seed", seed]))
    return cached("config", key, build, keep=3) / "config.img"


# ---------------------------------------------------------------------------------- 1.4.0 generation

EMULATOR_INIT_TOP = f"""\
#!/bin/sh
# TEST IMAGE ONLY (scripts/vm/vmlib.py): FUSE emulators of configfs-tsm and the RTMR sysfs, which qemu TCG
# lacks, mounted under {EMU_BASE} before the agent runs (tests/vm/guest_emulators.py).
PREREQ=""
prereqs() {{ echo "$PREREQ"; }}
case "$1" in
prereqs) prereqs; exit 0 ;;
esac
modprobe -q fuse || echo "VM-TEST-EMULATORS: fuse module missing" >/dev/console
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 shm /dev/shm
PY="$(awk '$1 == "exec" {{print $2}}' /usr/bin/chutes-attest)"
FUSE_LIBRARY_PATH=/usr/lib/chutes-vm-test/libfuse.so.2 "$PY" -I -S /usr/lib/chutes-vm-test/guest_emulators.py \\
    {EMU_BASE} /etc/chutes-attest/sim </dev/null >/dev/console 2>&1 &
i=0
while [ "$i" -lt 1200 ]; do
    grep -q " {EMU_BASE}/tsm-report " /proc/mounts && grep -q " {EMU_BASE}/measurements " /proc/mounts && break
    sleep 0.1
    i=$((i + 1))
done
echo "VM-TEST-EMULATORS: mounted after $i polls" >/dev/console
exit 0
"""
#: ... and unmounted again before the switch to the real root (the agent is done by then; FUSE mounts
#: carried into the booted system would only get in the way of systemd's mount namespaces).
EMULATOR_INIT_BOTTOM = f"""\
#!/bin/sh
# TEST IMAGE ONLY (scripts/vm/vmlib.py): the emulators' job ends with the initramfs.
PREREQ=""
prereqs() {{ echo "$PREREQ"; }}
case "$1" in
prereqs) prereqs; exit 0 ;;
esac
umount {EMU_BASE}/tsm-report {EMU_BASE}/measurements 2>/dev/null
exit 0
"""
_LIBFUSE = Path("/usr/lib/x86_64-linux-gnu/libfuse.so.2")


def _fusepy() -> Path:
    import fuse

    return Path(fuse.__file__)


def _add_emulators(tree: Path, extra: Path) -> None:
    """Test image only: the emulator script, fusepy and libfuse in the image, its init-top script, fuse.ko."""
    d = extra / "usr/lib/chutes-vm-test"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "tests/vm/guest_emulators.py", d / "guest_emulators.py")
    shutil.copy2(_fusepy(), d / "fuse.py")
    shutil.copyfile(_LIBFUSE.resolve(), d / "libfuse.so.2")  # needs only libc, which the image has
    for phase, text in (("init-top", EMULATOR_INIT_TOP), ("init-bottom", EMULATOR_INIT_BOTTOM)):
        script = tree / "etc/initramfs-tools/scripts" / phase / "chutes-vm-test-emulators"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
    with open(tree / "etc/initramfs-tools/modules", "a") as fh:
        fh.write("fuse\n")


def _write_measurement(tree: Path, measure_conf: str, out: Path) -> None:
    """What an image build registers for the RTMR3 rootfs chain: the measured-path list, the expected-hash
    manifest and the final RTMR3, made by the independent stand-in for Chutes' pipeline
    (tests/vm/chutes_rootfs_manifest.py, run by the system python3: not the agent's code)."""
    (out / "tdx-measure.conf").write_text(measure_conf)
    _run(["python3", "-I", str(ROOTFS_MANIFEST_SCRIPT), "--root", str(tree), "--conf", str(out / "tdx-measure.conf"),
          "--manifest", str(out / "tdx-rtmr3-expected-hashes"), "--rtmr3", str(out / "rtmr3")],
         capture_output=True)


@dataclass(frozen=True)
class Measurement:
    """A root's RTMR3 registration: files baked into the initramfs and the value the validator expects."""

    measure_conf: bytes
    manifest: bytes
    rtmr3: str

    @classmethod
    def of(cls, disk: LuksDisk) -> Measurement:
        d = disk.image.parent
        return cls((d / "tdx-measure.conf").read_bytes(), (d / "tdx-rtmr3-expected-hashes").read_bytes(),
                   (d / "rtmr3").read_text())


def signing_root():
    """The validator's simulated root signing key, fixed (its public half is baked into the initramfs)."""
    from cryptography.hazmat.primitives import serialization

    from agent.sim.validator_signing import SigningRoot

    def build(out: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(65537, 2048)
        _write_secret(out / "root-signing.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    d = cached("signing-root", digest("v1", builder=False), build, keep=1)
    return SigningRoot(key=serialization.load_pem_private_key((d / "root-signing.key").read_bytes(), None))


def miner_ss58_v14() -> str:
    """The hotkey the agent derives from MINER_SEED (what miner-ss58 says next to it)."""
    from agent.validator.proof import Hotkey

    return Hotkey.from_seed_hex(MINER_SEED).ss58


def agent_toml_v14() -> str:
    """The 1.4.0 test initramfs config: ``boot.protocol = "auto"`` against the cvm/api fronts, quotes and
    RTMR3 through the production configfs-tsm / sysfs code on the emulators (:data:`EMULATOR_INIT_TOP`)."""
    boot = {
        "tdx_base_url": f"https://10.0.2.2:{CVM_PORT}",
        "validator_base_url": f"https://10.0.2.2:{API_PORT}",
        "legacy_tdx_base_url": VALIDATOR_URL,  # the legacy front (1.3.x luks/attest) on VALIDATOR_PORT
        "protocol": "auto",
        "ca_bundle": VALIDATOR_CA_PATH,
        "network": "static",
        "root_device": "/dev/vda",
        "root_mapper": "root",
        "cache_enabled": False,
        "max_attempts": 3,
        "total_timeout_s": 240.0,
        "request_timeout_s": 60.0,
        "backoff_s": 1.0,
        "backoff_max_s": 2.0,
        "device_wait_s": 20.0,
        "poweroff": True,
        "storage_mkfs": "mkfs.ext4",
        "format_pbkdf": "pbkdf2",
        "format_pbkdf_iterations": 1000,
    }
    # qemu TCG has no /dev/tdx_guest: quote.tee is pinned (the default "auto" probes and would fail closed)
    lines = ["[log]", 'level = "info"', 'format = "json"', "", "[quote]", 'source = "configfs"', 'tee = "tdx"',
             f'configfs_root = "{EMU_BASE}/tsm-report"', "", "[rtmr]",
             f'sysfs_path = "{EMU_BASE}/measurements/rtmr3:sha384"', "", "[gpu]", "enabled = false", "", "[boot]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in boot.items()]
    return "\n".join(lines) + "\n"


def initramfs_v14(measurement: Measurement) -> Path:
    """The 1.4.0 test initramfs for a root with ``measurement`` (measure conf + manifest baked at the
    reference's paths, the validator's root signing key at /etc/chutes/root-signing-key.pem)."""
    return initramfs(agent_toml_v14(), emulators=True, root_files={
        "/etc/tdx-measure.conf": measurement.measure_conf,
        "/etc/tdx-rtmr3-expected-hashes": measurement.manifest,
        "/etc/chutes/root-signing-key.pem": signing_root().public_pem,
    })


def writable_root(disk: LuksDisk, dest: Path, first_boot_version: str = "1.4.0") -> Path:
    """A per-test copy of a cached root that the VM may write (rotation), with the first-boot token 15."""
    from agent.sim.luks_image import add_first_boot_token

    _run(["cp", "--sparse=always", str(disk.image), str(dest)])
    add_first_boot_token(str(dest), first_boot_version)
    return dest


def storage_disk(label: str, dest: Path, passphrase: bytes, files: dict[str, bytes] | None = None) -> Path:
    """A real LUKS2 data volume labelled ``label`` (ext4 inside, also labelled), made offline like the roots."""
    tree = dest.parent / f".{dest.name}.tree"
    tree.mkdir()
    for rel, data in (files or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    try:
        luks_encrypt_offline(tree, dest, passphrase, fs_mb=8, fs_label=label)
    finally:
        shutil.rmtree(tree)
    _run(["cryptsetup", "config", "--label", label, str(dest)])
    return dest


# ------------------------------------------------------------------------------------------- stage 2

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("CHUTES_ATTEST_VM_MIRROR", "http://deb.debian.org/debian")
#: the image's own packages; the agent's dependencies come with its .deb (bundled, hash-pinned)
DEBIAN_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "python3.11", "kmod", "iproute2",
    # update-initramfs with the installed hook: initramfs-tools (+ busybox, zstd), and what the hook copies
    "initramfs-tools", "busybox", "zstd", "cryptsetup-bin", "e2fsprogs",
)
#: SOURCE_DATE_EPOCH for the test images (any fixed value: the images are byte-reproducible)
SOURCE_DATE_EPOCH = 1700000000
E2E_UNIT = """\
[Unit]
Description=chutes-attest VM end-to-end check (test image only)
Wants=chutes-attest.socket
After=chutes-attest.socket multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/usr/lib/chutes-attest/bin/python /usr/local/lib/chutes-e2e/guest_check.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=900

[Install]
WantedBy=multi-user.target
"""


def agent_toml_stage2() -> str:
    return """\
[quote]
source = "simulated"
simulated_state_dir = "/var/lib/chutes-attest/sim"

[gpu]
enabled = false

[tpm]
mode = "off"
"""


def debian_base() -> Path:
    """bookworm root tarball made by mmdebstrap (cached: the slow, network-bound part of a cold run)."""

    def build(out: Path) -> None:
        _run(
            _nice(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=apt",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/locale/*",
                    DEBIAN_SUITE,
                    str(out / "base.tar"),
                    DEBIAN_MIRROR,
                ]
            )
        )

    return (
        cached("debian", digest(DEBIAN_SUITE, DEBIAN_PACKAGES, DEBIAN_MIRROR, "v1", builder=False), build, keep=1)
        / "base.tar"
    )


def package() -> Path:
    """The chutes-attest .deb built from this checkout by scripts/build-deb.sh (cached by its inputs)."""
    inputs = [REPO / p for p in ("agent", "native", "debian", "requirements", "initramfs", "systemd",
                                  "pyproject.toml", "setup.py", "README.md", "scripts/build-deb.sh")]

    def build(out: Path) -> None:
        _run(_nice([str(REPO / "scripts/build-deb.sh"), str(out)]), env={**os.environ, "LINTIAN": "no"},
             capture_output=True)

    d = cached("deb", digest(*inputs, builder=False), build)
    return next(d.glob("chutes-attest_*.deb"))


def _chroot(tree: Path, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive"}
    _run(["chroot", str(tree), *argv], env={**base, **(env or {})}, cwd=cwd, stdout=subprocess.DEVNULL,
         stderr=subprocess.PIPE)


@contextlib.contextmanager
def _mounts(tree: Path, *binds: tuple[Path, Path]) -> Iterator[None]:
    """/proc, /sys, /dev (bind) in ``tree`` plus read-only binds ``(host path, path in tree)``; all
    unmounted again, in reverse order, whatever happens."""
    done: list[Path] = []
    try:
        for fstype, src, rel in (("proc", "proc", "proc"), ("sysfs", "sysfs", "sys")):
            _run(["mount", "-t", fstype, src, str(tree / rel)])
            done.append(tree / rel)
        _run(["mount", "--rbind", "/dev", str(tree / "dev")])
        _run(["mount", "--make-rslave", str(tree / "dev")])
        done.append(tree / "dev")
        for host, rel in binds:
            _run(["mount", "--bind", "-o", "ro", str(host), str(tree / rel)])
            done.append(tree / rel)
        yield
    finally:
        for m in reversed(done):
            subprocess.run(["umount", "-R", str(m)], check=False)


def installed_tree(tree: Path, deb: Path | None = None) -> None:
    """The Debian base with the package installed the way an image builder does: ``apt-get install
    ./chutes-attest_*.deb`` (postinst: sysusers, tmpfiles, socket enabled; nothing hand-placed)."""
    tree.mkdir(parents=True)
    _run(["tar", "-C", str(tree), "-xpf", str(debian_base()), "--numeric-owner"])
    deb = deb or package()
    shutil.copy2(deb, tree / "tmp" / deb.name)
    with _mounts(tree):
        _chroot(tree, "apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}")
    (tree / "tmp" / deb.name).unlink()


def _unit_workarounds(unit_text: str) -> dict[str, str]:
    """Drop-ins for unit bugs found by this suite (reported), each applied only while the bug is present."""
    out = {}
    if "ReadWritePaths=/sys/kernel/config/tsm/report" in unit_text:
        # Without "-" systemd refuses to start the service (226/NAMESPACE) on kernels without configfs-tsm.
        out["50-vm-test-optional-tsm.conf"] = (
            "[Service]\nReadWritePaths=\nReadWritePaths=-/sys/kernel/config/tsm/report\n"
        )
    cert_code = "".join(p.read_text() for p in (REPO / "agent").rglob("*.py") if p.name in (
        "service_cert.py", "service_identity.py"))  # where the self-signed certificate is made (moved once)
    if "if_nameindex" in cert_code and "AF_NETLINK" not in unit_text:
        # socket.if_nameindex() opens a netlink socket: EAFNOSUPPORT under RestrictAddressFamilies when the
        # service creates its certificate on first start.
        out["51-vm-test-netlink.conf"] = "[Service]\nRestrictAddressFamilies=AF_NETLINK\n"
    return out


def stage2_tree(tree: Path, deb: Path) -> None:
    """Debian + the installed package, configured for the test: simulated quotes, the e2e check unit."""
    installed_tree(tree, deb)
    sysd = tree / "lib/systemd/system"
    for name, text in _unit_workarounds((sysd / "chutes-attest.service").read_text()).items():
        dropin = tree / "etc/systemd/system/chutes-attest.service.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / name).write_text(text)
    # operator configuration: the conffile's content replaced (mode/owner as the package left them)
    (tree / "etc/chutes-attest/agent.toml").write_text(agent_toml_stage2())
    check = tree / "usr/local/lib/chutes-e2e"
    check.mkdir(parents=True)
    shutil.copy2(REPO / "tests/vm/guest_check.py", check / "guest_check.py")
    (tree / "etc/systemd/system/chutes-attest-e2e.service").write_text(E2E_UNIT)
    (tree / "etc/hostname").write_text(HOSTNAME + "\n")
    (tree / "etc/fstab").write_text("# root is opened and mounted by the initramfs (chutes-attest boot)\n")
    _run(["systemctl", f"--root={tree}", "enable", "chutes-attest-e2e.service"], stderr=subprocess.DEVNULL)
    # a quiet console: no login prompt interleaving with the results
    _run(
        ["systemctl", f"--root={tree}", "mask", "serial-getty@ttyS0.service", "getty@tty1.service"],
        stderr=subprocess.DEVNULL,
    )


def root2() -> LuksDisk:
    """Stage-2 LUKS2 root: Debian with systemd and the project, encrypted offline like stage 1."""
    deb = package()
    key = digest(
        debian_base().parent.name,
        deb.parent.name,
        REPO / "tests/vm/guest_check.py",
        json.dumps(_unit_workarounds((REPO / "systemd/chutes-attest.service").read_text())),
        E2E_UNIT,
        agent_toml_stage2(),
        STAGE2_MEASURE_CONF,
        ROOTFS_MANIFEST_SCRIPT,
        "v2",
    )

    def build(out: Path) -> None:
        tree = out / "tree"
        stage2_tree(tree, deb)
        marker = "root2-marker-" + secrets.token_hex(8)
        (tree / "marker").write_text(marker + "\n")
        _write_measurement(tree, STAGE2_MEASURE_CONF, out)
        used_mb = int(_run(["du", "-sm", str(tree)], capture_output=True, text=True).stdout.split()[0])
        passphrase = secrets.token_hex(32).encode()
        luks_encrypt_offline(tree, out / "root.img", passphrase, fs_mb=int(used_mb * 1.3) + 128)
        shutil.rmtree(tree)
        _write_secret(out / "passphrase", passphrase)
        (out / "marker").write_text(marker)

    d = cached("root2", key, build, keep=1)
    return LuksDisk(d / "root.img", (d / "passphrase").read_bytes(), (d / "marker").read_text())


# ------------------------------------------------------------------------------------------------ qemu


@dataclass
class VmResult:
    returncode: int
    console: str
    seconds: float
    timed_out: bool


def qemu_argv(
    initrd: Path, disks: Iterable[Path], console_log: Path, append: str = "", memory_mb: int = 1024,
    writable: Iterable[Path] = (),
) -> list[str]:
    """TCG (no KVM), one vCPU, no default devices; serial console to a file; virtio disks (snapshot=on,
    the cached images are never written, except per-test copies listed in ``writable``: the guest's writes
    land there, so the test can inspect the disk afterwards) and virtio-net on slirp (the host's loopback
    is 10.0.2.2)."""
    kver = kernel_version()
    cmdline = f"console=ttyS0,115200 root=/dev/mapper/root ro panic=-1 {append}".strip()
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-nographic",
        "-monitor",
        "none",
        "-serial",
        f"file:{console_log}",
        "-no-reboot",
        "-kernel",
        f"/boot/vmlinuz-{kver}",
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]
    rw = {Path(w) for w in writable}
    for d in disks:
        argv += ["-drive", f"file={d},if=virtio,format=raw,snapshot={'off' if Path(d) in rw else 'on'}"]
    return _nice(argv)


async def run_vm_async(
    initrd: Path,
    disks: Iterable[Path],
    console_log: Path,
    append: str = "",
    timeout_s: float = 600,
    memory_mb: int = 1024,
    writable: Iterable[Path] = (),
) -> VmResult:
    """As :func:`run_vm`, without blocking the event loop (the faithful validator runs in-process)."""
    import asyncio

    argv = qemu_argv(initrd, disks, console_log, append, memory_mb, writable)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    timed_out = False
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        timed_out = True
        proc.kill()
        _, err = await proc.communicate()
    text = console_log.read_text(errors="replace") if console_log.exists() else ""
    if proc.returncode and not timed_out and err:
        text += "\n[qemu stderr] " + err.decode(errors="replace")
    return VmResult(proc.returncode or 0, text, time.monotonic() - t0, timed_out)


def run_vm(
    initrd: Path,
    disks: Iterable[Path],
    console_log: Path,
    append: str = "",
    timeout_s: float = 600,
    memory_mb: int = 1024,
) -> VmResult:
    """Boot the Debian kernel + ``initrd`` under TCG and wait for it to power off (or time out)."""
    import asyncio

    return asyncio.run(run_vm_async(initrd, disks, console_log, append, timeout_s, memory_mb))


@contextlib.asynccontextmanager
async def faithful_validator(state_dir: Path, generation: str = "1.2", runtime_rtmr3: str | None = None):
    """The faithful validator (nginx TLS terminator + app) on VALIDATOR_PORT with the cached server
    certificate (SAN 10.0.2.2) that the CA bundle baked into the initramfs trusts. ``generation="1.4"``:
    the cvm and api fronts on CVM_PORT/API_PORT, the baked signing root, no removed legacy calls, and
    ``runtime_rtmr3`` (96 hex) as the RTMR3 provision quotes must carry."""
    from agent.sim import validator_nginx
    from agent.sim.quote_sim import load_or_create_sim_pki
    from agent.sim.validator import FaithfulValidator

    root_ca = load_or_create_sim_pki(sim_state()).root_ca_pem
    if generation == "1.2":
        v = FaithfulValidator(state_dir, root_ca_pem=root_ca, port=VALIDATOR_PORT)
    else:
        v = FaithfulValidator(state_dir, root_ca_pem=root_ca, port=VALIDATOR_PORT, generation=generation,
                              runtime_rtmr3=runtime_rtmr3, legacy_luks=False, cvm_port=CVM_PORT,
                              api_port=API_PORT, signing_root=signing_root())
    certs = tls()
    v.tls = validator_nginx.TlsFiles(certs / "ca.pem", certs / "server.pem", certs / "server.key")
    await v.start()
    try:
        yield v
    finally:
        await v.stop()


async def boot_demo(stage: str, workdir: Path) -> VmResult:
    """One attested boot against the faithful validator (the manual counterpart of the test suite)."""
    from agent.log import Secret

    disk = root1() if stage == "stage1" else root2()
    initrd, config = initramfs(agent_toml_stage1()), config_volume()
    async with faithful_validator(workdir / "validator") as v:
        v.add_vm(HOSTNAME, MINER_SS58, Secret(disk.passphrase))
        log = workdir / f"{stage}.console.log"
        print(f"booting {stage} (TCG; console: {log})", flush=True)
        return await run_vm_async(initrd, [disk.image, config], log, append="rw" if stage == "stage2" else "")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="build (or find cached) VM test images")
    ap.add_argument(
        "what",
        choices=["build", "size", "boot-stage1", "boot-stage2"],
        help="build: all images; size: initramfs size the agent adds; boot-*: one attested boot",
    )
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.what.startswith("boot-"):
        import asyncio

        work = Path(tempfile.mkdtemp(prefix="chutes-vm-"))
        res = asyncio.run(boot_demo(args.what[len("boot-") :], work))
        print(res.console[-6000:])
        print(f"qemu exit {res.returncode}, {res.seconds:.1f} s, console log {work}")
    elif args.what == "build":
        print("initramfs:", initramfs(agent_toml_stage1()))
        print("root1:", root1().image)
        print("config:", config_volume())
        print("root2:", root2().image)
    else:
        with_agent = initramfs(agent_toml_stage1())
        plain = initramfs(agent_toml_stage1(), with_agent=False)
        a, b = with_agent.stat().st_size, plain.stat().st_size
        print(f"initramfs with agent {a} B, without {b} B, added {a - b} B ({(a - b) / 2**20:.1f} MiB)")
    print(f"took {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
