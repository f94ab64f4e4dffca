"""``doctor`` on SEV-SNP (issue 19 item 1): which TEE and how it was chosen, the report's fields and a local
verification with a VCEK from the certificate table or ``quote.snp_vek_file``; without one it says so and
fetches nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.commands import doctor
from agent.config import AgentConfig


def _cfg(tmp: Path, **quote: object) -> AgentConfig:
    cfg = AgentConfig()
    cfg.quote.simulated_state_dir = str(tmp / "sim")
    for k, v in quote.items():
        setattr(cfg.quote, k, v)
    return cfg


def test_tee_pinned_probed_and_absent(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    cfg = _cfg(tmp_path, source="configfs", tdx_device=str(dev / "tdx_guest"), sev_device=str(dev / "sev-guest"))
    tee, c = doctor.resolve_tee(cfg)
    assert tee is None and c.status == "fail" and "tdx_guest" in c.detail and "sev-guest" in c.detail
    (dev / "sev-guest").touch()
    tee, c = doctor.resolve_tee(cfg)
    assert tee == "snp" and c.status == "ok"
    assert c.detail == f"AMD SEV-SNP (probed: {dev / 'tdx_guest'} absent, {dev / 'sev-guest'} present)"
    assert doctor.check_guest_device(cfg, tee).name == "sev_guest"
    (dev / "tdx_guest").touch()
    assert doctor.resolve_tee(cfg)[0] == "tdx"  # the TDX device first, as Chutes' next probes
    cfg.quote.tee = "snp"
    tee, c = doctor.resolve_tee(cfg)
    assert tee == "snp" and 'pinned by quote.tee = "snp"' in c.detail
    sim = _cfg(tmp_path, source="simulated", tee="snp")
    tee, c = doctor.resolve_tee(sim)
    assert tee == "snp" and c.status == "warn" and "NOT hardware" in c.detail


def test_report_without_a_vcek_says_so_and_fetches_nothing(tmp_path: Path) -> None:
    c = doctor.check_quote(_cfg(tmp_path, source="simulated", tee="snp"), "snp")
    assert c.status == "warn", c
    assert "1184-byte SEV-SNP v5 report" in c.detail and "POLICY 0x30000, VMPL 0" in c.detail
    assert "no VCEK available" in c.detail and "quote.snp_vek_file is unset" in c.detail
    assert "nothing is fetched" in c.detail


def test_report_verified_with_the_configured_vcek(tmp_path: Path) -> None:
    from agent.sim.snp_sim import load_or_create_sim_amd

    vek = tmp_path / "vcek.der"
    vek.write_bytes(load_or_create_sim_amd(tmp_path / "sim").vcek_der)
    c = doctor.check_quote(_cfg(tmp_path, source="simulated", tee="snp", snp_vek_file=str(vek)), "snp")
    assert c.status == "warn" and "locally verified against the SIMULATED AMD root" in c.detail, c
    assert "VEK from argument" in c.detail


def test_debug_policy_report_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sim.snp_sim import SimulatedSnpSource

    monkeypatch.setattr("agent.evidence.sources.make_quote_source",
                        lambda cfg: SimulatedSnpSource(cfg.quote.simulated_state_dir, debug=True))
    c = doctor.check_quote(_cfg(tmp_path, source="simulated", tee="snp"), "snp")
    assert c.status == "fail" and "POLICY.DEBUG is set; validators will refuse it" in c.detail
