"""The production configfs-tsm collector on AMD SEV-SNP (provider ``sev_guest``), unmodified, against the FUSE
emulator through real syscalls: REPORT_DATA bound, the auxblob empty or carrying the certificate table,
ENOTTY fatal after one attempt, ETIMEDOUT retried, the provider and the report size enforced."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.evidence.base import QuoteSourceError, TeeEvidence
from agent.evidence.configfs_tsm import ConfigfsTsmSource, SnpVmpckDisabledError, TsmUnavailableError
from agent.evidence.sources import make_quote_source
from agent.exitcodes import EXIT_UNAVAILABLE
from agent.quote.snp_parser import parse_snp_report
from agent.quote.snp_verify import parse_cert_table, verify_snp_report
from agent.sim.snp_sim import load_or_create_sim_amd, sim_amd_roots
from agent.sim.tsm_emulator import mounted_tsm

pytestmark = [pytest.mark.integration]

RD = bytes(range(64))


def _source(mnt: str, **kw) -> ConfigfsTsmSource:
    kw.setdefault("retry_delay_s", 0)
    kw.setdefault("tee", "snp")
    return ConfigfsTsmSource(mnt, **kw)


def test_report_bound_and_verifies_with_the_simulated_chain(snp_tsm, sim_state) -> None:
    mnt, faults = snp_tsm
    rd = os.urandom(64)
    ev = _source(mnt).get_evidence(rd)
    assert isinstance(ev, TeeEvidence) and ev.tee == "snp" and ev.aux == b""  # upstream KVM: no certificates
    assert len(ev.raw) == 1184 and ev.raw[0x50:0x90] == rd
    r = parse_snp_report(ev.raw)
    assert r.report_data == rd and r.vmpl == 0 and r.version == 5
    chain = load_or_create_sim_amd(sim_state)
    res = verify_snp_report(r, vek=chain.vcek_der, chain_pem=chain.chain_pem, trusted_arks=sim_amd_roots(sim_state),
                            expected_report_data=rd)
    assert res.ok, [(c.name, c.detail) for c in res.failed()]
    assert not verify_snp_report(r, vek=chain.vcek_der, chain_pem=chain.chain_pem).ok  # AMD's pinned roots
    assert faults.quotes_generated == 1 and faults.entries_created == 1
    assert _source(mnt).get_quote(rd) != ev.raw  # a fresh request, a fresh signature


def test_auxblob_carries_the_certificate_table(sim_state) -> None:
    with mounted_tsm(str(sim_state), provider="sev_guest", aux=True) as (mnt, faults):
        ev = _source(mnt).get_evidence(RD)
        assert os.listdir(mnt) == []
    table = parse_cert_table(ev.aux)
    chain = load_or_create_sim_amd(sim_state)
    assert table == {"vcek": chain.vcek_der, "ask": chain.ask_der, "ark": chain.ark_der}
    res = verify_snp_report(ev.raw, cert_table=ev.aux, trusted_arks=sim_amd_roots(sim_state), expected_report_data=RD)
    assert res.ok and res.vek_source == "cert_table"
    assert faults.quotes_generated == 1  # outblob and auxblob came from one request


def test_enotty_is_fatal_after_one_attempt_and_remembered(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(wipe_vmpck=1)
    src = _source(mnt, retries=3)
    with pytest.raises(SnpVmpckDisabledError) as exc:
        src.get_quote(RD)
    msg = str(exc.value)
    assert "ENOTTY" in msg and "VMPCK" in msg and "only a reboot of the VM helps" in msg and "QGS" not in msg
    assert not exc.value.retryable and exc.value.exit_code == EXIT_UNAVAILABLE
    assert exc.value.reason == "snp_vmpck_disabled"
    assert faults.entries_created == 1 and faults.vmpck_wiped
    with pytest.raises(SnpVmpckDisabledError):
        src.get_quote(RD)
    assert faults.entries_created == 1  # fatal until reboot: the device is not asked again
    with pytest.raises(SnpVmpckDisabledError):  # a new source (another process) finds the same
        _source(mnt, retries=3).get_quote(RD)
    assert faults.entries_created == 2


def test_etimedout_is_retried(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(etimedout=2)
    assert parse_snp_report(_source(mnt, retries=3).get_quote(RD)).report_data == RD
    assert faults.remaining("etimedout") == 0 and faults.entries_created == 3 and faults.quotes_generated == 1


def test_etimedout_beyond_retries(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(etimedout=5)
    with pytest.raises(QuoteSourceError) as exc:
        _source(mnt, retries=1).get_quote(RD)
    msg = str(exc.value)
    assert msg.startswith("configfs-tsm SEV-SNP report failed after 2 attempts: ")
    assert "ETIMEDOUT" in msg and "throttled" in msg and "60 s" in msg and "QGS" not in msg
    assert exc.value.retryable and faults.remaining("etimedout") == 3


@pytest.mark.parametrize("shown", ["tdx_guest", "sev_guest_v2"])
def test_wrong_provider(snp_tsm, shown: str) -> None:
    mnt, faults = snp_tsm
    faults.provider = shown
    with pytest.raises(QuoteSourceError, match=f"provider is '{shown}', expected 'sev_guest'") as exc:
        _source(mnt).get_quote(RD)
    assert "not an SEV-SNP guest" in str(exc.value)
    assert faults.entries_created == 1 and faults.quotes_generated == 0


def test_tdx_collector_on_an_snp_guest_refuses(snp_tsm) -> None:
    mnt, faults = snp_tsm
    with pytest.raises(QuoteSourceError, match="provider is 'sev_guest', expected 'tdx_guest'"):
        _source(mnt, tee="tdx").get_quote(RD)
    assert faults.quotes_generated == 0


def test_truncated_report_refused(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(truncate=1)
    with pytest.raises(QuoteSourceError, match="outblob is 1183 bytes, expected an SEV-SNP report of exactly 1184"):
        _source(mnt, retries=3).get_quote(RD)
    assert faults.entries_created == 1  # not retried blindly


def test_report_data_mismatch(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(wrong_report_data=1)
    with pytest.raises(QuoteSourceError, match="REPORT_DATA does not match the 64 bytes written to inblob"):
        _source(mnt).get_quote(RD)


def test_empty_outblob_names_no_qgs(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(empty=1)
    with pytest.raises(QuoteSourceError) as exc:
        _source(mnt).get_quote(RD)
    assert "empty outblob" in str(exc.value) and "QGS" not in str(exc.value)
    assert "sev_guest provider returned no report" in exc.value.hint


def test_concurrent_writer_detected(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(concurrent_write_on_read=1)
    with pytest.raises(QuoteSourceError, match="generation changed while reading outblob"):
        _source(mnt, retries=0).get_quote(RD)
    faults.set(concurrent_write_on_read=1)
    assert parse_snp_report(_source(mnt, retries=1).get_quote(RD)).report_data == RD


def test_privlevel_written_when_the_floor_is_above_zero(sim_state) -> None:
    """Under an SVSM the guest kernel runs above VMPL 0: privlevel = privlevel_floor, the report says so."""
    with mounted_tsm(str(sim_state), provider="sev_guest", privlevel_floor=2) as (mnt, faults):
        r = parse_snp_report(_source(mnt).get_quote(RD))
        assert r.vmpl == 2 and faults.entries_created == 1
        assert os.listdir(mnt) == []


def test_missing_root_hint_names_sev_guest(tmp_path) -> None:
    with pytest.raises(TsmUnavailableError) as exc:
        _source(str(tmp_path / "nope")).get_quote(RD)
    assert "SEV-SNP guest" in str(exc.value) and "sev-guest" in str(exc.value) and "TDX" not in str(exc.value)


def test_make_quote_source_pinned_snp(snp_tsm) -> None:
    mnt, _ = snp_tsm
    cfg = AgentConfig()
    cfg.quote.tee, cfg.quote.configfs_root, cfg.quote.retry_delay_s = "snp", mnt, 0
    src = make_quote_source(cfg)
    assert isinstance(src, ConfigfsTsmSource) and src.tee == "snp" and src.expected_provider == "sev_guest"
    assert parse_snp_report(src.get_quote(RD)).report_data == RD


# -- the emulator reproduces the sev_guest rules the collector relies on (sev-snp.md §2.1, §2.2) -----------


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_emulator_sev_guest_attributes(snp_tsm) -> None:
    mnt, faults = snp_tsm
    entry = os.path.join(mnt, "raw")
    os.mkdir(entry)
    try:
        assert sorted(os.listdir(entry)) == ["auxblob", "generation", "inblob", "outblob", "privlevel",
                                             "privlevel_floor", "provider"]
        e = Path(entry)
        assert (e / "provider").read_text() == "sev_guest\n" and (e / "privlevel_floor").read_text() == "0\n"
        assert (e / "privlevel").read_text() == "0\n" and (e / "generation").read_text() == "0\n"
        # privlevel: a text attribute, stored at write(2) (its error comes back from it), bumping generation
        _write(entry + "/privlevel", b"1\n")
        assert (e / "privlevel").read_text() == "1\n" and (e / "generation").read_text() == "1\n"
        with pytest.raises(OSError) as exc:
            _write(entry + "/privlevel", b"4\n")
        assert exc.value.errno == errno.EINVAL and (e / "generation").read_text() == "1\n"
        _write(entry + "/privlevel", b"0")
        # inblob not 64 bytes: EINVAL when the report is requested (outblob or auxblob read)
        _write(entry + "/inblob", bytes(32))
        for attr in ("outblob", "auxblob"):
            with pytest.raises(OSError) as exc:
                (e / attr).read_bytes()
            assert exc.value.errno == errno.EINVAL
        _write(entry + "/inblob", RD)
        assert (e / "auxblob").read_bytes() == b""  # reading auxblob first requests the report
        assert faults.quotes_generated == 1
        report = (e / "outblob").read_bytes()
        assert faults.quotes_generated == 1 and parse_snp_report(report).report_data == RD  # same generation
        with pytest.raises(PermissionError):
            os.open(entry + "/auxblob", os.O_WRONLY)
    finally:
        os.rmdir(entry)


def test_emulator_enotty_stays(snp_tsm) -> None:
    mnt, faults = snp_tsm
    faults.set(wipe_vmpck=1)
    entry = Path(mnt, "wiped")
    entry.mkdir()
    try:
        _write(str(entry / "inblob"), RD)
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                (entry / "outblob").read_bytes()
            assert exc.value.errno == errno.ENOTTY
        _write(str(entry / "inblob"), bytes(64))
        with pytest.raises(OSError) as exc:
            (entry / "auxblob").read_bytes()
        assert exc.value.errno == errno.ENOTTY
    finally:
        entry.rmdir()
    assert faults.quotes_generated == 0
