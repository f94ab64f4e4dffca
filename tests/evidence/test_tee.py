"""TEE detection (issue 19): quote.tee pinned wins; "auto" probes the TDX device, then the SEV device, neither
fails closed; the quote source follows the TEE. Device paths are files under tmp_path, never /dev."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, QuoteConfig
from agent.evidence import sources
from agent.evidence.base import QuoteSourceError
from agent.evidence.configfs_tsm import ConfigfsTsmSource
from agent.evidence.sources import make_quote_source
from agent.evidence.tee import SNP, TDX, TeeUnavailableError, provider_for, resolve_tee
from agent.exitcodes import EXIT_UNAVAILABLE


def qcfg(tmp_path: Path, *, tee: str = "auto", tdx: bool = False, sev: bool = False,
         source: str = "configfs") -> QuoteConfig:
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    for name, present in (("tdx_guest", tdx), ("sev-guest", sev)):
        if present:
            (dev / name).touch()
    return QuoteConfig(source=source, tee=tee, tdx_device=str(dev / "tdx_guest"), sev_device=str(dev / "sev-guest"))


@pytest.mark.parametrize(("tdx", "sev", "want"), [(True, False, TDX), (False, True, SNP), (True, True, TDX)])
def test_auto_probes_tdx_first_then_sev(tmp_path: Path, tdx: bool, sev: bool, want: str) -> None:
    assert resolve_tee(qcfg(tmp_path, tdx=tdx, sev=sev)) == want


@pytest.mark.parametrize("devices", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("pinned", [TDX, SNP])
def test_pinned_wins_over_any_device(tmp_path: Path, pinned: str, devices: tuple[bool, bool]) -> None:
    assert resolve_tee(qcfg(tmp_path, tee=pinned, tdx=devices[0], sev=devices[1])) == pinned


def test_neither_device_fails_closed_naming_both_paths_and_the_key(tmp_path: Path) -> None:
    q = qcfg(tmp_path)
    with pytest.raises(TeeUnavailableError) as exc:
        resolve_tee(q)
    msg = str(exc.value)
    assert q.tdx_device in msg and q.sev_device in msg
    assert "Intel TDX" in msg and "AMD SEV-SNP" in msg and "quote.tee" in msg
    assert isinstance(exc.value, QuoteSourceError) and not exc.value.retryable
    assert exc.value.exit_code == EXIT_UNAVAILABLE and exc.value.reason == "tee_unavailable"
    assert exc.value.http_status == 503


def test_a_dangling_link_is_absent_any_existing_path_is_present(tmp_path: Path) -> None:
    q = qcfg(tmp_path)
    Path(q.sev_device).symlink_to(tmp_path / "nowhere")
    with pytest.raises(TeeUnavailableError):
        resolve_tee(q)
    Path(q.tdx_device).mkdir()  # exists: a probe by presence, as sek8s's -c test of a devtmpfs node
    assert resolve_tee(q) == TDX


def test_simulated_auto_is_tdx_without_devices(tmp_path: Path) -> None:
    assert resolve_tee(qcfg(tmp_path, source="simulated")) == TDX
    assert resolve_tee(qcfg(tmp_path, source="simulated", tee="snp")) == SNP


def test_unknown_tee_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quote\.tee: must be one of auto, tdx, snp, got 'sgx'"):
        resolve_tee(qcfg(tmp_path, tee="sgx", tdx=True))


def test_provider_for() -> None:
    assert provider_for(TDX) == "tdx_guest" and provider_for(SNP) == "sev_guest"
    with pytest.raises(ValueError, match="tee"):
        provider_for("auto")


# -- the quote source follows the TEE --------------------------------------------------------------------


def cfg_with(tmp_path: Path, **kw: object) -> AgentConfig:
    cfg = AgentConfig()
    cfg.quote = qcfg(tmp_path, **kw)  # type: ignore[arg-type]
    cfg.quote.configfs_root = str(tmp_path / "tsm" / "report")
    return cfg


def test_configfs_source_for_a_probed_snp_guest(tmp_path: Path) -> None:
    src = make_quote_source(cfg_with(tmp_path, sev=True))
    assert isinstance(src, ConfigfsTsmSource)
    assert (src.tee, src.expected_provider, src.name) == (SNP, "sev_guest", "configfs")


def test_configfs_source_for_a_probed_tdx_guest(tmp_path: Path) -> None:
    src = make_quote_source(cfg_with(tmp_path, tdx=True, sev=True))
    assert isinstance(src, ConfigfsTsmSource) and (src.tee, src.expected_provider) == (TDX, "tdx_guest")


def test_expected_provider_set_explicitly_wins(tmp_path: Path) -> None:
    cfg = cfg_with(tmp_path, tee="snp")
    cfg.quote.expected_provider = "sev_guest_v2"
    src = make_quote_source(cfg)
    assert isinstance(src, ConfigfsTsmSource) and (src.tee, src.expected_provider) == (SNP, "sev_guest_v2")


def test_configfs_source_without_a_device_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(TeeUnavailableError):
        make_quote_source(cfg_with(tmp_path))


def test_simulated_sources_by_tee(tmp_path: Path) -> None:
    from agent.sim.quote_sim import SimulatedQuoteSource
    from agent.sim.snp_sim import SimulatedSnpSource

    cfg = cfg_with(tmp_path, source="simulated")
    cfg.quote.simulated_state_dir = str(tmp_path / "sim")
    tdx = make_quote_source(cfg)
    assert isinstance(tdx, SimulatedQuoteSource) and tdx.tee == TDX
    cfg.quote.tee = "snp"
    snp = make_quote_source(cfg)
    assert isinstance(snp, SimulatedSnpSource) and snp.tee == SNP and snp.name == "simulated"


def test_unregistered_simulation_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_simulated_factories", {})
    cfg = cfg_with(tmp_path, source="simulated", tee="snp")
    with pytest.raises(ConfigError, match=r"quote\.source=simulated \(quote\.tee=snp\): no simulation is wired"):
        make_quote_source(cfg)
    cfg.quote.tee = "auto"
    with pytest.raises(ConfigError, match=r"^quote\.source=simulated: no simulation is wired"):
        make_quote_source(cfg)
    with pytest.raises(ValueError, match="tee"):
        sources.register_simulated_quote_source(lambda c: None, tee="auto")  # type: ignore[arg-type,return-value]


def test_configfs_source_rejects_an_unknown_tee() -> None:
    assert ConfigfsTsmSource().tee == TDX and ConfigfsTsmSource().expected_provider == "tdx_guest"
    with pytest.raises(ValueError, match="tee: must be one of tdx, snp, got 'auto'"):
        ConfigfsTsmSource(tee="auto")
