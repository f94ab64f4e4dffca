"""Pick the GPU evidence source from configuration: NVML, emulated NVML (explicit only), or none.

Emulation is never a fallback: a missing driver stays an error unless ``gpu.emulate`` names an
emulation, and then a warning is logged. The emulated GPUs run behind the same production
:class:`~agent.evidence.nvml_gpu.NvmlGpuSource`, so every code path above NVML is the real one.
"""

from __future__ import annotations

from agent.config import AgentConfig, ConfigError
from agent.evidence.base import GpuEvidenceSource
from agent.log import get_logger

log = get_logger(__name__)


def make_gpu_source(cfg: AgentConfig) -> GpuEvidenceSource | None:
    """The configured source; None when ``gpu.enabled`` is false (a CPU-only node)."""
    if not cfg.gpu.enabled:
        return None
    from agent.evidence.nvml_gpu import NvmlGpuSource

    if not cfg.gpu.emulate:
        return NvmlGpuSource(cfg.gpu)
    from agent.sim.fake_nvml import install_from_spec

    try:
        fake = install_from_spec(cfg.gpu.emulate)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.warning("gpu.emulated", emulate=cfg.gpu.emulate, gpus=len(fake.gpus),
                reason="gpu.emulate is set: GPU evidence comes from SIMULATED devices and is not trustworthy")
    source = NvmlGpuSource(cfg.gpu)
    source.emulation = fake  # close() uninstalls it
    return source
