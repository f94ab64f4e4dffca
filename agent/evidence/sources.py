"""Pick the configured quote source. The simulated one is an explicit opt-in, never a fallback.

This room never imports :mod:`agent.sim`: the composition root (:mod:`agent.commands.wiring`, run by
``cli.main``) registers the simulated source's factory. Without that registration,
``quote.source = "simulated"`` is a configuration error, so library users of :mod:`agent.evidence` can
never end up on a simulation by accident.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig, ConfigError
from agent.evidence.base import QuoteSource
from agent.log import get_logger

log = get_logger(__name__)

#: Builds the simulated quote source from the configuration; installed by the composition root.
SimulatedQuoteFactory = Callable[[AgentConfig], QuoteSource]
_simulated_factory: SimulatedQuoteFactory | None = None


def register_simulated_quote_source(factory: SimulatedQuoteFactory | None) -> None:
    """Called by the composition root only (``agent.commands.wiring``); None removes it."""
    global _simulated_factory
    _simulated_factory = factory


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
        if _simulated_factory is None:
            raise ConfigError("quote.source=simulated: no simulation is wired into this program "
                              "(only the chutes-attest command line enables it)")
        log.warning("quote.source_simulated", state_dir=cfg.quote.simulated_state_dir,
                    reason="quote.source=simulated: quotes are NOT hardware evidence and verify only "
                           "against the simulated root CA")
        return _simulated_factory(cfg)
    raise ValueError(f"quote.source: must be one of configfs, simulated, got {kind!r}")
