"""Shared rig for the boot tests: faithful validator (nginx + aiohttp) on loopback TLS, simulated or
FUSE-emulated configfs-tsm quotes, real LUKS2 images and config volumes, secret scanners."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent import log as log_mod
from agent.boot import network
from agent.boot.config_volume import BootIdentity
from agent.boot.flow import BootDeps, BootOutcome, default_deps, run_boot
from agent.config import AgentConfig
from agent.log import Secret
from agent.sim.luks_image import make_config_volume, make_ext4_image, make_luks_image, random_hotkey
from agent.sim.quote_sim import SimulatedQuoteSource
from agent.sim.validator import FaithfulValidator


class ProcScanner:
    """Collects every process argv and environment seen while it runs (to prove no secret is there)."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)

    def _loop(self, period: float) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{what}", "rb") as fh:
                            self.seen.add(fh.read())
                    except OSError:
                        pass
            time.sleep(period)

    def __enter__(self) -> ProcScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class BootRig:
    tmp: Path
    cfg: AgentConfig
    validator: FaithfulValidator
    source: Any
    vm_name: str
    hotkey: str
    root_passphrase: Secret
    console: io.StringIO = field(default_factory=io.StringIO)
    logs: io.StringIO = field(default_factory=io.StringIO)
    ip_commands: list[list[str]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    procs: ProcScanner | None = None

    def deps(self) -> BootDeps:
        d = default_deps(self.cfg, self.source, console=self.console)
        resolv = str(self.tmp / "resolv.conf")

        def setup_network(ident: BootIdentity) -> str:  # the real parser and ip command list, recorded
            assert ident.network_yaml is not None
            plan = network.parse_netplan(ident.network_yaml, ["lo", "enp0s2"])
            network.apply(plan, resolv, run=self.ip_commands.append)
            return plan.interface

        async def fast_sleep(s: float) -> None:  # record back-off delays without waiting them out
            self.sleeps.append(s)

        d.setup_network = setup_network
        d.sleep = fast_sleep
        return d

    async def run(self, deps: BootDeps | None = None) -> BootOutcome:
        log_mod.configure("debug", "json", stream=self.logs)
        with ProcScanner() as self.procs:
            return await run_boot(self.cfg, deps or self.deps(), poweroff=False)

    def secrets(self) -> list[bytes]:
        """Every secret value the validator handed out (root and cache passphrases, boot tokens)."""
        out = [bytes(self.root_passphrase.reveal())]
        st = self.validator.state
        out += [t.encode() for t in st.boot_tokens]
        out += [bytes(vm.cache.reveal()) for vm in st.vms.values() if vm.cache is not None]
        out += [bytes(vm.root.reveal()) for vm in st.vms.values()]
        out += self.validator.secret_values()  # everything else it holds or handed out (volume keys, ...)
        return [s for s in dict.fromkeys(out) if s]

    def assert_no_secret_leaked(self) -> None:
        secrets_ = self.secrets()
        assert secrets_, "the scan needs secret values to look for"
        texts = {"logs": self.logs.getvalue().encode(), "console": self.console.getvalue().encode()}
        for name, text in texts.items():
            for s in secrets_:
                assert s not in text, f"secret found in {name}"
        token_file = Path(self.cfg.boot.handoff_dir) / "boot-token"
        for path in self.tmp.rglob("*"):
            if not path.is_file() or path == token_file or path.is_socket():
                continue
            data = path.read_bytes()
            for s in secrets_:
                assert s not in data, f"secret found in file {path}"
        assert self.procs is not None and len(self.procs.seen) > 5
        for blob in self.procs.seen:
            for s in secrets_:
                assert s not in blob, "secret found in a process argv/environment"

    def failure_reason(self, outcome: BootOutcome) -> str:
        assert not outcome.ok
        assert outcome.failure_line.startswith("TDX-LUKS-UNLOCK-FAILED: ")
        assert outcome.failure_line in self.console.getvalue()
        assert outcome.failure_line in Path(self.cfg.boot.kmsg_path).read_text()
        return outcome.reason


def make_cfg(tmp: Path, validator: FaithfulValidator) -> AgentConfig:
    cfg = AgentConfig()
    b = cfg.boot
    b.validator_url = validator.url
    b.ca_bundle = validator.ca_bundle
    # The baseline rig: a ≤1.2 validator with the removed GET/PUT cache calls (generation e2e tests
    # in test_generations.py run "auto" against every generation).
    b.protocol = "1.2"
    b.legacy_cache_endpoints = True
    b.config_device = str(tmp / "config.img")
    b.config_mount = str(tmp / "mnt-config")
    b.root_device = str(tmp / "root.img")
    b.cache_device = str(tmp / "cache.img")
    b.header_dir = str(tmp / "luks-hdr")
    b.handoff_dir = str(tmp / "run-chutes")
    b.kmsg_path = str(tmp / "kmsg")
    b.unlock_action = "test-passphrase"
    b.device_wait_s = 0.0
    b.max_attempts = 3
    b.backoff_s = 0.5
    b.backoff_max_s = 5.0
    b.total_timeout_s = 60.0
    b.request_timeout_s = 10.0
    b.format_pbkdf = "pbkdf2"
    b.format_pbkdf_iterations = 1000
    b.poweroff = False
    cfg.serve.boot_status_path = str(tmp / "run-chutes" / "boot-status.json")
    Path(b.kmsg_path).touch()
    return cfg


@pytest.fixture
def sim_source(tmp_path: Path) -> SimulatedQuoteSource:
    return SimulatedQuoteSource(tmp_path / "sim")


RigFactory = Callable[..., Any]


@pytest.fixture
async def rig(tmp_path: Path, sim_source: SimulatedQuoteSource) -> AsyncIterator[BootRig]:
    v = FaithfulValidator(tmp_path / "validator", root_ca_pem=sim_source.root_ca_pem)
    await v.start()
    try:
        hotkey, vm_name = random_hotkey(), "chutes-vm-01"
        passphrase = v.add_vm(vm_name, hotkey)
        make_config_volume(str(tmp_path / "config.img"), hostname=vm_name, hotkey=hotkey)
        make_luks_image(str(tmp_path / "root.img"), passphrase, label="root-luks")
        make_ext4_image(str(tmp_path / "cache.img"), {}, label="containerd-cache", size_mb=20)
        yield BootRig(tmp_path, make_cfg(tmp_path, v), v, sim_source, vm_name, hotkey, passphrase)
    finally:
        await v.stop()


class RecordingCryptsetup:
    """Wraps the real Cryptsetup and records every open attempt (to prove nothing was unlocked)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.opens: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def open(self, device: str, name: str, passphrase: Secret, **kw: Any) -> None:
        try:
            self.inner.open(device, name, passphrase, **kw)
        except Exception:
            self.opens.append((device, False))
            raise
        self.opens.append((device, True))


def assert_never_unlocked(rig: BootRig, deps: BootDeps, outcome: BootOutcome) -> None:
    assert not outcome.ok
    cs = deps.cryptsetup
    assert isinstance(cs, RecordingCryptsetup)
    assert not any(ok for _, ok in cs.opens), "a volume was unlocked on a failing boot"
    assert not (Path(rig.cfg.boot.handoff_dir) / "boot-token").exists()
    status = outcome.status
    assert status["outcome"] == "failed" and "unlocked" not in status
