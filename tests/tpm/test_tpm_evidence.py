"""TPM evidence against a real swtpm: round trip, tampering, absence, a TPM that vanishes, threads."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from agent.config import AgentConfig
from agent.evidence import tpm
from agent.evidence.base import EvidenceError
from agent.evidence.tpm import TpmError, collect_tpm_evidence, tpm_status
from agent.evidence.tpm_verify import parse_attest, verify_tpm_evidence
from agent.sim.swtpm import Swtpm, free_port_pair
from tests.tpm.conftest import extend

pytestmark = pytest.mark.integration

DEFAULT_PCRS = {"0", "1", "2", "3", "4", "5", "6", "7", "14"}


def failed(evidence: dict, nonce: bytes) -> list[str]:
    return [c.name for c in verify_tpm_evidence(evidence, nonce).failed()]


def test_round_trip_self_check_passes(cfg: AgentConfig, swtpm: Swtpm) -> None:
    nonce = os.urandom(32)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None
    assert set(ev) == {"attest", "signature", "pcrs", "ak_public", "ek_certificate", "event_log"}
    result = verify_tpm_evidence(ev, nonce)
    assert result.ok, result.to_dict()
    assert [c.name for c in result.checks] == ["decode", "attest", "signature", "nonce", "pcr_selection", "pcr_digest"]
    # more PCRs than one TPM2_PCR_Read returns (8): all nine come back, 32-byte sha256 values
    assert set(ev["pcrs"]) == {"sha256"} and set(ev["pcrs"]["sha256"]) == DEFAULT_PCRS
    assert all(len(bytes.fromhex(v)) == 32 for v in ev["pcrs"]["sha256"].values())
    attest = parse_attest(base64.b64decode(ev["attest"]))
    assert attest.extra_data == nonce
    assert [(s.bank, s.pcrs) for s in attest.pcr_select] == [("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 14))]
    ak = serialization.load_pem_public_key(ev["ak_public"].encode())
    assert isinstance(ak, ec.EllipticCurvePublicKey) and ak.curve.name == "secp256r1"
    assert ev["event_log"] is None


def test_ek_certificate_is_the_one_swtpm_setup_issued(cfg: AgentConfig, swtpm: Swtpm) -> None:
    assert swtpm.ek_cert, "swtpm_setup could not create an EK certificate here"
    ev = collect_tpm_evidence(cfg, b"n" * 32)
    assert ev is not None and ev["ek_certificate"]
    cert = x509.load_pem_x509_certificate(ev["ek_certificate"].encode())
    issuer = x509.load_pem_x509_certificate((swtpm.workdir / "ca" / "issuercert.pem").read_bytes())
    assert cert.issuer == issuer.subject
    issuer_key = issuer.public_key()
    issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)


def test_pcr_values_are_read_from_the_tpm(cfg: AgentConfig) -> None:
    before = collect_tpm_evidence(cfg, b"a" * 32)
    assert before is not None
    extend(cfg, 14, b"chutes-attest test measurement")
    after = collect_tpm_evidence(cfg, b"b" * 32)
    assert after is not None and verify_tpm_evidence(after, b"b" * 32).ok
    old = bytes.fromhex(before["pcrs"]["sha256"]["14"])
    expected = hashlib.sha256(old + hashlib.sha256(b"chutes-attest test measurement").digest()).hexdigest()
    assert after["pcrs"]["sha256"]["14"] == expected
    assert after["pcrs"]["sha256"]["0"] == before["pcrs"]["sha256"]["0"]


def test_event_log_is_included_when_readable(cfg: AgentConfig, tmp_path: Path) -> None:
    log_file = tmp_path / "binary_bios_measurements"
    log_file.write_bytes(b"\x00\x01event-log-bytes")
    cfg.tpm.event_log = str(log_file)
    ev = collect_tpm_evidence(cfg, b"e" * 16)
    assert ev is not None and base64.b64decode(ev["event_log"]) == b"\x00\x01event-log-bytes"


def test_wrong_nonce_fails(cfg: AgentConfig) -> None:
    nonce = os.urandom(32)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None
    assert failed(ev, os.urandom(32)) == ["nonce"]
    assert failed(ev, nonce[:-1]) == ["nonce"]


def test_flipped_signature_bit_fails(cfg: AgentConfig) -> None:
    nonce = os.urandom(32)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None
    sig = bytearray(base64.b64decode(ev["signature"]))
    sig[-1] ^= 0x01  # last bit of ECDSA s
    assert failed({**ev, "signature": base64.b64encode(bytes(sig)).decode()}, nonce) == ["signature"]
    attest = bytearray(base64.b64decode(ev["attest"]))
    attest[-1] ^= 0x80  # inside pcrDigest: the signature no longer covers it
    assert failed({**ev, "attest": base64.b64encode(bytes(attest)).decode()}, nonce) == ["signature"]


def test_returned_pcr_value_tampered_fails(cfg: AgentConfig) -> None:
    nonce = os.urandom(32)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None
    pcrs = {"sha256": dict(ev["pcrs"]["sha256"])}
    pcrs["sha256"]["7"] = "ab" * 32
    assert failed({**ev, "pcrs": pcrs}, nonce) == ["pcr_digest"]
    del pcrs["sha256"]["7"]
    assert failed({**ev, "pcrs": pcrs}, nonce) == ["pcr_selection"]


def test_pcr_extended_between_quote_and_read_fails(cfg: AgentConfig) -> None:
    """Assemble evidence by hand from a quote, a real extend, then a read: the digest no longer matches."""
    nonce = os.urandom(32)
    with tpm._LOCK:
        sess = tpm._session(cfg.tpm.tcti, 0)
        attest, sig = sess.quote(nonce, "sha256", [0, 14])
    extend(cfg, 14, b"late measurement")
    with tpm._LOCK:
        values = sess.read_pcrs("sha256", [0, 14])
        ak_pem = sess.ak_pem
    ev = {"attest": base64.b64encode(attest).decode(), "signature": base64.b64encode(sig).decode(),
          "pcrs": {"sha256": {str(i): v.hex() for i, v in values.items()}}, "ak_public": ak_pem}
    assert failed(ev, nonce) == ["pcr_digest"]


def test_pcr_moving_during_collect_is_retried(cfg: AgentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """collect never returns a quote/PCR pair that disagree: a PCR extended after the quote triggers a retry."""
    original = tpm._Session.read_pcrs
    calls: list[int] = []

    def read_after_extend(self: tpm._Session, bank: str, pcrs: list[int]) -> dict[int, bytes]:
        if not calls:
            from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

            d = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x11" * 32))
            self.ctx.pcr_extend(ESYS_TR.PCR14, TPML_DIGEST_VALUES([d]))
        calls.append(1)
        return original(self, bank, pcrs)

    nonce = os.urandom(32)
    before = collect_tpm_evidence(cfg, nonce)
    assert before is not None
    monkeypatch.setattr(tpm._Session, "read_pcrs", read_after_extend)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None and len(calls) == 2
    assert verify_tpm_evidence(ev, nonce).ok
    old = bytes.fromhex(before["pcrs"]["sha256"]["14"])
    assert ev["pcrs"]["sha256"]["14"] == hashlib.sha256(old + b"\x11" * 32).hexdigest()


def test_absent_tpm_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tpm, "DEVICE_PATH", str(tmp_path / "tpmrm0"))
    cfg = AgentConfig()
    assert collect_tpm_evidence(cfg, b"n" * 32) is None
    status = tpm_status(cfg)
    assert status["present"] is False and status["tcti"] is None and status["error"] is None


def test_mode_off_is_none_even_when_configured(swtpm: Swtpm) -> None:
    cfg = AgentConfig()
    cfg.tpm.tcti, cfg.tpm.mode = swtpm.tcti, "off"
    assert collect_tpm_evidence(cfg, b"n" * 32) is None
    assert tpm_status(cfg)["present"] is False


def test_configured_but_unreachable_is_a_clear_error() -> None:
    cfg = AgentConfig()
    cfg.tpm.tcti = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    with pytest.raises(TpmError, match=r"TPM quote via swtpm:host=127\.0\.0\.1,port=\d+ failed"):
        collect_tpm_evidence(cfg, b"n" * 32)
    status = tpm_status(cfg)
    assert status["present"] is False and cfg.tpm.tcti in status["error"]


def test_tpm_status_reports_the_swtpm(cfg: AgentConfig) -> None:
    status = tpm_status(cfg)
    assert status["present"] is True and status["error"] is None
    assert status["tcti"] == cfg.tpm.tcti
    assert status["manufacturer"] == "IBM"  # swtpm reports TPM_PT_MANUFACTURER "IBM"
    assert status["vendor"] == "SW   TPM"
    assert status["firmware"] and status["firmware"].count(".") == 3
    assert status["ek_certificate"] is True


def test_tpm_vanishing_mid_request_then_coming_back(cfg: AgentConfig, swtpm: Swtpm,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first = collect_tpm_evidence(cfg, b"1" * 32)
    assert first is not None
    original = tpm._Session.read_pcrs

    def kill_then_read(self: tpm._Session, bank: str, pcrs: list[int]) -> dict[int, bytes]:
        swtpm.kill()  # after TPM2_Quote went through, before TPM2_PCR_Read
        return original(self, bank, pcrs)

    monkeypatch.setattr(tpm._Session, "read_pcrs", kill_then_read)
    with pytest.raises(TpmError, match=r"TPM quote via swtpm:.* failed") as err:
        collect_tpm_evidence(cfg, b"2" * 32)
    assert isinstance(err.value, EvidenceError)
    assert tpm._SESSION is None  # the broken context was dropped
    monkeypatch.setattr(tpm._Session, "read_pcrs", original)

    with pytest.raises(TpmError):  # still gone: fails cleanly, no hang
        collect_tpm_evidence(cfg, b"3" * 32)
    assert tpm_status(cfg)["present"] is False

    swtpm.start()  # same state dir and port: the same EPS, so the same AK
    again = collect_tpm_evidence(cfg, b"4" * 32)
    assert again is not None and verify_tpm_evidence(again, b"4" * 32).ok
    assert again["ak_public"] == first["ak_public"]
    assert parse_attest(base64.b64decode(again["attest"])).reset_count > parse_attest(
        base64.b64decode(first["attest"])).reset_count


def test_tpm_vanishing_between_requests(cfg: AgentConfig, swtpm: Swtpm) -> None:
    assert collect_tpm_evidence(cfg, b"1" * 32) is not None
    swtpm.kill()
    with pytest.raises(TpmError, match="failed"):
        collect_tpm_evidence(cfg, b"2" * 32)


def test_concurrent_callers_share_one_context(cfg: AgentConfig) -> None:
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for j in range(4):
                nonce = hashlib.sha256(f"{n}-{j}".encode()).digest()
                ev = collect_tpm_evidence(cfg, nonce)
                results[n * 10 + j] = ev is not None and verify_tpm_evidence(ev, nonce).ok
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 24 and all(results.values())


@pytest.mark.parametrize(("field", "value", "match"), [
    ("bank", "sha3_256", r"tpm\.bank: unsupported bank"),
    ("bank", "sha1", r"tpm\.bank: the TPM returned no sha1 values"),  # swtpm_setup activated sha256 only
    ("pcrs", [], r"tpm\.pcrs"),
    ("pcrs", [24], r"tpm\.pcrs"),
    ("ak_handle", 0x80000001, r"tpm\.ak_handle: 0x80000001 is not a persistent handle"),
])
def test_bad_tpm_config_names_the_key(cfg: AgentConfig, field: str, value: object, match: str) -> None:
    setattr(cfg.tpm, field, value)
    with pytest.raises(TpmError, match=match):
        collect_tpm_evidence(cfg, b"n" * 32)


@pytest.mark.parametrize("nonce", [b"", b"x" * 65])
def test_nonce_size_is_checked(cfg: AgentConfig, nonce: bytes) -> None:
    with pytest.raises(ValueError, match=r"nonce: must be 1\.\.64 bytes"):
        collect_tpm_evidence(cfg, nonce)


def test_64_byte_nonce_and_short_selection(cfg: AgentConfig) -> None:
    """The nonce may be a full 64-byte report_data; the quoted bank is whatever tpm.bank names."""
    nonce = os.urandom(64)
    cfg.tpm.pcrs = [0, 1, 2]
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None and verify_tpm_evidence(ev, nonce).ok
    assert set(ev["pcrs"]["sha256"]) == {"0", "1", "2"}


def test_tpm_without_ek_certificate(tmp_path: Path) -> None:
    with Swtpm(tmp_path / "no-cert", ek_cert=False) as bare:
        cfg = AgentConfig()
        cfg.tpm.tcti, cfg.tpm.event_log = bare.tcti, ""
        ev = collect_tpm_evidence(cfg, b"n" * 32)
        assert ev is not None and ev["ek_certificate"] is None
        assert verify_tpm_evidence(ev, b"n" * 32).ok
        assert tpm_status(cfg)["ek_certificate"] is False
        tpm.close_session()
