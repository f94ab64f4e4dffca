"""The service on an AMD SEV-SNP guest (issue 19 item 6): the real service on unix sockets, simulated SNP source.

compat ``/attest`` answers ``{"snp_quote", "nvtrust_evidence"}`` (exactly one quote key, as the newest reference's
``f"{tee_type}_quote"``); ``/tdx/quote`` and ``/quote`` return the bare base64 report; ``/v1/evidence`` says
``"tee": "snp"``; GPU evidence is unchanged; the start-up self-check runs the own-evidence policy (a debug-policy
report never gets the service ready); the ≤1.2 RTMR3 runtime event is skipped on SNP. Every report is checked
here independently: 1184 bytes, REPORT_DATA = nonce ‖ SHA-256(SPKI of the service certificate), and a local
verification against the simulated AMD root (passed explicitly: it is never trusted by default).
"""

from __future__ import annotations

import base64
import json
import secrets
import warnings
from pathlib import Path
from typing import Any

import pytest

from agent.quote.kind import evidence_kind
from agent.quote.snp_parser import parse_snp_report
from agent.serve.server import SelfCheckError, Service
from tests.serve.helpers import make_cfg, spki_sha256_of, unix_client

REPORT_SIZE = 1184


@pytest.fixture
async def snp_service(service_factory: Any) -> Service:
    svc: Service = await service_factory(quote__tee="snp")
    return svc


def _bound_report(svc: Service, b64: str, nonce: str) -> Any:
    raw = base64.b64decode(b64, validate=True)
    assert len(raw) == REPORT_SIZE and evidence_kind(raw) == "snp"
    report = parse_snp_report(raw)
    assert bytes(report.report_data) == bytes.fromhex(nonce) + spki_sha256_of(svc.cfg.serve.cert_path)
    return report


def _verify_locally(svc: Service, raw: bytes, nonce: str) -> None:
    from agent.quote.snp_verify import verify_snp_report
    from agent.sim.validator import simulated_snp_trust

    trust, _ = simulated_snp_trust(svc.cfg.quote.simulated_state_dir)
    report = parse_snp_report(raw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        result = verify_snp_report(report, vek=trust.vek_for(report.chip_id), chain_pem=trust.chain_pem,
                                   trusted_arks=trust.arks,
                                   expected_report_data=bytes.fromhex(nonce) + spki_sha256_of(svc.cfg.serve.cert_path))
        assert result.ok, [c.to_dict() for c in result.failed()]
        # and against AMD's real pinned roots (the default) the simulated chain fails
        assert not verify_snp_report(report, vek=trust.vek_for(report.chip_id), chain_pem=trust.chain_pem).ok


async def test_attest_answers_snp_quote_only(snp_service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(snp_service.cfg.serve.compat_socket) as c:
        r = await c.get("/attest", params={"nonce": nonce})
        assert r.status == 200, await r.text()
        body = await r.json()
    assert list(body) == ["snp_quote", "nvtrust_evidence"]  # exactly one quote key, and not tdx_quote
    _bound_report(snp_service, body["snp_quote"], nonce)
    _verify_locally(snp_service, base64.b64decode(body["snp_quote"]), nonce)
    gpu = json.loads(body["nvtrust_evidence"])  # GPU evidence unchanged: the same list, the same nonce
    assert len(gpu) == 2 and {g["arch"] for g in gpu} == {"HOPPER"}


@pytest.mark.parametrize("route", ["/tdx/quote", "/quote"])
async def test_quote_routes_return_the_bare_report(snp_service: Service, route: str) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(snp_service.cfg.serve.compat_socket) as c:
        r = await c.get(route, params={"nonce": nonce})
        assert r.status == 200
        body = await r.json()
    assert isinstance(body, str)
    _bound_report(snp_service, body, nonce)


async def test_v1_evidence_says_snp(snp_service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(snp_service.cfg.serve.chute_socket) as c:
        r = await c.get("/v1/evidence", params={"nonce": nonce})
        assert r.status == 200
        doc = await r.json()
    assert doc["tee"] == "snp"
    report = _bound_report(snp_service, doc["quote"], nonce)
    assert doc["quote_version"] == report.version and doc["report_data"] == bytes(report.report_data).hex()
    assert len(doc["gpu_evidence"]) == 2 and doc["certificate"] == Path(snp_service.cfg.serve.cert_path).read_text()


async def test_status_measurements_are_the_snp_report_fields(snp_service: Service) -> None:
    m = snp_service.ctx.measurements
    assert m["tee"] == "snp" and m["debug"] is False and m["vmpl"] == "0"
    assert len(m["measurement"]) == 96 and m["policy"].startswith("0x") and "mr_td" not in m
    async with unix_client(snp_service.cfg.serve.chute_socket) as c:
        st = await (await c.get("/v1/status")).json()
    assert st["measurements"]["measurement"] == m["measurement"]


async def test_the_tdx_service_is_unchanged(service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(service.cfg.serve.compat_socket) as c:
        body = await (await c.get("/attest", params={"nonce": nonce})).json()
    assert list(body) == ["tdx_quote", "nvtrust_evidence"]
    assert evidence_kind(base64.b64decode(body["tdx_quote"])) == "tdx"
    assert service.ctx.measurements["tee"] == "tdx"


async def test_self_check_refuses_a_debug_policy_report(short_tmp: Path, sim_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.sim.snp_sim import SimulatedSnpSource

    cfg = make_cfg(short_tmp, sim_dir, quote__tee="snp")
    monkeypatch.setattr("agent.evidence.sources.make_quote_source",
                        lambda c: SimulatedSnpSource(c.quote.simulated_state_dir, debug=True))
    svc = Service(cfg)
    try:
        with pytest.raises(SelfCheckError, match=r"own SNP report: POLICY\.DEBUG is set; refusing to serve it"):
            await svc.start()
        assert not svc.listeners  # never bound, never ready
    finally:
        await svc.stop()


def test_rtmr3_runtime_event_is_skipped_on_snp(tmp_path: Path) -> None:
    from agent.evidence.rtmr3_runtime import apply_runtime_event

    sysfs, events = tmp_path / "rtmr3:sha384", tmp_path / "events.jsonl"
    assert apply_runtime_event(str(sysfs), str(events), tee="snp") is None
    assert not sysfs.exists() and not events.exists()
