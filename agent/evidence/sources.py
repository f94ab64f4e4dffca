"""Pick the configured quote source. The simulated one is an explicit opt-in, never a fallback."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.evidence.base import QuoteSource
from agent.log import get_logger

log = get_logger(__name__)


def make_quote_source(cfg: AgentConfig) -> QuoteSource:
    """``quote.source = "configfs"`` (production) or ``"simulated"`` (logs a warning; never trusted)."""
    kind = cfg.quote.source
    if kind == "configfs":
        from agent.evidence.configfs_tsm import ConfigfsTsmSource

        return ConfigfsTsmSource(
            cfg.quote.configfs_root,
            expected_provider=cfg.quote.expected_provider,
            retries=cfg.quote.retries,
            retry_delay_s=cfg.quote.retry_delay_s,
        )
    if kind == "simulated":
        from agent.sim.quote_sim import SimulatedQuoteSource

        log.warning("quote.source_simulated", state_dir=cfg.quote.simulated_state_dir,
                    reason="quote.source=simulated: quotes are NOT hardware evidence and verify only "
                           "against the simulated root CA")
        return SimulatedQuoteSource(cfg.quote.simulated_state_dir)
    raise ValueError(f"quote.source: must be one of configfs, simulated, got {kind!r}")
