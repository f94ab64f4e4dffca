"""Stage 1, generation 1.4.0: the real initramfs boots the real kernel and runs the whole 1.4.0 flow.

Real: Debian's kernel and initramfs-tools with the package's hook, the agent over real TLS (nginx, mTLS
with the per-boot VM root CA) to the faithful validator generation 1.4 on the host (cvm + api fronts),
``miner-seed`` on the config volume (sr25519-signed calls), token 15 and ``cryptsetup open`` + root
rotation on a real LUKS2 root, two real LUKS2 data volumes labelled ``storage``/``tdx-cache`` found by
label, opened and rotated, the RTMR3 rootfs chain over the unlocked root's measured paths. Emulated
(qemu TCG has no TDX): configfs-tsm and the RTMR sysfs, by the project's FUSE emulators started from a
test-only init-top script (tests/vm/guest_emulators.py); the agent reaches both through its production
code (``quote.source = "configfs"``, ``rtmr.sysfs_path``). Simulated: the quotes' PCK chain.

After power-off the disks (per-test copies the guest wrote to) are checked from the host with
``cryptsetup --test-passphrase``.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from agent.boot.cryptsetup import Cryptsetup
from agent.log import Secret
from agent.sim.validator_state import VolumeKeys

from .conftest import FAILED, REPO, boot_vm, vmlib

pytestmark = pytest.mark.vm

LABELS = ("storage", "tdx-cache")
FILE_LINE = re.compile(r"^(?P<path>\S+) (?P<type>.+) mode=(?P<mode>[0-7]+) uid=(?P<uid>\d+) gid=(?P<gid>\d+)$")
KUBECONFIG = b"apiVersion: v1\nkind: Config\nusers: [{name: admin, user: {token: left-by-k3s}}]\n"


@pytest.fixture(scope="module")
def v14_images() -> dict:
    root = vmlib.root1()
    measurement = vmlib.Measurement.of(root)
    return {
        "root": root,
        "measurement": measurement,
        "initrd": vmlib.initramfs_v14(measurement),
        "config": vmlib.config_volume(miner=vmlib.miner_ss58_v14(), seed=vmlib.MINER_SEED),
    }


def test_v14_image_is_package_only_with_chutes_shaped_measurement(v14_images: dict) -> None:
    """The 1.4.0 image: what the boot reads came from the build root through the package's hook (the list,
    the manifest, the signing root, the CA bundle: byte for byte), the extra tree holds test-only parts alone
    (the hook refuses a required file there), and the list and manifest are shaped like Chutes' (§12.1, §12.3):
    comments, entries absent on purpose, overlapping entries, path-first lines, a file listed twice."""
    import subprocess
    import tempfile

    m: vmlib.Measurement = v14_images["measurement"]
    conf = m.measure_conf.decode()
    assert "/etc/default/rtmr3-verify" in conf and "\n/sbin\n" in conf and "\n/sbin/init " in conf
    lines = m.manifest.decode().splitlines()
    assert lines[0].startswith("#")
    walked = [ln for ln in lines if not ln.startswith("#")]
    assert all(re.fullmatch(r"/\S+ [0-9a-f]{96}", ln) for ln in walked), walked
    init = next(ln for ln in walked if ln.startswith("/sbin/init "))
    assert len(walked) > len(set(walked)) and walked.count(init) == 2
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["unmkinitramfs", str(v14_images["initrd"]), d], check=True)
        root = Path(d) / "main" if (Path(d) / "main").is_dir() else Path(d)
        assert (root / "etc/tdx-measure.conf").read_bytes() == m.measure_conf
        assert (root / "etc/tdx-rtmr3-expected-hashes").read_bytes() == m.manifest
        assert (root / "etc/chutes/root-signing-key.pem").read_bytes() == vmlib.signing_root().public_pem
        assert (root / vmlib.VALIDATOR_CA_PATH.lstrip("/")).read_bytes() == (vmlib.tls() / "ca.pem").read_bytes()
        assert (root / "usr/lib/chutes-vm-test/guest_emulators.py").is_file()  # the test-only extra


def _files(console) -> dict[str, dict]:
    out = {}
    for line in console.lines_with("STAGE1-FILE:"):
        m = FILE_LINE.match(line)
        assert m, line
        out[m["path"]] = {"type": m["type"], "mode": int(m["mode"], 8), "uid": int(m["uid"]), "gid": int(m["gid"])}
    return out


def _pem(console, path: str) -> bytes:
    lines = [ln.split(" ", 1)[1] for ln in console.lines_with("STAGE1-PEM:") if ln.startswith(path + " ")]
    return ("\n".join(lines) + "\n").encode()


def _timings(status: dict, console) -> dict:
    """The 1.4.0 boot's stage timings; the keygen wait = how long ``client_cert`` waited for the RSA-4096 CA
    key that the CLI started before the flow's imports (overlapping config volume + network)."""
    stages = [{"stage": s["stage"], "ms": s["duration_ms"], "result": s["result"],
               **({"waits_ms": s["waits_ms"]} if s.get("waits_ms") else {})} for s in status["stages"]]
    cc = next(s for s in status["stages"] if s["stage"] == "client_cert")
    before = sum(s["duration_ms"] for s in status["stages"][: status["stages"].index(cc)])
    t0, t1 = console.kmsg_time("chutes-attest: agent starting"), console.kmsg_time("chutes-attest: agent done")
    return {
        "agent_process_s": round(t1 - t0, 3) if t0 is not None and t1 is not None else None,
        "keygen_wait_ms": cc["waits_ms"].get("keygen", 0.0),
        "flow_ms_before_client_cert": round(before, 1),
        "totals": status.get("timings"),
        "stages": stages,
    }


def _record_timing(name: str, data: dict) -> None:
    out = REPO / ".cache" / "vm" / "logs" / "timings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    allt = json.loads(out.read_text()) if out.exists() else {}
    allt[name] = data
    out.write_text(json.dumps(allt, indent=2))


async def test_v14_boot_rotates_root_provisions_storage_and_hands_off(tmp_path: Path, v14_images: dict) -> None:
    root: vmlib.LuksDisk = v14_images["root"]
    m: vmlib.Measurement = v14_images["measurement"]
    hotkey = vmlib.miner_ss58_v14()
    cs = Cryptsetup()
    disk = vmlib.writable_root(root, tmp_path / "root.img")  # token 15: this is a first boot
    build_key = Secret(root.passphrase)
    assert cs.token_exists(str(disk), 15) and cs.test_key(str(disk), build_key)
    old = {label: secrets.token_hex(64).encode() for label in LABELS}
    vols = {
        "storage": vmlib.storage_disk("storage", tmp_path / "storage.img", old["storage"],
                                      {"rancher-config/k3s.yaml": KUBECONFIG}),
        "tdx-cache": vmlib.storage_disk("tdx-cache", tmp_path / "tdx-cache.img", old["tdx-cache"]),
    }
    gid = int((v14_images["initrd"].parent / "tdx-attest.gid").read_text())

    async with vmlib.faithful_validator(tmp_path / "validator", generation="1.4", runtime_rtmr3=m.rtmr3) as v:
        v.add_vm(vmlib.HOSTNAME, hotkey, build_key)
        for label in LABELS:  # the volumes exist already: the validator holds their current keys
            v.vm(vmlib.HOSTNAME).volumes[label] = VolumeKeys(current=Secret(old[label]))
        console = await boot_vm(tmp_path, v14_images["initrd"], [disk, v14_images["config"], *vols.values()],
                                "stage1-v14", writable=[disk, *vols.values()], timeout_s=600)
        text = console.text
        assert FAILED not in text and "-FAILED:" not in text, text[-4000:]
        assert "VM-TEST-EMULATORS: mounted" in text, text[-4000:]
        assert "STAGE1-DONE" in text, text[-4000:]
        # the init that ran is the one on the unlocked, rotated root
        assert console.lines_with("STAGE1-ROOT:") == ["/dev/mapper/root"]
        assert console.lines_with("STAGE1-MARKER:") == [root.marker]
        assert console.lines_with("STAGE1-MAPPER:")[0].split() == sorted(["control", "root", *LABELS])

        status = json.loads(console.lines_with("STAGE1-BOOT-STATUS:")[0])
        assert status["outcome"] == "unlocked" and status["generation"] == "1.4", status.get("reason")
        assert all(s["result"] in ("ok", "skipped") for s in status["stages"]), status["stages"]
        names = [s["stage"] for s in status["stages"]]
        for stage in ("config", "network", "client_cert", "attestation", "first_boot", "unlock", "root_rotation",
                      "rtmr3", "storage_keys", "storage_volumes", "storage_confirm", "vm_tls", "validator_auth",
                      "signing_keys", "handoff"):
            assert stage in names, (stage, names)
        assert names.index("root_rotation") < names.index("rtmr3") < names.index("storage_keys")
        rot = status["root_rotation"]
        assert rot["confirmed"] is True, rot
        # RTMR3 chain over the real root's measured paths, extended through the emulated sysfs, from zero, to
        # the value the independent stand-in for Chutes' pipeline registered: every manifest line one extension
        # (duplicates kept on 1.4), the two absent entries contributing nothing
        walked = [ln for ln in m.manifest.decode().splitlines() if ln and not ln.startswith("#")]
        assert status["rtmr3"]["value"] == m.rtmr3 and status["rtmr3"]["scheme"] == "1.4"
        assert status["rtmr3"]["extensions"] == len(walked) and status["rtmr3"]["absent"] == 2, status["rtmr3"]
        assert {status["storage"][label]["outcome"] for label in LABELS} == {"rotated"}, status["storage"]
        assert not any(status["storage"][label]["formatted"] for label in LABELS)
        assert any(e.get("event") == "boot.kubeconfig_purged" for e in console.events())

        # hand-off files and modes (reference §7, §12.6): uid 0, /run/chutes and vm-root-ca/ 0700 as Chutes keeps
        # them (the service gets its subtree through its unit), proxy TLS group-readable by tdx-attest
        files = _files(console)
        run = "/run/chutes"
        want = {
            run: 0o700, f"{run}/vm-name": 0o600, f"{run}/hotkey": 0o600, f"{run}/luks-quote-nonce": 0o600,
            f"{run}/validator-ss58": 0o600, f"{run}/validator-auth.env": 0o600,
            f"{run}/k3s-encryption-config.yaml": 0o600,
            f"{run}/vm-root-ca": 0o700, f"{run}/vm-root-ca/ca.crt": 0o644,
            f"{run}/proxy-tls": 0o750, f"{run}/proxy-tls/server.crt": 0o640, f"{run}/proxy-tls/server.key": 0o640,
            f"{run}/registry-tls": 0o700, f"{run}/registry-tls/client.crt": 0o644,
            f"{run}/registry-tls/client.key": 0o600,
        }
        got = {p: files[p]["mode"] for p in want if p in files}
        assert {p: oct(x) for p, x in got.items()} == {p: oct(x) for p, x in want.items()}
        assert all(f["uid"] == 0 for f in files.values()), files
        assert gid > 0
        for p in ("proxy-tls", "proxy-tls/server.crt", "proxy-tls/server.key"):
            assert files[f"{run}/{p}"]["gid"] == gid, (p, files[f"{run}/{p}"], gid)
        assert files[run]["gid"] == 0 and files[f"{run}/vm-root-ca"]["gid"] == 0
        for gone in ("vm-root-ca/ca.key", "vm-root-ca/ca.srl", "cert-hash", "miner-seed", "boot-token"):
            assert f"{run}/{gone}" not in files, gone  # CA key deleted before pivot_root; seed after last call
        for name in ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg"):
            assert files[f"{run}/signing-keys/{name}"]["type"] == "regular file"

        # the validator stored exactly the CA the VM handed off; the proxy leaf is signed by it
        ca_pem = _pem(console, f"{run}/vm-root-ca/ca.crt")
        assert v.stored_ca_pem(vmlib.HOSTNAME) == ca_pem
        ca = x509.load_pem_x509_certificate(ca_pem)
        leaf = x509.load_pem_x509_certificate(_pem(console, f"{run}/proxy-tls/server.crt"))
        ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(),
                               leaf.signature_hash_algorithm)
        assert ca.public_key().key_size == 4096 and leaf.public_key().key_size == 2048
        assert leaf.issuer == ca.subject and leaf.serial_number == 1

        # every boot call went to the cvm front, signed; one nonce, one attestation, provision + confirms
        calls = [e for e in v.events if "fault" not in e]
        eps = [e["endpoint"] for e in calls]
        for ep in ("nonce", "attestation", "provision"):
            assert eps.count(ep) == 1, eps
            ev = next(e for e in calls if e["endpoint"] == ep)
            assert ev["front"] == "cvm" and ev["status"] in (200, 201), ev
        assert v.key_state(vmlib.HOSTNAME)["root"] == "rotated"
        assert v.key_state(vmlib.HOSTNAME)["vm_auth_ss58"] is not None

        # on the disks the guest wrote: the build passphrase no longer opens the root, the rotated key does
        new_root = v.root_key(vmlib.HOSTNAME)
        assert not cs.test_key(str(disk), build_key)
        assert cs.test_key(str(disk), new_root)
        assert not cs.token_exists(str(disk), 15)
        assert len(cs.keyslots(str(disk))) == 1
        for label, img in vols.items():
            promoted = v.volume_key(vmlib.HOSTNAME, label)
            assert promoted is not None and bytes(promoted.reveal()) != old[label]
            assert not cs.test_key(str(img), Secret(old[label]))
            assert cs.test_key(str(img), promoted)
            assert len(cs.keyslots(str(img))) == 1

        # no key, passphrase or seed on the console
        for s in (root.passphrase, bytes(new_root.reveal()), *old.values(), vmlib.MINER_SEED.encode(),
                  *v.secret_values()):
            assert s not in text.encode()

    timings = _timings(status, console)
    _record_timing("stage1_v14", timings)
    print("\n1.4.0 VM boot (qemu TCG, 1 vCPU) stage timings:")
    for s in timings["stages"]:
        waits = ", ".join(f"{k} {w:.0f} ms" for k, w in s.get("waits_ms", {}).items())
        print(f"  {s['stage']:<20} {s['ms']:9.1f} ms  {s['result']:<7} {waits}")
    print(f"  keygen wait in client_cert (RSA-4096 VM root CA on the critical path): {timings['keygen_wait_ms']:.0f} ms"
          f" after {timings['flow_ms_before_client_cert']:.0f} ms of config + network stages it overlapped")
    print(f"  agent process (kmsg): {timings['agent_process_s']} s; totals: {json.dumps(timings['totals'])}")
