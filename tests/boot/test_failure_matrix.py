"""Every failure mode fails closed: TDX-LUKS-UNLOCK-FAILED with a reason, nothing unlocked, no secret leaked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.boot import exchange, flow
from agent.boot.vm_ca import self_signed_rsa
from agent.evidence.report_data import build_report_data
from agent.log import Secret
from agent.sim.luks_image import null_cipher_keyslot, null_cipher_segment, tamper_luks2_metadata
from agent.sim.quote_sim import SimulatedQuoteSource
from agent.sim.validator import Fault, MeasurementSet
from agent.sim.validator_routes import INVALID_CLIENT_CERT, INVALID_QUOTE_SIGNATURE, MEASUREMENT_MISMATCH, NONCE_ERROR
from tests.boot.conftest import BootRig, RecordingCryptsetup, assert_never_unlocked

pytestmark = pytest.mark.integration


async def _fail(rig: BootRig, deps=None) -> tuple[str, flow.BootOutcome]:
    deps = deps or rig.deps()
    deps.cryptsetup = RecordingCryptsetup(deps.cryptsetup)
    outcome = await rig.run(deps)
    assert_never_unlocked(rig, deps, outcome)
    reason = rig.failure_reason(outcome)
    status = json.loads(Path(rig.cfg.serve.boot_status_path).read_text())
    assert status["outcome"] == "failed" and status["reason"] == reason
    # the stable reason code names the failing stage (the text may change, the code may not)
    assert status["reason_code"] == "boot_" + reason.split(":", 1)[0]
    rig.assert_no_secret_leaked()
    return reason, outcome


def _attestation_nonces(rig: BootRig) -> list[str]:
    return [e["nonce"] for e in rig.validator.events if e["endpoint"] == "nonce"]


@pytest.mark.parametrize("status", [401, 403])
async def test_refusal_stops_at_once(rig: BootRig, status: int) -> None:
    """Reference §3.6: 401/403/404 end the loop (a fresh nonce cannot fix a refused hotkey or subnet)."""
    rig.validator.inject("attestation", Fault("status", status=status, times=None, detail="refused"))
    reason, outcome = await _fail(rig)
    assert f"HTTP {status} (refused)" in reason and "giving up" in reason
    assert len(_attestation_nonces(rig)) == 1 and rig.sleeps == []
    assert outcome.exit_code == 1
    rig.assert_no_secret_leaked()


async def test_404_stops_at_once(rig: BootRig) -> None:
    rig.validator.state.vms.clear()  # the validator does not know this VM: a real 404
    reason, _ = await _fail(rig)
    assert "HTTP 404 (VM not found)" in reason and "giving up" in reason
    assert len(_attestation_nonces(rig)) == 1 and rig.sleeps == []


async def test_429_honours_retry_after_then_succeeds(rig: BootRig) -> None:
    rig.validator.inject("attestation", Fault("status", status=429, times=1, retry_after="3"))
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert rig.sleeps == [3.0]
    assert len(_attestation_nonces(rig)) == 2


async def test_429_always_is_exhausted(rig: BootRig) -> None:
    rig.validator.inject("attestation", Fault("status", status=429, times=None, retry_after="2"))
    reason, _ = await _fail(rig)
    assert "HTTP 429" in reason and "Retry-After honoured" in reason and "exhausted" in reason
    assert rig.sleeps == [2.0, 2.0]


async def test_500_once_is_retried(rig: BootRig) -> None:
    rig.validator.inject("nonce", Fault("status", status=500, times=1))
    outcome = await rig.run()
    assert outcome.ok, outcome.reason
    assert rig.sleeps == [0.5]


async def test_500_always_is_exhausted(rig: BootRig) -> None:
    rig.validator.inject("attestation", Fault("status", status=500, times=None))
    reason, _ = await _fail(rig)
    assert "HTTP 500" in reason and "attempts exhausted" in reason
    assert rig.sleeps == [0.5, 0.5]  # reference §3.6: a fixed pause between attempts


async def test_total_time_budget_bounds_retries(rig: BootRig) -> None:
    rig.cfg.boot.max_attempts = 50
    rig.cfg.boot.total_timeout_s = 4.0
    rig.cfg.boot.backoff_s = 5.0  # the next pause would end past the budget
    rig.validator.inject("attestation", Fault("status", status=503, times=None))
    reason, _ = await _fail(rig)
    assert "total time budget 4s exhausted" in reason
    assert rig.sleeps == []


async def test_timeout(rig: BootRig) -> None:
    rig.cfg.boot.request_timeout_s = 0.5
    rig.cfg.boot.max_attempts = 2
    rig.validator.inject("attestation", Fault("delay", delay_s=2.0, times=None))
    reason, _ = await _fail(rig)
    assert "timed out after 0.5s" in reason


@pytest.mark.parametrize(("kind", "expect"), [
    ("truncated", "body is not JSON"),
    ("garbage", "body is not JSON"),
    ("drop", "closed by the validator without an answer"),
])
async def test_bad_answers(rig: BootRig, kind: str, expect: str) -> None:
    rig.validator.inject("attestation", Fault(kind, times=None))
    reason, _ = await _fail(rig)
    assert expect in reason, reason
    assert len(_attestation_nonces(rig)) == 3


async def test_truncated_nonce_answer(rig: BootRig) -> None:
    rig.validator.inject("nonce", Fault("truncated", times=None))
    reason, _ = await _fail(rig)
    assert "GET /servers/nonce: body is not JSON" in reason


async def test_reused_nonce_is_refused(rig: BootRig) -> None:
    assert (await rig.run()).ok  # consumes one nonce
    rig.validator.state.events.clear()
    (Path(rig.cfg.boot.handoff_dir) / "boot-token").unlink()
    rig.validator.inject("nonce", Fault("replay_nonce", times=None))  # every nonce call: the used one again
    reason, _ = await _fail(rig)
    assert f"HTTP 400 ({NONCE_ERROR})" in reason and "attempts exhausted (3/3)" in reason
    atts = rig.validator.attestations()
    # 400 = fetch a fresh nonce (reference §12.5): retried until the attempts run out
    assert [a["status"] for a in atts] == [400, 400, 400] and rig.sleeps == [0.5, 0.5]


async def test_report_data_of_a_different_cert_is_refused(rig: BootRig, monkeypatch: pytest.MonkeyPatch) -> None:
    other = self_signed_rsa(2048)
    monkeypatch.setattr(exchange, "build_report_data", lambda nonce, _cert: build_report_data(nonce, other.cert))
    reason, _ = await _fail(rig)
    assert f"HTTP 403 ({INVALID_CLIENT_CERT})" in reason
    atts = rig.validator.attestations()
    assert atts and all(a["report_data_nonce_match"] and not a["cert_hash_match"] for a in atts)


class _WrongReportData:
    name = "simulated-tampered"

    def __init__(self, inner: SimulatedQuoteSource) -> None:
        self.inner = inner

    def get_quote(self, report_data: bytes) -> bytes:
        return self.inner.get_quote(bytes(32) + report_data[32:])


async def test_quote_whose_report_data_differs_is_caught_locally(rig: BootRig) -> None:
    deps = rig.deps()
    deps.quote_source = _WrongReportData(rig.source)
    reason, outcome = await _fail(rig, deps)
    assert reason == "self_check: own quote: report_data differs from nonce || SHA-256(client cert SPKI)"
    assert outcome.exit_code == 3
    assert rig.validator.attestations() == []  # never sent


async def test_debug_td_is_caught_locally(rig: BootRig, tmp_path: Path) -> None:
    deps = rig.deps()
    deps.quote_source = SimulatedQuoteSource(tmp_path / "sim", debug=True)
    reason, _ = await _fail(rig, deps)
    assert "TD DEBUG attribute is set" in reason
    assert rig.validator.attestations() == []


async def test_unknown_measurements_are_refused(rig: BootRig) -> None:
    rig.validator.state.measurements = [MeasurementSet("other", "1.0", "11" * 48, "22" * 48, "33" * 48, "44" * 48)]
    reason, _ = await _fail(rig)
    assert f"HTTP 403 ({MEASUREMENT_MISMATCH})" in reason


async def test_quote_under_another_root_is_refused(rig: BootRig, tmp_path: Path) -> None:
    rig.validator.state.root_ca_pem = SimulatedQuoteSource(tmp_path / "other-sim").root_ca_pem
    reason, _ = await _fail(rig)
    assert f"HTTP 403 ({INVALID_QUOTE_SIGNATURE})" in reason
    assert "pck_chain" in rig.validator.attestations()[-1]["quote_failed_checks"]  # kept server-side


async def test_wrong_key_never_unlocks(rig: BootRig) -> None:
    rig.validator.state.vms[rig.vm_name].root = Secret("not-the-right-passphrase")
    deps = rig.deps()
    reason, outcome = await _fail(rig, deps)
    assert reason.startswith("unlock: the validator's key does not open the root volume")
    assert "No key available" in reason
    assert deps.cryptsetup.opens == [(rig.cfg.boot.root_device, False)]
    assert outcome.exit_code == 1


@pytest.mark.parametrize(("mutate", "field"), [
    (null_cipher_segment, "segments.0.encryption: 'cipher_null-ecb'"),
    (null_cipher_keyslot, "keyslots.0.area.encryption: 'cipher_null-ecb'"),
])
async def test_cipher_null_header_is_refused_before_the_key_is_used(rig: BootRig, mutate, field: str) -> None:
    tamper_luks2_metadata(rig.cfg.boot.root_device, mutate)
    deps = rig.deps()
    reason, outcome = await _fail(rig, deps)
    assert reason.startswith("luks_header: root volume header refused: ") and field in reason
    assert outcome.exit_code == 3
    assert deps.cryptsetup.opens == []  # the key never reached cryptsetup


async def test_two_segments_are_refused(rig: BootRig) -> None:
    def second_segment(meta: dict) -> None:  # cryptsetup accepts this layout; the policy must not
        meta["segments"]["0"]["size"] = "2097152"
        meta["segments"]["1"] = dict(meta["segments"]["0"], offset="18874368", size="dynamic",
                                     encryption="cipher_null-ecb")
        meta["digests"]["0"]["segments"] = ["0", "1"]

    tamper_luks2_metadata(rig.cfg.boot.root_device, second_segment)
    reason, _ = await _fail(rig)
    assert "segments: expected exactly one segment" in reason


async def test_not_luks_is_refused(rig: BootRig) -> None:
    Path(rig.cfg.boot.root_device).write_bytes(bytes(1024 * 1024))
    reason, _ = await _fail(rig)
    assert reason.startswith("luks_header: root volume header refused: cannot read a LUKS header")


async def test_missing_config_volume(rig: BootRig) -> None:
    rig.cfg.boot.config_device = str(rig.tmp / "no-such-volume.img")
    reason, outcome = await _fail(rig)
    assert reason == f"config: config volume: device {rig.cfg.boot.config_device} not found"
    assert outcome.exit_code == 5
    assert rig.validator.events == []


async def test_missing_config_volume_by_label(rig: BootRig) -> None:
    rig.cfg.boot.config_device = ""
    rig.cfg.boot.config_label = "no-such-label-chutes-test"
    reason, _ = await _fail(rig)
    assert reason == "config: config volume: a volume labelled 'no-such-label-chutes-test' not found"


async def test_bad_hotkey_on_config_volume(rig: BootRig) -> None:
    from agent.sim.luks_image import make_config_volume

    last = "y" if rig.hotkey.endswith("x") else "x"  # always a different last character (was flaky 1 in 58)
    make_config_volume(rig.cfg.boot.config_device, hostname="vm", hotkey=rig.hotkey[:-1] + last)
    reason, outcome = await _fail(rig)
    assert "miner-ss58: checksum mismatch" in reason or "miner-ss58:" in reason
    assert outcome.exit_code == 4


async def test_unreachable_validator(rig: BootRig) -> None:
    from agent.sim.validator_nginx import free_port

    rig.cfg.boot.validator_url = f"https://127.0.0.1:{free_port()}"
    reason, _ = await _fail(rig)
    assert "cannot connect to 127.0.0.1" in reason and "attempts exhausted" in reason


async def test_untrusted_server_certificate(rig: BootRig) -> None:
    rig.cfg.boot.ca_bundle = ""  # system CAs do not trust the test validator
    reason, _ = await _fail(rig)
    assert "TLS certificate rejected" in reason


async def test_cache_volume_key_refused(rig: BootRig) -> None:
    rig.validator.inject("luks_put", Fault("status", status=404, times=None, detail="VM not found"))
    deps = rig.deps()
    deps.cryptsetup = RecordingCryptsetup(deps.cryptsetup)
    outcome = await rig.run(deps)
    assert not outcome.ok
    reason = rig.failure_reason(outcome)
    assert reason.startswith("cache_volume: cache volume key failed after 1 attempt(s): "
                             "PUT /servers/{vm_name}/luks: HTTP 404")
    assert not (Path(rig.cfg.boot.handoff_dir) / "boot-token").exists()


async def test_luks1_root_is_refused(rig: BootRig) -> None:
    import subprocess

    dev = rig.cfg.boot.root_device
    with open(dev, "wb") as fh:
        fh.truncate(20 * 1024 * 1024)
    proc = subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks1", "--pbkdf-force-iterations",
                           "1000", "--key-file=-", dev], input=rig.root_passphrase.reveal(), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    reason, _ = await _fail(rig)
    assert "luks_header" in reason

