"""The main job on a machine without TDX or GPUs: a full simulated boot of one VM generation, then the service.

Everything production runs unmodified; only the hardware and the validator are stand-ins, each
explicitly configured in the generated ``agent.toml`` (never a fallback):

- quotes: the production configfs-tsm reader over the FUSE configfs-tsm emulator, whose quotes come
  from the simulated PCK chain and carry the registers of the FUSE RTMR emulator (``--quote simulated``
  skips FUSE and uses the simulated source directly: ≤1.2 only, it has no live RTMR3);
- RTMR3: the production sysfs writer (``rtmr.sysfs_path``) over the FUSE measurement-register emulator;
  the boot's rootfs chain measures a small demo root tree whose manifest and registered runtime RTMR3
  come from ``chutes-attest rtmr3 predict``;
- GPUs: eight emulated H100s behind the real pynvml wrapper (``gpu.emulate = "h100x8"``);
- validator: the faithful validator (real nginx TLS fronts cvm / legacy / api + aiohttp app) serving one
  generation (``--protocol``, default 1.4: VM root CA, sr25519 proofs, root rotation, provision);
- disks: real LUKS2 image files: the root (build passphrase + first-boot token 15 on 1.4.0, checked with
  ``cryptsetup open --test-passphrase``: no device-mapper here), ``storage`` and ``tdx-cache`` (blank,
  formatted by the boot with the validator's keys) and a config volume labelled ``tdx-config``.

``--tee snp`` makes the guest an AMD SEV-SNP one instead (Chutes' next): the configfs-tsm emulator with
provider ``sev_guest`` gives bare 1184-byte v5 reports signed by a simulated VCEK <- ASK <- ARK (``quote.tee =
"snp"`` pinned, no RTMR emulator); the rootfs step compares the next list digest with the baked
``rootfs-manifest`` and leaves it in ``run/sek8s/rootfs-digest``; the validator tells the report from a TDX
quote by its bytes, verifies it against the simulated AMD root it is given explicitly (its stand-in for AMD's
KDS) and matches MEASUREMENT; compat ``/attest`` answers ``snp_quote``.

The agent runs with ``boot.protocol = "auto"``: the validator's answer decides the steps, as on a real VM.
Then ``chutes-attest serve`` runs on two unix sockets (the 1.4.0 identity is the boot's CA-signed proxy
leaf from the demo's hand-off dir) with ``NOTIFY_SOCKET`` pointed at the demo, which waits for
``READY=1``, prints ready-to-paste ``curl --unix-socket`` commands and runs until Ctrl-C (``--once``
instead checks every route itself and exits with the result).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.log import Secret
from agent.sim import demo_checks as checks
from agent.sim.luks_image import (
    make_ext4_image,
    make_luks_image,
    null_cipher_segment,
    random_hotkey,
    tamper_luks2_metadata,
)
from agent.sim.quote_sim import DEFAULT_MR_TD, DEFAULT_RTMRS, load_or_create_sim_pki
from agent.sim.tsm_mr_emulator import LiveRtmrQuoteSource, MeasurementsFs, MrState
from agent.sim.validator import FaithfulValidator, Fault, SnpMeasurementSet, SnpTrust, simulated_snp_trust

PROTOCOLS = ("1.4", "1.3", "1.2")
#: The TEE the simulated guest is (``--tee``): Intel TDX (default) or AMD SEV-SNP.
TEES = ("tdx", "snp")
TEE_NAMES = {"tdx": "Intel TDX", "snp": "AMD SEV-SNP"}
FAIL_MODES = ("none", "cipher-null", "wrong-key", "404", "401", "garbage", "root-confirm", "storage", "rtmr3")
#: Fail modes that exist only where their step does.
FAIL_GENERATIONS = {"root-confirm": ("1.4",), "rtmr3": ("1.3", "1.4")}
#: The endpoint that hands out the storage-volume keys, per generation (``--fail storage``).
STORAGE_ENDPOINT = {"1.4": "provision", "1.3": "luks_attest", "1.2": "luks_post"}
VM_NAME = "demo-vm-01"
READY_TIMEOUT_S = 120.0
NETPLAN = "network:\n  ethernets:\n    enp0s2:\n      addresses: [10.20.30.40/24]\n      gateway4: 10.20.30.1\n"
#: The demo image's root tree: what the RTMR3 rootfs chain measures (under /etc and /usr).
ROOTFS_FILES = {
    "etc/hostname": b"demo-vm-01\n",
    "etc/chutes/agent.conf": b"# simulated image configuration\nmode = demo\n",
    "usr/lib/chutes/libdemo.so": b"\x7fELF" + bytes(4092),
    "var/lib/unmeasured": b"not under a measured path\n",
}
ROOTFS_RANDOM = {"usr/bin/chutes-demo-tool": 96 * 1024}
#: Shaped like Chutes' miner list (§12.1): overlapping entries, and paths absent on purpose (their
#: reappearance changes RTMR3).
MEASURED_PATHS = ("# measured paths\n/etc\n/usr\n/etc/chutes/agent.conf  # again, inside /etc\n"
                  "/etc/default/rtmr3-verify\n/etc/ld.so.preload\n")


def check_options(protocol: str, fail: str, quote: str, tee: str = "tdx") -> str | None:
    """A usage error for a combination the demo cannot show, else None."""
    if protocol not in PROTOCOLS:
        return f"--protocol: one of {', '.join(PROTOCOLS)}, got {protocol!r}"
    if tee not in TEES:
        return f"--tee: one of {', '.join(TEES)}, got {tee!r}"
    if fail not in FAIL_MODES:
        return f"--fail: one of {', '.join(FAIL_MODES)}, got {fail!r}"
    gens = FAIL_GENERATIONS.get(fail)
    if gens is not None and protocol not in gens:
        return f"--fail {fail}: only with --protocol {' or '.join(gens)} (that step does not exist in {protocol})"
    if quote == "simulated" and protocol != "1.2" and tee == "tdx":
        return (f"--quote simulated: only with --protocol 1.2 (the {protocol} rootfs chain extends RTMR3, which "
                "only the emulated registers carry into quotes)")
    return None


class DemoPaths:
    """Every file the demo makes lives under one work directory (the hand-off dir is ``run/chutes``)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "agent.toml"
        self.run = work / "run"
        self.compat_socket = self.run / "attestation-service" / "attestation.sock"
        self.chute_socket = self.run / "chutes-attest" / "chutes.sock"
        self.handoff = self.run / "chutes"
        self.sim = work / "sim"
        self.validator = work / "validator"
        self.config_image = work / "config.img"
        self.root_image = work / "root.img"
        self.storage_image = work / "storage.img"
        self.tdx_cache_image = work / "tdx-cache.img"
        self.rootfs = work / "rootfs"
        # what the initramfs carries: the measured path list and the expected-hash manifest
        self.measure_conf = work / "initramfs" / "etc" / "tdx-measure.conf"
        self.manifest = work / "initramfs" / "etc" / "tdx-rtmr3-expected-hashes"
        self.tsm_mount = work / "emulated" / "tsm-report"
        self.mr_mount = work / "emulated" / "measurements"
        self.proxy_leaf = self.handoff / "proxy-tls" / "server.crt"
        self.vm_root_ca = self.handoff / "vm-root-ca" / "ca.crt"
        self.self_signed_cert = work / "certs" / "server.crt"
        #: The ``--once`` check's /attest answer (public evidence), for inspection after the run.
        self.attest_record = work / "attest-once.json"
        #: SEV-SNP: where the boot leaves the verified rootfs list digest (Chutes: /run/sek8s/rootfs-digest).
        self.rootfs_digest = self.run / "sek8s" / "rootfs-digest"


@dataclass
class DemoRig:
    """The demo's simulated VM: paths, validator, the VM's identity and the emulated registers."""

    paths: DemoPaths
    v: FaithfulValidator
    generation: str
    vm: str
    hotkey: str
    build_key: Secret
    #: The key the root image was made with (the build passphrase, except with ``--fail wrong-key``).
    image_key: Secret
    mr_state: MrState
    predicted_rtmr3: str
    quote: str
    phases: dict[str, float] = field(default_factory=dict)
    #: "tdx" or "snp" (``--tee``).
    tee: str = "tdx"
    #: SEV-SNP: the list digest an operator computes from the image (``rtmr3 predict --list``), and the
    #: registered launch MEASUREMENT of the simulated guest (hex).
    predicted_list_digest: str = ""
    snp_measurement: str = ""


def write_config(rig: DemoRig) -> None:
    """One explicit agent.toml for both lives: boot and serve."""
    p, v, w = rig.paths, rig.v, rig.paths.work
    source = (f'source = "configfs"\nconfigfs_root = "{p.tsm_mount}"' if rig.quote == "emulated"
              else 'source = "simulated"')
    # no TEE device on this machine: the TEE is pinned (quote.tee = "auto" would probe and fail closed)
    source += f'\ntee = "{rig.tee}"'
    rootfs = ('# SEV-SNP: no RTMR3; the boot compares the list digest with the manifest\'s and leaves it here\n'
              f'rtmr3_scheme = "next"\nrootfs_digest_file = "{p.rootfs_digest}"\n' if rig.tee == "snp" else "")
    group = grp.getgrgid(os.getgid()).gr_name
    p.config.write_text(f"""# generated by chutes-attest demo: every simulated part is named here explicitly
[log]
level = "info"
[quote]
{source}
simulated_state_dir = "{p.sim}"
[rtmr]
# the FUSE measurement-register emulator (the kernel's tsm-mr sysfs ABI), not a TD
sysfs_path = "{p.mr_mount}/rtmr3:sha384"
event_log = "{w / 'rtmr3-events.jsonl'}"
[gpu]
emulate = "h100x8"
[tpm]
mode = "off"
[boot]
# the validator's answer picks the steps; the demo's faithful validator serves generation {rig.generation}
protocol = "auto"
tdx_base_url = "{v.tdx_base_url}"
validator_base_url = "{v.api_url}"
# the legacy attestation proxy: the only front serving the 1.3.x storage call luks/attest
legacy_tdx_base_url = "{v.legacy_tdx_base_url}"
ca_bundle = "{v.ca_bundle}"
network = "initramfs"
config_device = "{p.config_image}"
config_mount = "{w / 'mnt-config'}"
root_device = "{p.root_image}"
storage_device = "{p.storage_image}"
tdx_cache_device = "{p.tdx_cache_image}"
header_dir = "{w / 'luks-hdr'}"
handoff_dir = "{p.handoff}"
kmsg_path = "{w / 'kmsg'}"
unlock_action = "test-passphrase"
rootfs_dir = "{p.rootfs}"
measure_conf = "{p.measure_conf}"
rtmr3_manifest = "{p.manifest}"
{rootfs}proxy_tls_group = "{group}"
signing_root_key = "{v.signing_root_pem_path}"
device_wait_s = 0
max_attempts = 3
backoff_s = 0.5
format_pbkdf = "pbkdf2"
format_pbkdf_iterations = 1000
[serve]
compat_socket = "{p.compat_socket}"
chute_socket = "{p.chute_socket}"
socket_mode = 0o666
# 1.4.0: the boot's CA-signed proxy leaf is the identity; before 1.4.0 the self-signed pair below
handoff_cert_path = "{p.proxy_leaf}"
handoff_key_path = "{p.proxy_leaf.with_name('server.key')}"
vm_root_ca_path = "{p.vm_root_ca}"
cert_path = "{p.self_signed_cert}"
key_path = "{p.self_signed_cert.with_name('server.key')}"
boot_status_path = "{p.handoff / 'boot-status.json'}"
validator_hosts = ["{v.host}:{v.api_port}"]
relay_ca_bundle = "{v.ca_bundle}"
""")


# ── the simulated image ──────────────────────────────────────────────────────

def make_rootfs(p: DemoPaths) -> None:
    for rel, data in {**ROOTFS_FILES, **{k: os.urandom(n) for k, n in ROOTFS_RANDOM.items()}}.items():
        path = p.rootfs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    p.measure_conf.parent.mkdir(parents=True, exist_ok=True)
    p.measure_conf.write_text(MEASURED_PATHS)


def predict_rtmr3(p: DemoPaths, scheme: str | None = None) -> str:
    """What an operator registers: ``chutes-attest rtmr3 predict`` over the image's root (writes the manifest)."""
    opt = ["--scheme", scheme] if scheme else []
    argv = [sys.executable, "-m", "agent.cli", "rtmr3", "predict", *opt, "--root", str(p.rootfs), "--measure-conf",
            str(p.measure_conf), "--write-manifest", str(p.manifest), "--json"]
    print(f"demo: registering the image: chutes-attest rtmr3 predict {' '.join([*opt, ''])}--root {p.rootfs} "
          f"--measure-conf {p.measure_conf} --write-manifest {p.manifest}", flush=True)
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"rtmr3 predict exited {res.returncode}: {res.stderr.strip()}")
    doc = json.loads(res.stdout)
    if scheme != "next":
        print(f"demo: runtime RTMR3 of the demo image: {doc['rtmr3']} ({doc['files']} files)", flush=True)
    return str(doc["rtmr3"])


def predict_list_digest(p: DemoPaths) -> str:
    """SEV-SNP: the rootfs list digest an operator expects, SHA-384 of ``chutes-attest rtmr3 predict --list``."""
    import hashlib

    argv = [sys.executable, "-m", "agent.cli", "rtmr3", "predict", "--scheme", "next", "--root", str(p.rootfs),
            "--measure-conf", str(p.measure_conf), "--list"]
    res = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"rtmr3 predict --list exited {res.returncode}: {res.stderr.decode(errors='replace')}")
    digest = hashlib.sha384(res.stdout).hexdigest()
    print(f"demo: rootfs list digest of the demo image (SEV-SNP: no RTMR3): {digest}", flush=True)
    return digest


# ── SEV-SNP: the simulated AMD guest (agent.sim.snp_sim) ─────────────────────

def snp_tsm_ops(p: DemoPaths) -> Any:
    """The configfs-tsm emulator with provider ``sev_guest`` (H3's emulator): bare 1184-byte reports."""
    from agent.sim.tsm_emulator import TsmReportFs

    return TsmReportFs(str(p.sim), source=snp_source(p), provider="sev_guest")


def snp_source(p: DemoPaths) -> Any:
    from agent.sim.snp_sim import SimulatedSnpSource

    return SimulatedSnpSource(str(p.sim))


def snp_trust(p: DemoPaths) -> tuple[SnpTrust, str]:
    """What the demo's validator needs for SEV-SNP, like the production API fetching from AMD's KDS: this
    simulated chip's VCEK and its ASK/ARK chain, and the simulated ARK as the one trusted root (explicitly,
    here only); plus the guest's launch MEASUREMENT (hex) to register."""
    return simulated_snp_trust(str(p.sim))


def _fresh_td(state: MrState) -> None:
    """A fresh simulated TD: RTMR0-2 as the simulated firmware/kernel measured them, RTMR3 zero (reference §6)."""
    state.reset_td(tuple(DEFAULT_RTMRS[:3]))


@contextlib.contextmanager
def emulators(p: DemoPaths, state: MrState, quote: str, tee: str = "tdx") -> Iterator[None]:
    """Mount the RTMR emulator and (``--quote emulated``) the configfs-tsm emulator whose quotes carry it.

    SEV-SNP: only the configfs-tsm emulator, provider ``sev_guest`` (bare reports signed by the simulated
    VCEK); there are no RTMRs to emulate.
    """
    from agent.sim.tsm_emulator import TsmReportFs
    from agent.sim.tsm_fuse import fuse_mounted

    sim_dir = str(p.sim)

    def tsm_ops() -> TsmReportFs:
        return TsmReportFs(sim_dir, source=LiveRtmrQuoteSource(state, sim_dir))

    with contextlib.ExitStack() as stack:
        if tee == "snp":
            if quote == "emulated":
                p.tsm_mount.mkdir(parents=True, exist_ok=True)
                stack.enter_context(fuse_mounted(lambda: snp_tsm_ops(p), fsname="configfs-tsm-emulator",
                                                 mountpoint=str(p.tsm_mount)))
            yield
            return
        p.mr_mount.mkdir(parents=True, exist_ok=True)
        stack.enter_context(fuse_mounted(lambda: MeasurementsFs(state), fsname="tdx-measurements-emulator",
                                         mountpoint=str(p.mr_mount)))
        if quote == "emulated":
            p.tsm_mount.mkdir(parents=True, exist_ok=True)
            stack.enter_context(fuse_mounted(tsm_ops, fsname="configfs-tsm-emulator", mountpoint=str(p.tsm_mount)))
        yield


def make_images(p: DemoPaths, v: FaithfulValidator, generation: str, fail: str) -> tuple[str, Secret, Secret]:
    """Config volume (miner-seed on 1.4.0), the root LUKS2 image and two blank storage volumes."""
    files = {"hostname": VM_NAME + "\n", "network-config.yaml": NETPLAN}
    if generation == "1.4":
        from agent.validator.proof import Hotkey

        seed = secrets.token_hex(32)  # a throw-away simulated miner key: it exists only on this config volume
        signer = Hotkey.from_seed_hex(seed)
        hotkey = signer.ss58
        signer.wipe()
        files["miner-seed"] = seed + "\n"
        del seed
    else:
        hotkey = random_hotkey()
    files["miner-ss58"] = hotkey + "\n"
    build_key = v.add_vm(VM_NAME, hotkey)
    make_ext4_image(str(p.config_image), files, label="tdx-config")
    root_key = Secret(secrets.token_hex(32).encode()) if fail == "wrong-key" else build_key
    make_luks_image(str(p.root_image), root_key, label="root",
                    first_boot_version="1.4.0" if generation == "1.4" else None)
    for image in (p.storage_image, p.tdx_cache_image):
        with open(image, "wb") as fh:
            fh.truncate(40 << 20)
    return hotkey, build_key, root_key


def inject_failure(rig: DemoRig, fail: str) -> None:
    p, v = rig.paths, rig.v
    if fail == "cipher-null":
        tamper_luks2_metadata(str(p.root_image), null_cipher_segment)
    elif fail in ("404", "401"):
        v.inject("attestation", Fault("status", status=int(fail), times=None, detail="injected by demo"))
    elif fail == "garbage":
        v.inject("attestation", Fault("garbage", times=None))
    elif fail == "root-confirm":
        # a refusal the validator states (4xx + its JSON detail): root_next is removed again; a 5xx would
        # leave the outcome unknown and keep both keys (agent.boot.confirm)
        v.inject("root_confirm", Fault("status", status=403, times=None, detail="injected by demo"))
    elif fail == "storage":
        v.inject(STORAGE_ENDPOINT[rig.generation], Fault("status", status=500, times=None,
                                                         detail="injected by demo"))
    elif fail == "rtmr3":
        (p.rootfs / "etc" / "chutes" / "agent.conf").write_bytes(b"# changed after the image was registered\n")


# ── boot and serve ───────────────────────────────────────────────────────────

async def _run_boot(p: DemoPaths) -> tuple[int, dict[str, Any] | None]:
    print(f"demo: running: chutes-attest --config {p.config} boot --no-poweroff\n", flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "--config", str(p.config), "--log-level", "warning", "boot",
        "--no-poweroff")
    rc = await proc.wait()
    status_path = p.handoff / "boot-status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else None
    print(f"\ndemo: chutes-attest boot exited {rc}"
          + (f": outcome={status['outcome']} reason={status.get('reason')}" if status else ""), flush=True)
    return rc, status


def _after_failure(rig: DemoRig) -> None:
    """A failed boot must leave a disk some key opens and no CA key behind: show it."""
    keys = checks.root_key_state(rig)
    ca_key = (rig.paths.handoff / "vm-root-ca" / "ca.key").exists()
    print(f"demo: after the failure: root.img opens with {keys.describe()}; "
          f"vm-root-ca/ca.key {'PRESENT' if ca_key else 'absent'}", flush=True)


@contextlib.asynccontextmanager
async def _notify_listener(path: Path) -> AsyncIterator[asyncio.Queue[str]]:
    """A NOTIFY_SOCKET (sd_notify datagrams) that the service reports READY/STATUS to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(sock.fileno(), lambda: queue.put_nowait(sock.recv(4096).decode(errors="replace")))
    try:
        yield queue
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()


async def _wait_ready(queue: asyncio.Queue[str], proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"chutes-attest serve exited {proc.returncode} before READY=1")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError("chutes-attest serve did not report READY=1 in time")
        try:
            msg = await asyncio.wait_for(queue.get(), min(remaining, 0.5))
        except TimeoutError:
            continue
        for line in msg.splitlines():
            if line.startswith("STATUS="):
                print(f"demo: service {line}", flush=True)
        if "READY=1" in msg.splitlines():
            return


async def _serve(rig: DemoRig, once: bool, summary: list[str]) -> tuple[int, list[checks.Check]]:
    p, v = rig.paths, rig.v
    config_id = "demo-" + secrets.token_hex(4)
    token = checks.launch_token(f"{v.api_url}/instances/launch_config/{config_id}", config_id)
    v.register_launch_config(config_id, token)
    notify_path = p.work / "notify.sock"
    t0 = time.monotonic()
    async with _notify_listener(notify_path) as queue:
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        env.pop("LISTEN_FDS", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "--config", str(p.config), "--log-level", "warning", "serve",
            env=env, start_new_session=True)
        try:
            await _wait_ready(queue, proc)
            rig.phases["serve_ready"] = (time.monotonic() - t0) * 1000
            print("\ndemo: service ready. Try:\n\n" + "\n".join(checks.curl_lines(p, rig.vm, token)) + "\n",
                  flush=True)
            if once:
                t1 = time.monotonic()
                results = await checks.self_test(rig, token)
                rig.phases["route_checks"] = (time.monotonic() - t1) * 1000
                return (0 if checks.print_checks(results) else 1), results
            print("\n".join(summary), flush=True)
            print("demo: press Ctrl-C to stop", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            waiter = asyncio.create_task(proc.wait())
            await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            return (0 if stop.is_set() else 1), []
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            print(f"demo: service stopped (exit {proc.returncode})", flush=True)


async def run_demo(work: Path, *, protocol: str = "1.4", quote: str = "emulated", fail: str = "none",
                   boot_only: bool = False, once: bool = False, tee: str = "tdx") -> int:
    """Set everything up, boot, then serve; everything is torn down on the way out."""
    err = check_options(protocol, fail, quote, tee)
    if err is not None:
        raise ValueError(err)
    t0 = time.monotonic()
    p = DemoPaths(work)
    if tee == "snp":  # Chutes' next names (§12.2): the only image generation that runs on SEV-SNP
        p.measure_conf = p.measure_conf.with_name("tee-measure.conf")
        p.manifest = p.manifest.with_name("rootfs-manifest")
    work.mkdir(parents=True, exist_ok=True)
    for stale in (p.run, p.self_signed_cert.parent, p.rootfs, p.measure_conf.parent.parent, work / "luks-hdr"):
        shutil.rmtree(stale, ignore_errors=True)  # a reused --work-dir: no hand-off from an earlier run
    (work / "kmsg").touch()
    p.handoff.mkdir(parents=True, exist_ok=True)
    print(f"demo: SIMULATED {TEE_NAMES[tee]} VM, generation {checks.GENERATION_NAMES[protocol]}; work dir {work}",
          flush=True)
    pki = load_or_create_sim_pki(p.sim)
    make_rootfs(p)
    list_digest = ""
    snp_measurement = ""
    if tee == "snp":
        predicted = predict_rtmr3(p, "next")  # writes the next-scheme manifest the initramfs carries
        list_digest = predict_list_digest(p)
        trust, snp_measurement = snp_trust(p)
        gen_version = {"1.2": "1.2.0-sim", "1.3": "1.3.1-sim", "1.4": "1.4.0-sim"}[protocol]
        v = FaithfulValidator(p.validator, root_ca_pem=pki.root_ca_pem, generation=protocol, legacy_luks=False,
                              measurements=[SnpMeasurementSet(f"simulated-snp-{protocol}", gen_version,
                                                              snp_measurement)], snp=trust)
    else:
        predicted = predict_rtmr3(p)
        v = FaithfulValidator(p.validator, root_ca_pem=pki.root_ca_pem, generation=protocol,
                              runtime_rtmr3=predicted if protocol != "1.2" else None, legacy_luks=False)
    hotkey, build_key, image_key = make_images(p, v, protocol, fail)
    state = MrState(DEFAULT_MR_TD)
    _fresh_td(state)
    rig = DemoRig(p, v, protocol, VM_NAME, hotkey, build_key, image_key, state, predicted, quote, tee=tee,
                  predicted_list_digest=list_digest, snp_measurement=snp_measurement)
    inject_failure(rig, fail)
    with emulators(p, state, quote, tee):
        async with v:
            write_config(rig)
            print(f"demo: validator (faithful, nginx TLS fronts): cvm {v.cvm_url}, legacy {v.url}, api {v.api_url}")
            where = ("configfs-tsm reader over the FUSE emulator at " + str(p.tsm_mount) if quote == "emulated"
                     else "the simulated source directly")
            if tee == "snp":
                print(f"demo: SEV-SNP reports: {where} (provider sev_guest; simulated VCEK <- ASK <- ARK, trusted "
                      "only by this demo's validator, explicitly); no RTMRs (rootfs: list digest vs manifest); "
                      "GPUs: 8 emulated H100", flush=True)
            else:
                print(f"demo: quotes: {where} (simulated PCK chain, never trusted by default); RTMRs: FUSE emulator "
                      f"at {p.mr_mount}; GPUs: 8 emulated H100", flush=True)
            rig.phases["setup"] = (time.monotonic() - t0) * 1000
            t1 = time.monotonic()
            rc, status = await _run_boot(p)
            rig.phases["boot_process"] = (time.monotonic() - t1) * 1000
            results: list[checks.Check] = []
            if rc != 0:
                _after_failure(rig)
            else:
                results = checks.boot_checks(rig, status or {})
                if not checks.print_checks(results):
                    rc = 1
            print("demo: hand-off files (mode path):\n" + "\n".join(
                f"demo:   {line}" for line in checks.handoff_listing(p)), flush=True)
            if rc != 0 or boot_only:
                print("\n".join(checks.summary_lines(protocol, status, rig.phases, results)), flush=True)
                return rc
            summary = checks.summary_lines(protocol, status, rig.phases, results)
            rc, route_results = await _serve(rig, once, summary)
            if once:
                print("\n".join(checks.summary_lines(protocol, status, rig.phases, results + route_results)),
                      flush=True)
            return rc


def default_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="chutes-attest-demo-"))

