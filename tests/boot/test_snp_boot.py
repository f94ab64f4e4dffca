"""The boot on an AMD SEV-SNP guest (issue 19 item 5), end to end against the faithful validator.

The real boot flow with ``boot.protocol = "auto"``, real LUKS2 images and nginx fronts; the SEV-SNP reports
come from the production configfs-tsm reader over the FUSE emulator (provider ``sev_guest``) or from the
simulated SNP source directly. The validator tells the report from a TDX quote by its bytes, verifies it with
the simulated AMD chain it was explicitly given (never trusted by default) and matches MEASUREMENT.

Checked with independent code here: the 1184-byte report the validator received and its REPORT_DATA =
nonce ‖ SHA-256(DER SPKI of the presented certificate); the rootfs digest file against a list digest
computed in this file (hashlib over the tree, byte-wise path order); the failure markers.
"""

from __future__ import annotations

import grp
import hashlib
import io
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import log as log_mod
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.flow import BootDeps, BootOutcome, run_boot
from agent.config import AgentConfig
from agent.evidence.rootfs_measure import format_manifest, predict_entries
from agent.log import Secret
from agent.sim.luks_image import make_ext4_image, make_luks_image
from agent.sim.validator import FaithfulValidator, SnpMeasurementSet, simulated_snp_trust
from agent.validator.proof import Hotkey
from tests.boot.rig_deps import rig_deps

pytestmark = pytest.mark.integration

SEED = "4c0f5b3a9e1d2c7b8a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
NETPLAN = "network:\n  ethernets:\n    enp0s2:\n      addresses: [10.20.30.40/24]\n      gateway4: 10.20.30.1\n"
MARKER = "ROOTFS-MEASURE-FAILED: rootfs: "
SNP_MISMATCH = "SEV-SNP: root filesystem does not match the canonical manifest ("
TREE = {"etc/chutes/a.conf": b"a=1\n", "usr/bin/agent": os.urandom(70_000), "usr/lib/x.so": b"\x7fELF" + bytes(300),
        "etc/hostname": b"vm\n", "var/unmeasured": b"not listed\n"}
#: next list rules: overlap (a file named again inside /etc), absent entries (contribute nothing)
CONF = "/etc\n/usr\n/etc/chutes/a.conf  # again\n/etc/default/rootfs-verify\n/etc/ld.so.preload\n"


def model_list_digest(root: Path, tops: tuple[str, ...] = ("etc", "usr")) -> str:
    """An independent model of the next list digest: every regular file under the listed trees, once, in
    byte-wise path order, ``<sha384 hex> <path>\\n`` per file, SHA-384 over the text."""
    files: set[bytes] = set()
    for top in tops:
        for dirpath, _, names in os.walk(root / top):
            for n in names:
                full = Path(dirpath) / n
                if full.is_file() and not full.is_symlink():
                    files.add(b"/" + os.fsencode(full.relative_to(root)))
    text = b"".join(hashlib.sha384((root / os.fsdecode(rel[1:])).read_bytes()).hexdigest().encode() + b" " + rel + b"\n"
                    for rel in sorted(files))
    return hashlib.sha384(text).hexdigest()


def spki_sha256(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


@dataclass
class SnpRig:
    tmp: Path
    cfg: AgentConfig
    v: FaithfulValidator
    source: Any
    vm: str
    build_key: Secret
    console: io.StringIO
    logs: io.StringIO

    def deps(self) -> BootDeps:
        return rig_deps(self.cfg, self.source, self.console, self.tmp)

    async def run(self) -> BootOutcome:
        log_mod.configure("debug", "json", stream=self.logs)
        return await run_boot(self.cfg, self.deps(), poweroff=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.boot.handoff_dir)

    @property
    def digest_file(self) -> Path:
        return Path(self.cfg.boot.rootfs_digest_file)

    def line(self, outcome: BootOutcome) -> str:
        assert not outcome.ok
        assert outcome.failure_line in self.console.getvalue()
        assert outcome.failure_line in Path(self.cfg.boot.kmsg_path).read_text()
        return outcome.failure_line


def _make_tree(tmp: Path) -> tuple[Path, Path, Path]:
    root = tmp / "rootfs"
    for rel, data in TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    conf = tmp / "initramfs" / "tee-measure.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(CONF)
    result = predict_entries(str(root), [b"/etc", b"/usr", b"/etc/chutes/a.conf", b"/etc/default/rootfs-verify",
                                         b"/etc/ld.so.preload"], scheme="next")
    manifest = tmp / "initramfs" / "rootfs-manifest"
    manifest.write_bytes(format_manifest(result))
    return root, conf, manifest


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Any]:
    started: list[FaithfulValidator] = []

    async def factory(gen: str = "1.4", *, source: Any = None, trust: bool = True) -> SnpRig:
        from agent.sim.snp_sim import SimulatedSnpSource

        sim = tmp_path / "sim"
        src = source if source is not None else SimulatedSnpSource(str(sim))
        root, conf, manifest = _make_tree(tmp_path)
        snp_trust, measurement = simulated_snp_trust(str(sim))
        version = {"1.2": "1.2.0-sim", "1.3": "1.3.1-sim", "1.4": "1.4.0-sim"}[gen]
        v = FaithfulValidator(tmp_path / "validator", root_ca_pem=b"", generation=gen, legacy_luks=False,
                              measurements=[SnpMeasurementSet(f"sim-snp-{gen}", version, measurement)],
                              snp=snp_trust if trust else None)
        await v.start()
        started.append(v)
        seed = SEED if gen == "1.4" else None
        hotkey = Hotkey.from_seed_hex(SEED).ss58
        vm = "chutes-snp-01"
        build_key = v.add_vm(vm, hotkey)
        files = {"hostname": vm + "\n", "miner-ss58": hotkey + "\n", "network-config.yaml": NETPLAN}
        if seed:
            files["miner-seed"] = seed + "\n"
        make_ext4_image(str(tmp_path / "config.img"), files, label="tdx-config")
        make_luks_image(str(tmp_path / "root.img"), build_key, label="root",
                        first_boot_version="1.4.0" if gen == "1.4" else None)
        for label in ("storage", "tdx-cache"):
            with open(tmp_path / f"{label}.img", "wb") as fh:
                fh.truncate(40 << 20)
        cfg = AgentConfig()
        cfg.quote.tee = "snp"
        b = cfg.boot
        b.protocol = "auto"
        b.tdx_base_url, b.validator_base_url, b.ca_bundle = v.tdx_base_url, v.api_url, v.ca_bundle
        b.legacy_tdx_base_url = v.legacy_tdx_base_url
        b.config_device, b.config_mount = str(tmp_path / "config.img"), str(tmp_path / "mnt-config")
        b.root_device = str(tmp_path / "root.img")
        b.storage_device, b.tdx_cache_device = str(tmp_path / "storage.img"), str(tmp_path / "tdx-cache.img")
        b.header_dir, b.handoff_dir = str(tmp_path / "luks-hdr"), str(tmp_path / "run-chutes")
        b.kmsg_path = str(tmp_path / "kmsg")
        Path(b.kmsg_path).touch()
        b.unlock_action, b.device_wait_s = "test-passphrase", 0.0
        b.max_attempts, b.backoff_s, b.total_timeout_s, b.request_timeout_s = 2, 0.1, 60.0, 10.0
        b.format_pbkdf, b.format_pbkdf_iterations = "pbkdf2", 1000
        b.rootfs_dir, b.measure_conf, b.rtmr3_manifest = str(root), str(conf), str(manifest)
        b.rtmr3_scheme = "next"
        b.rootfs_digest_file = str(tmp_path / "run-sek8s" / "rootfs-digest")
        b.proxy_tls_group = grp.getgrgid(os.getgid()).gr_name
        b.signing_root_key = v.signing_root_pem_path
        b.poweroff = False
        cfg.rtmr.sysfs_path = str(tmp_path / "no-rtmr3" / "rtmr3:sha384")  # SEV-SNP: never touched
        cfg.serve.boot_status_path = str(tmp_path / "run-chutes" / "boot-status.json")
        return SnpRig(tmp_path, cfg, v, src, vm, build_key, io.StringIO(), io.StringIO())

    yield factory


@pytest.fixture
async def rigs(make_rig: Any) -> AsyncIterator[Any]:
    made: list[SnpRig] = []

    async def get(*a: Any, **kw: Any) -> SnpRig:
        r = await make_rig(*a, **kw)
        made.append(r)
        return r

    yield get
    for r in made:
        await r.v.stop()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _assert_report_received(rig: SnpRig, endpoint: str, cert_pem: bytes, nonce_key: str) -> dict[str, Any]:
    """The validator got a 1184-byte SEV-SNP report bound to its nonce and the presented certificate."""
    (call,) = [c for c in rig.v.calls(endpoint) if c.get("status") == 200]
    assert call["tee"] == "snp" and call["quote_bytes"] == 1184 and call["quote_verified"] is True
    assert call["report_data"] == call[nonce_key] + spki_sha256(cert_pem).hex()
    return call


async def test_snp_14_boot_through_configfs_sends_the_report_and_leaves_the_rootfs_digest(rigs: Any) -> None:
    """As the ``boot`` command runs it: no source yet, the flow makes the configfs-tsm one after the network."""
    from agent.sim.tsm_emulator import mounted_tsm

    rig: SnpRig = await rigs("1.4")
    with mounted_tsm(str(rig.tmp / "sim"), provider="sev_guest") as (mnt, _faults):
        rig.cfg.quote.source, rig.cfg.quote.configfs_root = "configfs", mnt
        rig.source = None
        outcome = await rig.run()
    assert outcome.ok, outcome.reason
    st = outcome.status
    assert st["quote_source"] == "configfs"
    assert st["tee"] == "snp" and st["tee_resolved"] == 'pinned by quote.tee = "snp"'
    assert st["generation"] == "1.4" and st["measurements"]["tee"] == "snp"
    assert "[tee           ] ok" in rig.console.getvalue() and "AMD SEV-SNP" in rig.console.getvalue()
    # boot attestation: bound to the boot nonce and the per-boot VM root CA (the mTLS client cert)
    ca_pem = (rig.run_dir / "vm-root-ca" / "ca.crt").read_bytes()
    _assert_report_received(rig, "attestation", ca_pem, "nonce")
    # provision: a second report over luks_quote_nonce ‖ the same CA hash
    (prov,) = [c for c in rig.v.calls("provision") if c.get("status") == 200]
    assert prov["tee"] == "snp" and prov["quote_bytes"] == 1184
    assert prov["report_data"][64:] == spki_sha256(ca_pem).hex()
    # the rootfs step: no RTMR3, the digest file equals an independent model, 0444, "<hex>\n"
    want = model_list_digest(Path(rig.cfg.boot.rootfs_dir))
    assert rig.digest_file.read_text() == want + "\n" and _mode(rig.digest_file) == 0o444
    assert st["rootfs"]["digest"] == want and "rtmr3" not in st
    assert not Path(rig.cfg.rtmr.sysfs_path).parent.exists()
    stages = [s["stage"] for s in st["stages"]]
    assert stages.index("network") < stages.index("tee") < stages.index("nonce")
    assert "rootfs" in stages and "rtmr3" not in stages
    cs = Cryptsetup()
    assert cs.test_key(rig.cfg.boot.root_device, rig.v.root_key(rig.vm))
    for label in ("storage", "tdx-cache"):
        key = rig.v.volume_key(rig.vm, label)
        assert key is not None and cs.test_key(getattr(rig.cfg.boot, f"{label.replace('-', '_')}_device"), key)


async def test_snp_13_boot_with_the_simulated_source(rigs: Any) -> None:
    rig: SnpRig = await rigs("1.3")
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.status["generation"] == "1.3" and outcome.status["tee"] == "snp"
    assert outcome.status["tee_resolved"] == "from the simulated quote source"
    assert rig.digest_file.read_text() == model_list_digest(Path(rig.cfg.boot.rootfs_dir)) + "\n"
    (att,) = [c for c in rig.v.attestations() if c.get("status") == 200]
    assert att["tee"] == "snp" and att["quote_bytes"] == 1184


async def test_snp_rootfs_mismatch_fails_closed_with_the_marker(rigs: Any) -> None:
    rig: SnpRig = await rigs("1.4")
    (Path(rig.cfg.boot.rootfs_dir) / "etc" / "chutes" / "a.conf").write_bytes(b"a=2\n")  # after registration
    outcome = await rig.run()
    line = rig.line(outcome)
    assert line.startswith(MARKER + SNP_MISMATCH), line
    assert "1 changed, first /etc/chutes/a.conf" in line
    assert outcome.exit_code == 3
    assert not rig.digest_file.exists()
    assert not rig.v.calls("provision")  # no storage key was requested
    assert not (rig.run_dir / "vm-root-ca" / "ca.key").exists()


async def test_snp_extra_file_not_in_the_manifest_fails_closed(rigs: Any) -> None:
    rig: SnpRig = await rigs("1.4")
    (Path(rig.cfg.boot.rootfs_dir) / "usr" / "bin" / "planted").write_bytes(b"#!/bin/sh\n")
    line = rig.line(await rig.run())
    assert line.startswith(MARKER + SNP_MISMATCH) and "1 not in the manifest, first /usr/bin/planted" in line
    assert not rig.digest_file.exists()


async def test_snp_missing_manifest_is_fatal(rigs: Any) -> None:
    rig: SnpRig = await rigs("1.4")
    os.unlink(rig.cfg.boot.rtmr3_manifest)
    line = rig.line(await rig.run())
    assert line.startswith(MARKER + "cannot read manifest "), line
    assert not rig.digest_file.exists() and not rig.v.calls("provision")


async def test_snp_digest_file_symlink_is_replaced_not_followed(rigs: Any) -> None:
    rig: SnpRig = await rigs("1.4")
    target = rig.tmp / "elsewhere"
    target.write_text("keep\n")
    rig.digest_file.parent.mkdir(parents=True)
    rig.digest_file.symlink_to(target)
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert target.read_text() == "keep\n" and not rig.digest_file.is_symlink()
    assert rig.digest_file.read_text() == model_list_digest(Path(rig.cfg.boot.rootfs_dir)) + "\n"


async def test_snp_debug_policy_report_is_refused_by_the_self_check(rigs: Any, tmp_path: Path) -> None:
    from agent.sim.snp_sim import SimulatedSnpSource

    rig: SnpRig = await rigs("1.4", source=SimulatedSnpSource(str(tmp_path / "sim"), debug=True))
    outcome = await rig.run()
    assert outcome.reason == "self_check: own SNP report: POLICY.DEBUG is set; refusing to request keys"
    assert rig.line(outcome).startswith("TDX-LUKS-UNLOCK-FAILED: self_check: own SNP report: POLICY.DEBUG")
    assert outcome.exit_code == 3
    assert not rig.v.attestations()  # the report never left the VM


async def test_snp_report_refused_by_a_validator_without_snp_trust(rigs: Any) -> None:
    """The simulated AMD chain is never trusted by default: a validator not given it refuses every report."""
    rig: SnpRig = await rigs("1.4", trust=False)
    outcome = await rig.run()
    assert not outcome.ok and "403" in outcome.reason
    att = rig.v.attestations()
    assert att and all(a["status"] == 403 and a["tee"] == "snp" for a in att)
    assert att[0]["quote_problem"] == "no SNP trust configured"


async def test_tee_auto_without_any_guest_device_fails_closed(rigs: Any, tmp_path: Path) -> None:
    """quote.tee = "auto" with the production source and neither device: power-off path, named devices."""
    from agent.evidence.configfs_tsm import ConfigfsTsmSource

    rig: SnpRig = await rigs("1.4")
    rig.cfg.quote.tee = "auto"
    rig.cfg.quote.tdx_device = str(tmp_path / "dev" / "tdx_guest")
    rig.cfg.quote.sev_device = str(tmp_path / "dev" / "sev-guest")
    rig.cfg.quote.source = "configfs"
    for source in (ConfigfsTsmSource(str(tmp_path / "no-tsm"), tee="snp"), None):  # made earlier, or by the flow
        rig.source = source
        outcome = await rig.run()
        line = rig.line(outcome)
        assert line.startswith("TDX-LUKS-UNLOCK-FAILED: tee: no TEE guest device: "), line
        assert "tdx_guest" in line and "sev-guest" in line and outcome.exit_code == 5
        stages = [s["stage"] for s in outcome.status["stages"]]
        assert stages[:3] == ["config", "network", "tee"]  # after the network, as Chutes' next decides it
    assert not rig.v.calls("nonce")  # decided before any validator call
