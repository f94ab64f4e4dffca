"""Composition root: the one place that connects simulations to the rooms that may use them.

``agent.evidence`` picks production sources itself and never imports :mod:`agent.sim`; it only exposes
registration points. ``cli.main`` calls :func:`install_simulations` before a command runs, so the
``chutes-attest`` program can honour ``quote.source = "simulated"`` (the simulated TDX source, or with
``quote.tee = "snp"`` the simulated SEV-SNP one) and ``gpu.emulate`` (explicit settings, each logged as a
warning), while any other importer of the library gets production sources or a configuration error,
never a silent simulation.
"""

from __future__ import annotations

from agent.config import AgentConfig
from agent.evidence import gpu_sources, sources
from agent.evidence.base import GpuEmulation, QuoteSource
from agent.evidence.tee import SNP, TDX


def _simulated_quote_source(cfg: AgentConfig) -> QuoteSource:
    from agent.sim.quote_sim import SimulatedQuoteSource

    return SimulatedQuoteSource(cfg.quote.simulated_state_dir)


def _simulated_snp_source(cfg: AgentConfig) -> QuoteSource:
    from agent.sim.snp_sim import SimulatedSnpSource

    return SimulatedSnpSource(cfg.quote.simulated_state_dir)


def _install_gpu_emulation(spec: str) -> GpuEmulation:
    from agent.sim.fake_nvml import install_from_spec

    return install_from_spec(spec)


def install_simulations() -> None:
    """Register the simulated quote sources (TDX, SEV-SNP) and the NVML emulation (lazy: nothing from
    agent.sim loads yet)."""
    sources.register_simulated_quote_source(_simulated_quote_source, tee=TDX)
    sources.register_simulated_quote_source(_simulated_snp_source, tee=SNP)
    gpu_sources.register_gpu_emulation(_install_gpu_emulation)
