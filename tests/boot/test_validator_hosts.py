"""The validator's hosts per route and its error model (reference §12.4-12.5; issue 18 item 5).

Through the faithful validator's real nginx fronts (cvm / legacy attestation proxy / api): each gated route
answers the newest validator's 403 on a wrong front and works on its own; the agent sends 1.3.x
``luks/attest`` to ``boot.legacy_tdx_base_url`` only, retries a 400 ("Nonce is invalid, expired, or already
used. Fetch a fresh one …") with a fresh nonce, and gives up at once on 401/403, naming status and text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.sim.quote_sim import SimulatedQuoteSource
from agent.sim.validator import FaithfulValidator, Fault, MeasurementSet, simulated_measurement
from agent.sim.validator_routes import (
    CVM_ONLY,
    LEGACY_ONLY,
    MEASUREMENT_MISMATCH,
    MUST_USE_CVM,
    NONCE_ERROR,
    NOT_VIA_PROXY,
)
from agent.validator.errors import ValidatorHTTPError
from agent.validator.proof import Hotkey, proof_headers
from agent.validator.retry import Action, RetryPolicy
from tests.boot import test_generations as _gen
from tests.boot.conftest import BootRig
from tests.boot.test_generations import GenRig
from tests.boot.test_validator_sim_generations import SEED, VM, Rig, call, compact, make_ident, session

integration = pytest.mark.integration
#: The generation e2e rig's fixtures (FUSE RTMR emulator, real LUKS2 images, validator per generation).
mr, make_rig, rigs = _gen.mr, _gen.make_rig, _gen.rigs

#: ``Rig.boot`` per generation: 1.4 signs and sends ``first_boot``, 1.3 neither.
BOOT_ARGS = {"1.3": {"sign": False, "first_boot": None, "query": False}, "1.4": {}}


@pytest.fixture
async def sim(tmp_path: Path) -> Any:
    """A faithful validator of one generation (real nginx, three fronts) and a client rig for it."""
    started: list[FaithfulValidator] = []

    async def factory(generation: str) -> Rig:
        m = simulated_measurement(generation)
        v = FaithfulValidator(tmp_path / f"v{len(started)}", root_ca_pem=b"", measurements=[m], generation=generation,
                              legacy_luks=False)
        boot_q = SimulatedQuoteSource(tmp_path / "sim", rtmrs=m.rtmrs(runtime=False))
        run_q = SimulatedQuoteSource(tmp_path / "sim", rtmrs=m.rtmrs(runtime=True))
        v.state.root_ca_pem = boot_q.root_ca_pem
        hk = Hotkey.from_seed_hex(SEED)
        build = v.add_vm(VM, hk.ss58)
        await v.start()
        started.append(v)
        return Rig(v, tmp_path, boot_q, run_q, make_ident(tmp_path, f"id{len(started)}"), hk,
                   bytes(build.reveal()).decode())

    yield factory
    for v in started:
        await v.stop()


def _front_url(v: FaithfulValidator, front: str) -> str:
    return {"cvm": v.cvm_url, "legacy": v.legacy_tdx_base_url, "api": v.api_url}[front]


def _refusals(v: FaithfulValidator, endpoint: str) -> list[tuple[str, int, str]]:
    """(front, status, reason) of the calls a route guard answered (they never reach the handler)."""
    return [(e["front"], e["status"], e["reason"]) for e in v.events
            if e.get("endpoint") == endpoint and "user_agent" not in e and "fault" not in e]


# ── the simulator enforces the fronts per route ───────────────────────────────


@integration
async def test_luks_attest_answers_403_on_every_front_but_the_legacy_proxy(sim: Any) -> None:
    r: Rig = await sim("1.3")
    v = r.v
    assert v.legacy_tdx_base_url == v.url != v.cvm_url
    async with session(v, r.ident) as s:
        status, boot = await r.boot(s, v.cvm_url, **BOOT_ARGS["1.3"])  # either mTLS front attests a 1.3 VM
        assert status == 200, boot
        lqn = boot["luks_quote_nonce"]
        hdrs = {"X-Quote-Nonce": lqn, "X-Chutes-Hotkey": r.ss58, "User-Agent": "TDX-LUKS-Storage/1.0"}
        for front in ("cvm", "api"):
            status, body = await call(s, "POST", f"{_front_url(v, front)}/servers/{VM}/luks/attest",
                                      r.volume_body(lqn), hdrs)
            assert (status, body) == (403, {"detail": LEGACY_ONLY})
        assert LEGACY_ONLY.startswith("This endpoint serves only legacy VMs, via the attestation proxy")
        assert _refusals(v, "luks_attest") == [("cvm", 403, LEGACY_ONLY), ("api", 403, LEGACY_ONLY)]
        assert v.nonce_usage().get("luks_quote_nonce.consumed", 0) == 0  # the guard answers before the handler
        status, keys = await call(s, "POST", f"{v.legacy_tdx_base_url}/servers/{VM}/luks/attest",
                                  r.volume_body(lqn), hdrs)
        assert status == 200 and set(keys) == {"volumes", "confirm_nonce", "k3s_encryption_key"}
    assert v.calls("luks_attest")[-1]["front"] == "legacy"


@integration
async def test_provision_and_its_confirm_answer_403_off_the_cvm_front(sim: Any) -> None:
    r: Rig = await sim("1.4")
    v = r.v
    async with session(v, r.ident) as s:
        status, boot = await r.boot(s, v.cvm_url)
        assert status == 200, boot
        lqn = boot["luks_quote_nonce"]
        for front in ("legacy", "api"):
            assert await r.provision(s, lqn, base=_front_url(v, front)) == (403, {"detail": CVM_ONLY})
        status, prov = await r.provision(s, lqn)  # the guards did not consume the quote nonce
        assert status == 200, prov
        body = compact({"volumes": {"storage": {"rotated": True}, "root": {"rotated": True}}})
        nonce = prov["confirm_nonce"]
        hdrs = {"X-Confirm-Nonce": nonce, **proof_headers(r.hotkey, nonce, body)}
        for front in ("legacy", "api"):
            status, resp = await call(s, "POST", f"{_front_url(v, front)}/servers/{VM}/provision/confirm", body, hdrs)
            assert (status, resp) == (403, {"detail": CVM_ONLY})
        status, resp = await call(s, "POST", f"{v.cvm_url}/servers/{VM}/provision/confirm", body, hdrs)
        assert status == 200 and resp["volumes"]["root"] == {"result": "promoted"}
    assert _refusals(v, "provision") == [("legacy", 403, CVM_ONLY), ("api", 403, CVM_ONLY)]
    assert _refusals(v, "provision_confirm") == [("legacy", 403, CVM_ONLY), ("api", 403, CVM_ONLY)]


@integration
@pytest.mark.parametrize("generation", ["1.3", "1.4"])
async def test_boot_attestation_through_either_mtls_front_only(sim: Any, generation: str) -> None:
    r: Rig = await sim(generation)
    v = r.v
    signed = generation == "1.4"
    async with session(v, r.ident) as s:
        for front in ("api", "cvm", "legacy"):
            nonce = await r.nonce(s, v.cvm_url, query=signed)  # cvm serves every server's nonce
            body = r.boot_body(nonce, first_boot=True if signed else None)
            hdrs = {"X-Chutes-Nonce": nonce, **(proof_headers(r.hotkey, nonce, body) if signed else {})}
            status, resp = await call(s, "POST", f"{_front_url(v, front)}/servers/boot/attestation", body, hdrs)
            if front == "api":
                assert (status, resp) == (403, {"detail": NOT_VIA_PROXY})
            else:
                assert status == 200 and "key" in resp, (front, resp)
    assert [a["front"] for a in v.attestations() if "user_agent" in a] == ["cvm", "legacy"]  # reached the handler
    assert _refusals(v, "attestation") == [("api", 403, NOT_VIA_PROXY)]


@integration
async def test_nonce_and_luks_confirm_gated_by_the_servers_version(sim: Any) -> None:
    """A ≥1.4.0 server must come through cvm for /nonce and /luks/confirm; an older one may use the api host."""
    r13: Rig = await sim("1.3")
    async with session(r13.v, r13.ident) as s, session(r13.v) as api:
        await r13.nonce(api, r13.v.api_url, query=False)  # unknown caller: allowed
        status, _ = await r13.boot(s, r13.v.cvm_url, **BOOT_ARGS["1.3"])
        assert status == 200
        await r13.nonce(api, r13.v.api_url, query=False)  # a known 1.3 server: still allowed off cvm
        lqn = (await r13.boot(s, r13.v.legacy_tdx_base_url, **BOOT_ARGS["1.3"]))[1]["luks_quote_nonce"]
        status, keys = await call(s, "POST", f"{r13.v.legacy_tdx_base_url}/servers/{VM}/luks/attest",
                                  r13.volume_body(lqn), {"X-Quote-Nonce": lqn, "X-Chutes-Hotkey": r13.ss58})
        assert status == 200
        confirm = compact({"volumes": {"storage": {"rotated": True}}})
        status, done = await call(api, "POST", f"{r13.v.api_url}/servers/{VM}/luks/confirm", confirm,
                                  {"X-Confirm-Nonce": keys["confirm_nonce"], "X-Chutes-Hotkey": r13.ss58})
        assert status == 200 and done["status"] == "confirmed"
    r14: Rig = await sim("1.4")
    v = r14.v
    async with session(v, r14.ident) as s, session(v) as api:
        status, boot = await r14.boot(s, v.cvm_url)
        assert status == 200
        for client, front in ((api, "api"), (s, "legacy")):
            status, body = await call(client, "GET", f"{_front_url(v, front)}/servers/nonce")
            assert (status, body) == (403, {"detail": MUST_USE_CVM}), front
        confirm = compact({"volumes": {"storage": {"rotated": True}}})
        status, body = await call(api, "POST", f"{v.api_url}/servers/{VM}/luks/confirm", confirm,
                                  {"X-Confirm-Nonce": boot["root_confirm_nonce"], "X-Chutes-Hotkey": r14.ss58})
        assert (status, body) == (403, {"detail": MUST_USE_CVM})
        assert (await call(s, "GET", f"{v.cvm_url}/servers/nonce"))[0] == 200
    assert _refusals(v, "nonce") == [("api", 403, MUST_USE_CVM), ("legacy", 403, MUST_USE_CVM)]


# ── the agent: which host gets which call ─────────────────────────────────────


def _fronts(rig: GenRig) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for e in rig.v.events:
        if "endpoint" in e and "fault" not in e:
            out.setdefault(e["endpoint"], []).append((e["front"], e.get("status", 0)))
    return out


@integration
async def test_13_storage_call_goes_to_the_legacy_attestation_proxy(rigs: Any) -> None:
    rig: GenRig = await rigs("1.3")
    b = rig.cfg.boot
    assert b.tdx_base_url == rig.v.cvm_url and b.legacy_tdx_base_url == rig.v.legacy_tdx_base_url != b.tdx_base_url
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert _fronts(rig) == {"nonce": [("api", 200)], "attestation": [("cvm", 200)], "luks_attest": [("legacy", 200)],
                            "luks_confirm": [("api", 200)]}
    stage = next(s for s in outcome.status["stages"] if s["stage"] == "storage_keys")
    assert stage["detail"].endswith(f"from {rig.v.legacy_tdx_base_url}")


@integration
async def test_13_storage_call_on_another_front_fails_closed_with_the_validators_text(rigs: Any) -> None:
    rig: GenRig = await rigs("1.3")
    rig.cfg.boot.legacy_tdx_base_url = rig.v.cvm_url  # misconfigured: luks/attest lands on cvm
    outcome = await rig.run()
    assert not outcome.ok
    line = outcome.failure_line
    assert line.startswith("STORAGE-SETUP-FAILED: storage: POST /servers/{vm}/luks/attest: HTTP 403 ")
    assert f"({LEGACY_ONLY})" in line and line in Path(rig.cfg.boot.kmsg_path).read_text()
    assert _fronts(rig)["luks_attest"] == [("cvm", 403)]  # single shot (§3.6): no second try
    assert rig.v.key_state(rig.vm)["volumes"] == {}  # no volume key was handed out
    assert not (rig.run_dir / "luks-quote-nonce").exists()


@integration
async def test_validator_url_still_sends_every_13_call_to_one_host(rigs: Any) -> None:
    rig: GenRig = await rigs("1.3")
    rig.cfg.boot.validator_url = rig.v.legacy_tdx_base_url  # the legacy single-host override
    rig.cfg.boot.legacy_tdx_base_url = "https://unused.invalid"
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert {f for calls in _fronts(rig).values() for f, _ in calls} == {"legacy"}


@integration
async def test_14_calls_stay_on_the_cvm_front(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.cfg.boot.legacy_tdx_base_url = "https://unused.invalid"  # 1.4.0 never talks to the legacy proxy
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    fronts = _fronts(rig)
    for ep in ("nonce", "attestation", "provision", "provision_confirm"):
        assert {f for f, _ in fronts[ep]} == {"cvm"}, (ep, fronts[ep])
    assert fronts["signing_keys"] == [("api", 200)]


# ── the agent: 400 retries with a fresh nonce, 401/403 give up at once ────────


@integration
async def test_400_nonce_refused_is_retried_with_a_fresh_nonce(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    assert (await rig.run()).ok  # consumes a nonce
    rig.v.state.events.clear()
    rig.v.inject("nonce", Fault("replay_nonce", times=1))  # the first nonce handed out: the used one again
    used = rig.v.state.last_nonce
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    atts = rig.v.attestations()
    assert [(a["status"], a.get("nonce_problem")) for a in atts] == [(400, "unknown or used"), (200, None)]
    assert atts[0]["nonce"] == used and atts[1]["nonce"] != used  # the retry fetched a fresh nonce
    assert atts[1]["proof"] == "valid"  # ... and signed over it
    assert outcome.status["attempts"] == 2
    retries = [json.loads(line) for line in rig.logs.getvalue().splitlines() if '"boot.retry"' in line]
    assert len(retries) == 1 and retries[0]["action"] == "retry"
    assert f"HTTP 400 ({NONCE_ERROR})" in retries[0]["error"] and "fresh nonce" in retries[0]["why"]


@integration
async def test_403_measurement_stops_at_once_naming_status_and_text(rig: BootRig) -> None:
    rig.validator.state.measurements = [MeasurementSet("other", "1.0", "11" * 48, "22" * 48, "33" * 48, "44" * 48)]
    outcome = await rig.run()
    reason = rig.failure_reason(outcome)
    assert f"attestation failed after 1 attempt(s): POST /servers/boot/attestation: HTTP 403 ({MEASUREMENT_MISMATCH})" \
        in reason and "giving up" in reason
    assert MEASUREMENT_MISMATCH in rig.console.getvalue() and MEASUREMENT_MISMATCH in Path(
        rig.cfg.boot.kmsg_path).read_text()  # an operator sees why
    assert [e["endpoint"] for e in rig.validator.events if e.get("endpoint") in ("nonce", "attestation")] == [
        "nonce", "attestation"] and rig.sleeps == []
    assert rig.validator.attestations()[0]["measurement_problem"] == "no boot match"


@integration
async def test_401_blacklisted_hotkey_stops_at_once(rigs: Any) -> None:
    rig: GenRig = await rigs("1.4")
    rig.v.state.blacklisted_hotkeys.add(rig.hotkey)
    outcome = await rig.run()
    assert not outcome.ok
    assert "HTTP 401 (Miner hotkey is blacklisted)" in outcome.failure_line and "giving up" in outcome.failure_line
    assert [a["status"] for a in rig.v.attestations()] == [401]
    assert not (rig.run_dir / "luks-quote-nonce").exists()


# ── the policy's words ────────────────────────────────────────────────────────


def test_policy_retries_400_with_a_fresh_nonce_and_names_403s_causes() -> None:
    policy = RetryPolicy(max_attempts=3, total_timeout_s=60, backoff_s=2, backoff_max_s=5)
    d = policy.decide(ValidatorHTTPError("POST /servers/boot/attestation", 400, NONCE_ERROR), 1, 0)
    assert (d.action, d.delay_s) == (Action.RETRY, 2) and "fresh nonce" in d.why
    d = policy.decide(ValidatorHTTPError("POST /servers/boot/attestation", 400, NONCE_ERROR), 3, 0)
    assert d.action is Action.STOP and "attempts exhausted (3/3)" in d.why
    d = policy.decide(ValidatorHTTPError("POST /servers/boot/attestation", 403, MEASUREMENT_MISMATCH), 1, 0)
    assert d.action is Action.STOP and "measurement" in d.why and "giving up" in d.why
    d = policy.decide(ValidatorHTTPError("POST /servers/boot/attestation", 401, "bad proof"), 1, 0)
    assert d.action is Action.STOP and "hotkey proof" in d.why
