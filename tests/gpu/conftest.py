"""GPU test fixtures: the real NVIDIA samples, a simulated device CA, and fake-NVML installation."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import GpuConfig
from agent.evidence.nvml_gpu import NvmlGpuSource
from agent.sim.fake_nvml import FakeGpu, FakeNvml, install_fake_nvml
from agent.sim.gpu_sim import SimulatedDeviceCA
from tests.conftest import GPU_DIR

H100_NONCE = bytes.fromhex("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb")
PPCIE_NONCE = bytes.fromhex("4760e30534a0621357d458b1a7936551b5dc4cd1e69718adf7ed9fb0252a537e")


@dataclass(frozen=True)
class Sample:
    report: bytes
    chain: bytes
    nonce: bytes


@pytest.fixture(scope="session")
def h100_sample() -> Sample:
    report = bytes.fromhex((GPU_DIR / "h100-attestation-report.hex").read_text())
    return Sample(report, (GPU_DIR / "h100-cert-chain.pem").read_bytes(), H100_NONCE)


@pytest.fixture(scope="session")
def ppcie_samples() -> list[Sample]:
    entries = json.loads((GPU_DIR / "h100x8-ppcie-evidence.json").read_text())
    return [
        Sample(base64.b64decode(e["evidence"]), base64.b64decode(e["certificate"]), bytes.fromhex(e["nonce"]))
        for e in entries
    ]


@pytest.fixture(scope="session")
def nvidia_root() -> bytes:
    return (GPU_DIR / "nvidia-device-identity-root.pem").read_bytes()


@pytest.fixture(scope="session")
def sim_ca() -> SimulatedDeviceCA:
    return SimulatedDeviceCA()


def sample_gpu(sample: Sample, index: int, **kw: Any) -> FakeGpu:
    """A FakeGpu answering with a fixed real report/chain (its UUID is made up: reports carry none)."""
    return FakeGpu(uuid=f"GPU-{index:08x}-0847-8ba8-ca49-e07ec1f002e6", sample_report=sample.report,
                   sample_chain=sample.chain, **kw)


@pytest.fixture
def fake_nvml() -> Iterator[Callable[..., FakeNvml]]:
    """``fake_nvml(gpus, **kw)`` installs the emulated library; every install is undone after the test."""
    installed: list[FakeNvml] = []

    def install(gpus: Any, **kw: Any) -> FakeNvml:
        fake = install_fake_nvml(gpus, **kw)
        installed.append(fake)
        return fake

    yield install
    for fake in reversed(installed):
        fake.uninstall()


@pytest.fixture
def make_source() -> Iterator[Callable[..., NvmlGpuSource]]:
    """``make_source(**gpu_cfg_fields)`` -> NvmlGpuSource, closed after the test."""
    sources: list[NvmlGpuSource] = []

    def make(**fields: Any) -> NvmlGpuSource:
        src = NvmlGpuSource(GpuConfig(**fields))
        sources.append(src)
        return src

    yield make
    for src in sources:
        src.close()


def write(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)
