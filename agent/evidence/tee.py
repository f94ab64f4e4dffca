"""Which TEE this guest is: Intel TDX or AMD SEV-SNP (issue 19; sev-snp.md §2.6, §5.1, §5.3).

``quote.tee`` pins it ("tdx" / "snp"); "auto" probes as Chutes' next image does (``tee-evidence``
``detect_tee``, the runtime ``get_quote_provider``): the TDX guest device first, then the SEV guest
device, neither: fail closed with :class:`TeeUnavailableError`. There is no default TEE for production
evidence, because guessing wrong would send the wrong evidence (or none) to the validator.

With ``quote.source = "simulated"`` there is no device to probe, so "auto" means "tdx" (the simulated TDX
source of old); "snp" must be pinned to get the simulated SEV-SNP source.
"""

from __future__ import annotations

import os

from agent.config import ConfigError
from agent.evidence.base import QuoteSourceError
from agent.exitcodes import EXIT_UNAVAILABLE

TDX = "tdx"
SNP = "snp"
TEES = (TDX, SNP)
#: The configfs-tsm ``provider`` each TEE's guest driver registers (KBUILD_MODNAME of the driver).
PROVIDERS = {TDX: "tdx_guest", SNP: "sev_guest"}
DEFAULT_TDX_DEVICE = "/dev/tdx_guest"
DEFAULT_SEV_DEVICE = "/dev/sev-guest"


class TeeUnavailableError(QuoteSourceError):
    """``quote.tee = "auto"`` found neither guest device: no TEE evidence can be produced (fail closed)."""

    exit_code = EXIT_UNAVAILABLE
    reason = "tee_unavailable"


def provider_for(tee: str) -> str:
    """The configfs-tsm provider name of ``tee``: "tdx_guest" or "sev_guest" (ValueError otherwise)."""
    try:
        return PROVIDERS[tee]
    except KeyError:
        raise ValueError(f"tee: must be one of {', '.join(TEES)}, got {tee!r}") from None


def resolve_tee(quote_cfg: object) -> str:
    """"tdx" or "snp" for ``quote_cfg`` (a :class:`agent.config.QuoteConfig`, or anything with its fields).

    Pinned ``quote.tee`` wins; "auto" with ``quote.source = "simulated"`` is "tdx"; otherwise "auto" probes
    ``quote.tdx_device`` (-> "tdx"), then ``quote.sev_device`` (-> "snp"). Raises
    :class:`TeeUnavailableError` when neither exists and :class:`~agent.config.ConfigError` for an unknown
    ``quote.tee``.
    """
    pinned = str(getattr(quote_cfg, "tee", "auto"))
    if pinned in TEES:
        return pinned
    if pinned != "auto":
        raise ConfigError(f"quote.tee: must be one of auto, {', '.join(TEES)}, got {pinned!r}")
    if getattr(quote_cfg, "source", "configfs") == "simulated":
        return TDX
    tdx_dev = str(getattr(quote_cfg, "tdx_device", "") or DEFAULT_TDX_DEVICE)
    sev_dev = str(getattr(quote_cfg, "sev_device", "") or DEFAULT_SEV_DEVICE)
    if os.path.exists(tdx_dev):
        return TDX
    if os.path.exists(sev_dev):
        return SNP
    raise TeeUnavailableError(
        f"no TEE guest device: neither {tdx_dev} (Intel TDX) nor {sev_dev} (AMD SEV-SNP) exists, and "
        'quote.tee = "auto"; refusing to continue without TEE evidence',
        hint='load the tdx_guest or sev-guest kernel module, or pin quote.tee = "tdx" or "snp"',
    )


__all__ = ["PROVIDERS", "SNP", "TDX", "TEES", "TeeUnavailableError", "provider_for", "resolve_tee"]
