"""Pick the GPU evidence source from configuration: NVML, emulated NVML (explicit only), or none.

Emulation is never a fallback: a missing driver stays an error unless ``gpu.emulate`` names an
emulation, and then a warning is logged. The emulated GPUs run behind the same production
:class:`~agent.evidence.nvml_gpu.NvmlGpuSource`, so every code path above NVML is the real one.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig, ConfigError
from agent.evidence.base import GpuEmulation, GpuEvidenceSource
from agent.log import get_logger

log = get_logger(__name__)

#: Installs an emulated NVML for a spec like "h100x8" and returns its handle; registered by the composition
#: root (``agent.commands.wiring``).
GpuEmulationInstaller = Callable[[str], GpuEmulation]
_emulation_installer: GpuEmulationInstaller | None = None


def register_gpu_emulation(installer: GpuEmulationInstaller | None) -> None:
    """Called by the composition root only; None removes it."""
    global _emulation_installer
    _emulation_installer = installer


def make_gpu_source(cfg: AgentConfig) -> GpuEvidenceSource | None:
    """The configured source; None when ``gpu.enabled`` is false (a CPU-only node)."""
    if not cfg.gpu.enabled:
        return None
    from agent.evidence.nvml_gpu import NvmlGpuSource

    if not cfg.gpu.emulate:
        return NvmlGpuSource(cfg.gpu)
    if _emulation_installer is None:
        raise ConfigError("gpu.emulate: no GPU emulation is wired into this program "
                          "(only the chutes-attest command line enables it)")
    try:
        fake = _emulation_installer(cfg.gpu.emulate)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.warning("gpu.emulated", emulate=cfg.gpu.emulate, gpus=len(fake.gpus),
                reason="gpu.emulate is set: GPU evidence comes from SIMULATED devices and is not trustworthy")
    source = NvmlGpuSource(cfg.gpu)
    source.emulation = fake  # close() uninstalls it
    return source
