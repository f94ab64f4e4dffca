"""Simulated quotes are structurally real v4 quotes that verify only against the simulated root."""

from __future__ import annotations

import hashlib
import os
import stat
import struct

import pytest
import structlog
from cryptography import x509
from structlog.testing import capture_logs

from agent.config import AgentConfig
from agent.evidence.configfs_tsm import ConfigfsTsmSource
from agent.evidence.sources import make_quote_source
from agent.quote import parse_quote, verify_quote
from agent.sim.quote_sim import (
    DEFAULT_MR_TD,
    DEFAULT_RTMRS,
    INTEL_QE_VENDOR_ID,
    QE_AUTH_DATA,
    SimulatedQuoteSource,
    load_or_create_sim_pki,
)

RD = bytes(range(64))


@pytest.fixture(scope="module")
def source(sim_state) -> SimulatedQuoteSource:
    return SimulatedQuoteSource(sim_state)


def test_layout_and_fields(source) -> None:
    raw = source.get_quote(RD)
    q = parse_quote(raw)
    assert (q.version, q.att_key_type, q.tee_type) == (4, 2, 0x81)
    assert q.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert struct.unpack_from("<I", raw, 632)[0] == len(raw) - 636 == q.sig_data_len
    assert q.trailing_len == 0
    assert q.report_data == RD
    assert q.mr_td == DEFAULT_MR_TD == hashlib.sha384(b"chutes-attest simulated MRTD").digest()
    assert (q.rtmr0, q.rtmr1, q.rtmr2, q.rtmr3) == DEFAULT_RTMRS
    assert q.rtmr3 == bytes(48)
    assert q.debug is False
    assert (q.cert_data_type, q.pck_cert_chain_type) == (6, 5)
    assert q.qe_auth_data == QE_AUTH_DATA
    # the PEM chain is NUL-terminated like real quotes, leaf -> platform CA -> root
    assert raw.endswith(b"-----END CERTIFICATE-----\n\x00")
    certs = [x509.load_pem_x509_certificate(c) for c in q.pck_certs]
    assert [c.subject.rfc4514_string().split(",")[-1] for c in certs] == [
        "CN=SIMULATED SGX PCK Certificate (untrusted)",
        "CN=SIMULATED SGX PCK Platform CA (untrusted)",
        "CN=SIMULATED SGX Root CA (untrusted)",
    ]
    # QE report binds the attestation key: SHA-256(att_key || auth_data) || 32 zero bytes
    assert q.qe_report_data == hashlib.sha256(q.attestation_key + q.qe_auth_data).digest() + bytes(32)


def test_dcap_qvl_parses_it_the_same_way(source) -> None:
    import dcap_qvl
    raw = source.get_quote(RD)
    d = dcap_qvl.parse_quote(raw)
    assert d.header.version == 4 and d.header.tee_type == 0x81
    assert d.report.report_data == RD and d.report.mr_td == DEFAULT_MR_TD


def test_verifies_against_sim_root_only(source) -> None:
    raw = source.get_quote(RD)
    ok = verify_quote(raw, root_ca_pem=source.root_ca_pem)
    assert ok.ok, ok.to_dict()
    assert [c.name for c in ok.checks] == ["quote_signature", "qe_report_signature", "qe_report_data_binding",
                                           "pck_chain"]
    pinned = verify_quote(raw, root_ca_pem=None)  # Intel's pinned root
    assert not pinned.ok
    assert not pinned.check("pck_chain").passed
    assert "SIMULATED" in pinned.check("pck_chain").detail


def test_signature_covers_report_data(source) -> None:
    raw = bytearray(source.get_quote(RD))
    raw[568] ^= 1
    assert not verify_quote(bytes(raw), root_ca_pem=source.root_ca_pem).check("quote_signature").passed


def test_debug_and_custom_measurements(sim_state) -> None:
    mr_td = hashlib.sha384(b"other").digest()
    rtmrs = tuple(hashlib.sha384(bytes([i])).digest() for i in range(4))
    src = SimulatedQuoteSource(sim_state, mr_td=mr_td, rtmrs=rtmrs, debug=True)
    q = parse_quote(src.get_quote(RD))
    assert q.debug is True and q.td_attributes[0] & 1 == 1
    assert q.mr_td == mr_td and (q.rtmr0, q.rtmr1, q.rtmr2, q.rtmr3) == rtmrs
    with pytest.raises(ValueError, match="mr_td"):
        SimulatedQuoteSource(sim_state, mr_td=b"short")


def test_rejects_wrong_report_data_length(source) -> None:
    for bad in (b"", bytes(63), bytes(65)):
        with pytest.raises(ValueError, match="report_data"):
            source.get_quote(bad)


def test_pki_persisted_with_private_keys_0600(tmp_path) -> None:
    a = load_or_create_sim_pki(tmp_path / "st")
    b = load_or_create_sim_pki(tmp_path / "st")
    assert a.root_ca_pem == b.root_ca_pem
    assert stat.S_IMODE(os.stat(tmp_path / "st").st_mode) == 0o700
    keys = sorted(p.name for p in (tmp_path / "st").glob("*.key"))
    assert keys == ["sim-pck.key", "sim-platform.key", "sim-root.key"]
    for k in keys:
        assert stat.S_IMODE(os.stat(tmp_path / "st" / k).st_mode) == 0o600


def test_fresh_attestation_key_per_source(sim_state) -> None:
    a = parse_quote(SimulatedQuoteSource(sim_state).get_quote(RD))
    b = parse_quote(SimulatedQuoteSource(sim_state).get_quote(RD))
    assert a.attestation_key != b.attestation_key
    assert a.pck_certs == b.pck_certs


@pytest.fixture
def captured(monkeypatch):
    """Capture structlog events of the modules under test (their loggers are bound at import time)."""
    from agent.evidence import sources
    from agent.sim import quote_sim

    with capture_logs() as logs:
        for mod in (quote_sim, sources):
            monkeypatch.setattr(mod, "log", structlog.get_logger().bind(logger=mod.__name__))
        yield logs


def test_every_use_logs_a_warning(source, captured) -> None:
    source.get_quote(RD)
    source.get_quote(RD)
    warnings = [e for e in captured if e["event"] == "quote.simulated"]
    assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)


def test_make_quote_source_is_explicit(sim_state, captured, tmp_path) -> None:
    cfg = AgentConfig()
    (tmp_path / "tdx_guest").touch()  # this machine is no TDX guest: quote.tee = "auto" probes this file instead
    cfg.quote.tdx_device = str(tmp_path / "tdx_guest")
    src = make_quote_source(cfg)  # default: production configfs, never the simulator
    assert isinstance(src, ConfigfsTsmSource)
    # quote.expected_provider "" (default): the probed TEE's own provider
    assert cfg.quote.expected_provider == "" and src.tee == "tdx"
    assert src.root == "/sys/kernel/config/tsm/report" and src.expected_provider == "tdx_guest"
    cfg.quote.source = "simulated"
    cfg.quote.simulated_state_dir = str(sim_state)
    sim = make_quote_source(cfg)
    assert isinstance(sim, SimulatedQuoteSource) and sim.tee == "tdx"  # quote.tee = "auto", simulated: TDX
    assert any(e["event"] == "quote.source_simulated" and e["log_level"] == "warning" for e in captured)
    cfg.quote.source = "tpm"
    with pytest.raises(ValueError, match=r"quote\.source"):
        make_quote_source(cfg)
