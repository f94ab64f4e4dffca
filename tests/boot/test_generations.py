"""The generation-aware boot (issue 10 items 1, 6-8) end to end, per generation, with ``boot.protocol = "auto"``:
faithful validator behind real nginx (cvm / legacy / api fronts), real LUKS2 images, the FUSE RTMR emulator
with quotes that carry its registers, a real rootfs tree for the RTMR3 chain; plus the failure matrix of the
new calls (each ends with the reference's marker and a disk that some key still opens)."""

from __future__ import annotations

import grp
import io
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent import log as log_mod
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.flow import BootDeps, BootOutcome, run_boot
from agent.config import AgentConfig
from agent.evidence.rootfs_measure import format_manifest, predict_entries
from agent.log import Secret
from agent.sim.luks_image import make_ext4_image, make_luks_image
from agent.sim.validator import FaithfulValidator, Fault
from agent.validator.proof import Hotkey
from tests.boot.conftest import ProcScanner
from tests.boot.rig_deps import rig_deps

if TYPE_CHECKING:  # the FUSE emulator needs fusepy + libfuse: imported where a test runs, not at collection
    from agent.sim.tsm_mr_emulator import LiveRtmrQuoteSource, MrState

pytestmark = pytest.mark.integration

SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
NETPLAN = "network:\n  ethernets:\n    enp0s2:\n      addresses: [10.20.30.40/24]\n      gateway4: 10.20.30.1\n"


@pytest.fixture(scope="module")
def mr() -> Iterator[tuple[str, MrState]]:
    from agent.sim.tsm_mr_emulator import mounted_measurements

    with mounted_measurements() as (mnt, state):
        yield mnt, state


def _rootfs(tmp: Path, scheme: str = "1.4") -> tuple[Path, Path, Path, str]:
    root = tmp / "rootfs"
    for rel, data in {"etc/chutes/a.conf": b"a=1\n", "usr/bin/agent": os.urandom(70_000),
                      "usr/lib/x.so": b"\x7fELF" + bytes(300), "etc/hostname": b"vm\n"}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    conf = tmp / "tdx-measure.conf"
    conf.write_text("/etc\n/usr\n/etc/chutes/a.conf\n/etc/default/rtmr3-verify\n")  # overlap, absent path
    result = predict_entries(str(root), [b"/etc", b"/usr", b"/etc/chutes/a.conf", b"/etc/default/rtmr3-verify"],
                             scheme=scheme)
    manifest = tmp / "tdx-rtmr3-expected-hashes"
    manifest.write_bytes(format_manifest(result))
    return root, conf, manifest, result.rtmr3.hex()


@dataclass
class GenRig:
    tmp: Path
    gen: str
    cfg: AgentConfig
    v: FaithfulValidator
    source: LiveRtmrQuoteSource
    state: MrState
    vm: str
    hotkey: str
    build_key: Secret
    seed: str | None
    console: io.StringIO
    logs: io.StringIO
    procs: ProcScanner | None = None

    def deps(self) -> BootDeps:
        return rig_deps(self.cfg, self.source, self.console, self.tmp)

    async def run(self) -> BootOutcome:
        _zero_rtmr3(self.state)
        log_mod.configure("debug", "json", stream=self.logs)
        with ProcScanner() as self.procs:
            return await run_boot(self.cfg, self.deps(), poweroff=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.boot.handoff_dir)

    def secrets(self) -> list[bytes]:
        out = [bytes(self.build_key.reveal()), *self.v.secret_values()]
        if self.seed:
            out.append(self.seed.encode())
        return [s for s in out if s]

    def assert_no_secret_leaked(self, allowed_files: tuple[str, ...] = ()) -> None:
        secrets_ = self.secrets()
        for name, text in (("logs", self.logs.getvalue()), ("console", self.console.getvalue())):
            for s in secrets_:
                assert s not in text.encode(), f"secret in {name}"
        skip = {self.run_dir / n for n in ("k3s-encryption-config.yaml", "boot-token", *allowed_files)}
        skip.add(self.tmp / "config.img")  # the host-supplied input holds the seed by design
        for path in self.tmp.rglob("*"):
            if path.is_file() and not path.is_socket() and path not in skip and "validator" not in path.parts:
                data = path.read_bytes()
                for s in secrets_:
                    assert s not in data, f"secret in {path}"
        assert self.procs is not None
        for blob in self.procs.seen:
            for s in secrets_:
                assert s not in blob, "secret in a process argv/environment"


def _zero_rtmr3(state: MrState) -> None:
    """A fresh TD per boot: RTMR0-2 as the simulated firmware/kernel measured them, RTMR3 zero."""
    from agent.sim.quote_sim import DEFAULT_RTMRS

    state.reset_td(tuple(DEFAULT_RTMRS[:3]))


@pytest.fixture
def make_rig(tmp_path: Path, mr: tuple[str, MrState]) -> Any:
    started: list[FaithfulValidator] = []

    async def factory(gen: str, *, with_seed: bool | None = None, scheme: str = "1.4") -> GenRig:
        mnt, state = mr
        root, conf, manifest, rtmr3 = _rootfs(tmp_path, scheme)
        from agent.sim.tsm_mr_emulator import LiveRtmrQuoteSource

        source = LiveRtmrQuoteSource(state, str(tmp_path / "sim"))
        v = FaithfulValidator(tmp_path / "validator", root_ca_pem=source.root_ca_pem, generation=gen,
                              runtime_rtmr3=rtmr3, legacy_luks=False)
        await v.start()
        started.append(v)
        seed = SEED if (with_seed if with_seed is not None else gen == "1.4") else None
        if seed:
            hotkey = Hotkey.from_seed_hex(seed).ss58
        else:
            from agent.sim.luks_image import random_hotkey

            hotkey = random_hotkey()
        vm = "chutes-vm-07"
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
        b = cfg.boot
        b.protocol = "auto"
        b.tdx_base_url, b.validator_base_url, b.ca_bundle = v.tdx_base_url, v.api_url, v.ca_bundle
        b.legacy_tdx_base_url = v.legacy_tdx_base_url  # 1.3.x luks/attest: the legacy attestation proxy only
        b.config_device, b.config_mount = str(tmp_path / "config.img"), str(tmp_path / "mnt-config")
        b.root_device = str(tmp_path / "root.img")
        b.storage_device, b.tdx_cache_device = str(tmp_path / "storage.img"), str(tmp_path / "tdx-cache.img")
        b.header_dir, b.handoff_dir = str(tmp_path / "luks-hdr"), str(tmp_path / "run-chutes")
        b.kmsg_path = str(tmp_path / "kmsg")
        Path(b.kmsg_path).touch()
        b.unlock_action, b.device_wait_s = "test-passphrase", 0.0
        b.max_attempts, b.backoff_s, b.total_timeout_s, b.request_timeout_s = 3, 0.1, 60.0, 10.0
        b.format_pbkdf, b.format_pbkdf_iterations = "pbkdf2", 1000
        b.rootfs_dir, b.measure_conf, b.rtmr3_manifest = str(root), str(conf), str(manifest)
        b.rtmr3_scheme = scheme
        b.proxy_tls_group = grp.getgrgid(os.getgid()).gr_name
        b.signing_root_key = v.signing_root_pem_path
        b.poweroff = False
        cfg.rtmr.sysfs_path = f"{mnt}/rtmr3:sha384"
        cfg.serve.boot_status_path = str(tmp_path / "run-chutes" / "boot-status.json")
        return GenRig(tmp_path, gen, cfg, v, source, state, vm, hotkey, build_key, seed, io.StringIO(), io.StringIO())

    yield factory


@pytest.fixture
async def rigs(make_rig: Any) -> AsyncIterator[Any]:
    made: list[GenRig] = []

    async def get(gen: str, **kw: Any) -> GenRig:
        r = await make_rig(gen, **kw)
        made.append(r)
        return r

    yield get
    for r in made:
        await r.v.stop()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_14_boot_rotates_provisions_and_hands_off(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    cs = Cryptsetup()
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    st = outcome.status
    assert st["generation"] == "1.4" and st["root_rotation"]["confirmed"] is True
    # the root is rotated: the build passphrase no longer opens it, the validator's promoted key does
    root = rig.cfg.boot.root_device
    assert not cs.test_key(root, rig.build_key)
    assert cs.test_key(root, rig.v.root_key(rig.vm))
    assert not cs.token_exists(root, 15)
    # RTMR3 chain applied through the emulator; the provision quote carried it and the CA hash
    assert st["rtmr3"]["value"] == rig.state.rtmr(3).hex() != "00" * 48
    stored = rig.v.stored_ca(rig.vm)
    run = rig.run_dir
    ca_crt = run / "vm-root-ca" / "ca.crt"
    assert stored is not None and stored.public_bytes(__import__("cryptography").hazmat.primitives.serialization
                                                      .Encoding.PEM) == ca_crt.read_bytes()
    # storage volumes formatted with the validator's keys and promoted
    for label in ("storage", "tdx-cache"):
        key = rig.v.volume_key(rig.vm, label)
        assert key is not None and cs.test_key(getattr(rig.cfg.boot, f"{label.replace('-', '_')}_device"), key)
    # hand-off files and modes (reference §7)
    assert not (run / "vm-root-ca" / "ca.key").exists() and _mode(ca_crt) == 0o644
    # /run/chutes and vm-root-ca/ stay 0700 as the reference keeps them (§12.6): the service gets ca.crt and
    # proxy-tls/ through its unit (TemporaryFileSystem= + BindReadOnlyPaths=), never by traversal
    assert _mode(run) == 0o700 and _mode(run / "vm-root-ca") == 0o700
    assert _mode(run / "proxy-tls" / "server.key") == 0o640 and _mode(run / "proxy-tls") == 0o750
    assert _mode(run / "registry-tls" / "client.key") == 0o600 and _mode(run / "registry-tls" / "client.crt") == 0o644
    assert (run / "vm-name").read_text() == rig.vm + "\n" and (run / "hotkey").read_text() == rig.hotkey + "\n"
    lqn = (run / "luks-quote-nonce").read_text()
    assert len(lqn) == 64 and _mode(run / "luks-quote-nonce") == 0o600
    assert not (run / "cert-hash").exists()  # deleted after the provision confirm
    ss58 = (run / "validator-ss58").read_text()
    assert ss58 == rig.v.vm_auth_key(rig.vm).ss58
    assert (run / "validator-auth.env").read_text() == f"ALLOWED_VALIDATORS={ss58}\n"
    assert _mode(run / "validator-auth.env") == 0o600
    assert _mode(run / "k3s-encryption-config.yaml") == 0o600
    for name in ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg"):
        assert (run / "signing-keys" / name).is_file()
    # every signed call carried a proof over the exact bytes; nonce/attestation/provision on the cvm front
    calls = {c["endpoint"]: c for c in rig.v.events if "endpoint" in c}
    for ep in ("nonce", "attestation", "provision"):
        assert calls[ep].get("front") == "cvm", (ep, calls[ep])
    rig.assert_no_secret_leaked()
    assert SEED.encode() not in rig.logs.getvalue().encode()


async def test_14_second_boot_uses_the_rotated_key(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    assert (await rig.run()).ok
    first = bytes(rig.v.root_key(rig.vm).reveal())
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    cs = Cryptsetup()
    assert not cs.test_key(rig.cfg.boot.root_device, Secret(first))  # rotated again: a key per boot
    assert cs.test_key(rig.cfg.boot.root_device, rig.v.root_key(rig.vm))
    assert outcome.status["storage"]["storage"]["formatted"] is False


async def test_13_boot_attests_storage_and_confirms_on_the_api_host(rigs: Any) -> None:
    rig: GenRig = await rigs("1.3")
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.status["generation"] == "1.3"
    run = rig.run_dir
    assert (run / "luks-quote-nonce").exists() and not (run / "cert-hash").exists()
    assert not (run / "vm-root-ca").exists() and not (run / "validator-auth.env").exists()
    cs = Cryptsetup()
    assert cs.test_key(rig.cfg.boot.root_device, rig.build_key)  # 1.3.x: static root passphrase
    for label in ("storage", "tdx-cache"):
        key = rig.v.volume_key(rig.vm, label)
        assert key is not None and cs.test_key(getattr(rig.cfg.boot, f"{label.replace('-', '_')}_device"), key)
    calls = {c["endpoint"]: c for c in rig.v.events if "endpoint" in c}
    assert calls["luks_confirm"]["front"] == "api" and calls["luks_attest"]["front"] == "legacy"
    rig.assert_no_secret_leaked()


async def test_12_boot_posts_luks_with_the_boot_token(rigs: Any) -> None:
    rig: GenRig = await rigs("1.2")
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.status["generation"] == "1.2"
    assert len((rig.run_dir / "boot-token").read_text()) == 64
    assert "luks_post" in [c.get("endpoint") for c in rig.v.events]
    rig.assert_no_secret_leaked()


# --- failure matrix of the new calls --------------------------------------------------------------------

def _line(rig: GenRig, outcome: BootOutcome) -> str:
    assert not outcome.ok
    assert outcome.failure_line in rig.console.getvalue()
    assert outcome.failure_line in Path(rig.cfg.boot.kmsg_path).read_text()
    return outcome.failure_line


def _openable(rig: GenRig) -> None:
    """Never a half-rotated disk: the build key or the validator's current key opens the root."""
    cs = Cryptsetup()
    root = rig.cfg.boot.root_device
    assert cs.test_key(root, rig.build_key) or cs.test_key(root, rig.v.root_key(rig.vm))


def _no_ca_key(rig: GenRig) -> None:
    assert not (rig.run_dir / "vm-root-ca" / "ca.key").exists()
    assert not (rig.run_dir / "cert-hash").exists()


@pytest.mark.parametrize(("endpoint", "status", "marker"), [
    ("provision", 500, "STORAGE-SETUP-FAILED"),
    ("provision", 401, "STORAGE-SETUP-FAILED"),
    ("provision", 403, "STORAGE-SETUP-FAILED"),
    ("signing_keys", 500, "FETCH-SIGNING-KEYS-FAILED"),
])
async def test_14_refusals_after_unlock(rigs: Any, endpoint: str, status: int, marker: str) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.inject(endpoint, Fault("status", status=status, times=None))
    outcome = await rig.run()
    line = _line(rig, outcome)
    assert line.startswith(f"{marker}: ") and f"HTTP {status}" in line
    _openable(rig)
    _no_ca_key(rig)
    rig.assert_no_secret_leaked()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "drop"])
async def test_14_bad_provision_answers(rigs: Any, kind: str) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.inject("provision", Fault(kind, times=None))
    outcome = await rig.run()
    assert _line(rig, outcome).startswith("STORAGE-SETUP-FAILED: ")
    _openable(rig)
    _no_ca_key(rig)


@pytest.mark.parametrize("status", [400, 401, 403])
async def test_14_root_confirm_refused_reverts_and_fails_closed(rigs: Any, status: int) -> None:
    """A refusal the validator states (4xx + its JSON detail); 5xx and lost answers: test_rotation_strand.py."""
    rig: GenRig = await rigs("1.4")
    rig.v.inject("root_confirm", Fault("status", status=status, times=None))
    outcome = await rig.run()
    line = _line(rig, outcome)
    assert line.startswith("TDX-LUKS-UNLOCK-FAILED: root_rotation:") and "disk opens with: old key" in line
    cs = Cryptsetup()
    assert cs.test_key(rig.cfg.boot.root_device, rig.build_key)  # root_next removed: the old key opens
    _no_ca_key(rig)


async def test_14_root_confirm_refused_continue_setting(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.cfg.boot.root_confirm_failure = "continue"
    rig.v.inject("root_confirm", Fault("status", status=403, times=1))
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert outcome.status["root_rotation"]["active_key"] == "old"


async def test_14_root_confirm_no_answer_keeps_both_keys(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.inject("root_confirm", Fault("drop", times=None))
    outcome = await rig.run()
    assert "disk opens with: old+new key" in _line(rig, outcome)
    _openable(rig)


async def test_14_missing_root_fields_stop_at_once(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.state.response_extras = {"root_next": None}
    outcome = await rig.run()
    line = _line(rig, outcome)
    assert "1.4.0 answer without root_next" in line
    assert len([c for c in rig.v.events if c.get("endpoint") == "nonce"]) == 1
    _openable(rig)


async def test_14_missing_vm_auth_is_retried(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.state.response_extras = {"vm_auth_ss58": None}
    outcome = await rig.run()
    assert "without vm_auth_ss58" in _line(rig, outcome) and "attempts exhausted (3/3)" in outcome.reason


async def test_14_without_seed_cannot_sign(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4", with_seed=False)
    outcome = await rig.run()
    assert not outcome.ok  # the validator refuses the unsigned 1.4 request, or the flow refuses to go on
    _openable(rig)


async def test_14_storage_confirm_refused_reverts_slots(rigs: Any) -> None:
    """Reference §5: a refused storage confirm (the validator's 4xx + detail) removes ``next`` again; the
    volumes stay on ``current``."""
    rig: GenRig = await rigs("1.4")
    assert (await rig.run()).ok  # formats the volumes
    rig.v.inject("storage_confirm", Fault("status", status=403, times=None))
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert {v["outcome"] for v in outcome.status["storage"].values()} == {"reverted"}
    cs = Cryptsetup()
    for label in ("storage", "tdx-cache"):
        key = rig.v.volume_key(rig.vm, label)
        dev = getattr(rig.cfg.boot, f"{label.replace('-', '_')}_device")
        assert key is not None and cs.test_key(dev, key) and len(cs.keyslots(dev)) == 1


async def test_14_storage_confirm_no_answer_fails_closed_keeping_both_keys(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    assert (await rig.run()).ok
    rig.v.inject("storage_confirm", Fault("drop", times=None))
    outcome = await rig.run()
    assert _line(rig, outcome).startswith("STORAGE-SETUP-FAILED: ")
    cs = Cryptsetup()
    dev = rig.cfg.boot.storage_device
    assert len(cs.keyslots(dev)) == 2  # current and next both kept: whichever the validator holds opens it
    _no_ca_key(rig)


async def test_13_luks_attest_refused(rigs: Any) -> None:
    rig: GenRig = await rigs("1.3")
    rig.v.inject("luks_attest", Fault("status", status=403, times=None))
    outcome = await rig.run()
    assert _line(rig, outcome).startswith("STORAGE-SETUP-FAILED: ")
    assert not (rig.run_dir / "luks-quote-nonce").exists()


async def test_rtmr3_manifest_mismatch_fails_before_any_extension(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    (Path(rig.cfg.boot.rootfs_dir) / "etc" / "chutes" / "a.conf").write_bytes(b"a=2\n")
    outcome = await rig.run()
    assert _line(rig, outcome).startswith("RTMR3-MEASURE-FAILED: ")
    assert rig.state.rtmr(3) == bytes(48)
    _no_ca_key(rig)


@pytest.mark.parametrize("scheme,extensions", [("1.4", 5), ("next", 1)])
async def test_boot_rtmr3_per_scheme_equals_predict(rigs: Any, scheme: str, extensions: int) -> None:
    rig = await rigs("1.4", scheme=scheme)
    predicted = predict_entries(rig.cfg.boot.rootfs_dir, [b"/etc", b"/usr", b"/etc/chutes/a.conf",
                                                          b"/etc/default/rtmr3-verify"], scheme=scheme).rtmr3
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert rig.state.rtmr(3) == predicted  # the register the provision quote carried, and the validator took
    st = outcome.status["rtmr3"]
    assert (st["scheme"], st["extensions"], st["absent"], st["value"]) == (scheme, extensions, 1, predicted.hex())


def test_generation_classification() -> None:
    from agent.validator.errors import ValidatorProtocolError
    from agent.validator.schemas import BootAttestationResponse, GenerationError, classify_generation

    def resp(**fields: Any) -> BootAttestationResponse:
        return BootAttestationResponse.parse(json.dumps({"key": "k", **fields}).encode())

    assert classify_generation(resp(boot_token="ab" * 32)) == "1.2"
    assert classify_generation(resp(luks_quote_nonce="cd" * 32)) == "1.3"
    full = {"luks_quote_nonce": "cd" * 32, "root_next": "ef" * 64, "root_confirm_nonce": "01" * 32,
            "vm_auth_ss58": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"}
    assert classify_generation(resp(**full)) == "1.4"
    with pytest.raises(GenerationError, match=r"boot\.protocol = '1\.3'"):
        classify_generation(resp(**full), "1.3")
    with pytest.raises(ValidatorProtocolError, match="without vm_auth_ss58"):
        classify_generation(resp(**{**full, "vm_auth_ss58": None}))
    with pytest.raises(GenerationError, match="without root_next"):
        classify_generation(resp(**{**full, "root_next": None}))
    with pytest.raises(GenerationError, match="root_next' must be 128"):
        classify_generation(resp(**{**full, "root_next": "zz"}))
    with pytest.raises(ValidatorProtocolError, match="'boot_token' missing"):
        resp()
