"""Pick the configured quote source. The simulated one is an explicit opt-in, never a fallback.

This room never imports :mod:`agent.sim`: the composition root (:mod:`agent.commands.wiring`, run by
``cli.main``) registers the simulated sources' factories, one per TEE. Without that registration,
``quote.source = "simulated"`` is a configuration error, so library users of :mod:`agent.evidence` can
never end up on a simulation by accident.

The TEE comes from :func:`agent.evidence.tee.resolve_tee`: ``quote.tee`` pinned, or probed (TDX guest
device, then SEV guest device, neither: :class:`~agent.evidence.tee.TeeUnavailableError`, fail closed);
the simulated source with ``quote.tee = "auto"`` is the TDX one.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig, ConfigError
from agent.evidence.base import QuoteSource
from agent.evidence.tee import TDX, TEES, resolve_tee
from agent.log import get_logger

log = get_logger(__name__)

#: Builds a simulated quote source from the configuration; installed by the composition root.
SimulatedQuoteFactory = Callable[[AgentConfig], QuoteSource]
_simulated_factories: dict[str, SimulatedQuoteFactory] = {}


def register_simulated_quote_source(factory: SimulatedQuoteFactory | None, *, tee: str = TDX) -> None:
    """Called by the composition root only (``agent.commands.wiring``), once per TEE ("tdx", "snp");
    None removes that TEE's factory."""
    if tee not in TEES:
        raise ValueError(f"tee: must be one of {', '.join(TEES)}, got {tee!r}")
    if factory is None:
        _simulated_factories.pop(tee, None)
    else:
        _simulated_factories[tee] = factory


def make_quote_source(cfg: AgentConfig) -> QuoteSource:
    """``quote.source = "configfs"`` (production) or ``"simulated"`` (logs a warning; never trusted), for the
    TEE :func:`~agent.evidence.tee.resolve_tee` gives (raises ``TeeUnavailableError`` when it finds none)."""
    kind = cfg.quote.source
    if kind == "configfs":
        from agent.evidence.configfs_tsm import ConfigfsTsmSource

        return ConfigfsTsmSource(
            cfg.quote.configfs_root,
            tee=resolve_tee(cfg.quote),
            expected_provider=cfg.quote.expected_provider,
            retries=cfg.quote.retries,
            retry_delay_s=cfg.quote.retry_delay_s,
        )
    if kind == "simulated":
        tee = resolve_tee(cfg.quote)
        factory = _simulated_factories.get(tee)
        if factory is None:
            which = "" if tee == TDX else f" (quote.tee={tee})"
            raise ConfigError(f"quote.source=simulated{which}: no simulation is wired into this program "
                              "(only the chutes-attest command line enables it)")
        log.warning("quote.source_simulated", state_dir=cfg.quote.simulated_state_dir, tee=tee,
                    reason="quote.source=simulated: quotes are NOT hardware evidence and verify only "
                           "against the simulated root CA")
        return factory(cfg)
    raise ValueError(f"quote.source: must be one of configfs, simulated, got {kind!r}")
