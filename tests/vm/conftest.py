"""Fixtures for the qemu end-to-end suite: cached images, the faithful validator on the fixed port.

The images come from ``scripts/vm/vmlib.py`` (built from Debian packages, cached under ``.cache/vm``);
the validator is the real one (nginx TLS terminator + aiohttp app) with the server certificate that the
baked-in CA bundle trusts (SAN 10.0.2.2: the guest reaches the host's loopback through slirp).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts" / "vm"))
import vmlib  # noqa: E402

STAGE_LINE = re.compile(r"chutes-attest: \[(?P<stage>[a-z_]+)\s*\] (?P<result>\S+)\s+(?P<ms>[\d.]+) ms")
KMSG_TS = re.compile(r"^\[\s*(?P<ts>\d+\.\d+)\] (?P<msg>.*)$")
FAILED = "TDX-LUKS-UNLOCK-FAILED"


def _missing_tools() -> list[str]:
    tools = ("qemu-system-x86_64", "mkinitramfs", "cryptsetup", "mkfs.ext4", "busybox", "nginx", "mmdebstrap")
    return [t for t in tools if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


@pytest.fixture(scope="session", autouse=True)
def _vm_prereqs() -> None:
    missing = _missing_tools()
    if missing:
        pytest.fail(f"VM suite needs {', '.join(missing)}: run scripts/install-deps.sh")


@dataclass
class Console:
    """A captured serial console, with the helpers the assertions need."""

    text: str

    def stages(self) -> list[tuple[str, str]]:
        return [(m["stage"], m["result"]) for m in STAGE_LINE.finditer(self.text)]

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.text.splitlines():
            start = line.find('{"')
            if start < 0:
                continue
            try:
                ev = json.loads(line[start:])
            except ValueError:
                continue
            if isinstance(ev, dict) and (name is None or ev.get("event") == name):
                out.append(ev)
        return out

    def lines_with(self, prefix: str) -> list[str]:
        return [ln.split(prefix, 1)[1].strip() for ln in self.text.splitlines() if prefix in ln]

    def kmsg_time(self, needle: str) -> float | None:
        for line in self.text.splitlines():
            m = KMSG_TS.match(line.strip("\r"))
            if m and needle in m["msg"]:
                return float(m["ts"])
        return None


@pytest.fixture(scope="session")
def stage1_images() -> dict[str, Path | vmlib.LuksDisk]:
    """Initramfs (agent baked in), the stage-1 LUKS2 root and the tdx-config volume (cached)."""
    return {
        "initrd": vmlib.initramfs(vmlib.agent_toml_stage1()),
        "root": vmlib.root1(),
        "config": vmlib.config_volume(),
    }


@pytest.fixture
async def validator(tmp_path: Path) -> AsyncIterator[object]:
    """The faithful validator on the port baked into the initramfs, serving the cached TLS identity."""
    async with vmlib.faithful_validator(tmp_path / "validator") as v:
        yield v


async def boot_vm(
    tmp_path: Path, initrd: Path, disks: list[Path], name: str, timeout_s: float = 420, append: str = "",
    writable: list[Path] | None = None,
) -> Console:
    """Boot, wait for power-off, keep a copy of the console under .cache/vm/logs/ for inspection.
    ``writable``: per-test disk copies the guest writes through to (the others are snapshots)."""
    log = tmp_path / f"{name}.console.log"
    res = await vmlib.run_vm_async(initrd, disks, log, append=append, timeout_s=timeout_s, writable=writable or ())
    keep = REPO / ".cache" / "vm" / "logs"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log, keep / log.name) if log.exists() else None
    assert not res.timed_out, f"VM {name} did not power off within {timeout_s}s:\n{res.console[-4000:]}"
    assert res.returncode == 0, f"qemu exited {res.returncode}:\n{res.console[-4000:]}"
    return Console(res.console)
