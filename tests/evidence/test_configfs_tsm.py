"""The production configfs-tsm collector, unmodified, against the FUSE emulator through real syscalls."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from agent.evidence.base import QuoteSourceError
from agent.evidence.configfs_tsm import ConfigfsTsmSource, TsmUnavailableError
from agent.quote import parse_quote, verify_quote

pytestmark = [pytest.mark.integration]

RD = bytes(range(64))


def _source(mnt: str, **kw) -> ConfigfsTsmSource:
    kw.setdefault("retry_delay_s", 0)
    return ConfigfsTsmSource(mnt, **kw)


def test_happy_path(tsm, sim_pki) -> None:
    mnt, faults = tsm
    raw = _source(mnt).get_quote(RD)
    q = parse_quote(raw)
    assert q.report_data == RD
    assert verify_quote(q, root_ca_pem=sim_pki.root_ca_pem).ok
    assert faults.quotes_generated == 1 and faults.entries_created == 1


def test_ebusy_then_success(tsm) -> None:
    mnt, faults = tsm
    faults.set(ebusy=2)
    raw = _source(mnt, retries=3).get_quote(RD)
    assert parse_quote(raw).report_data == RD
    assert faults.remaining("ebusy") == 0
    assert faults.entries_created == 3 and faults.quotes_generated == 1


def test_ebusy_beyond_retries(tsm) -> None:
    mnt, faults = tsm
    faults.set(ebusy=10)
    with pytest.raises(QuoteSourceError) as exc:
        _source(mnt, retries=2).get_quote(RD)
    msg = str(exc.value)
    assert "after 3 attempts" in msg and "EBUSY" in msg and "still owned by the host" in msg
    assert exc.value.retryable
    assert faults.remaining("ebusy") == 7 and faults.quotes_generated == 0


def test_empty_outblob_points_at_qgs(tsm) -> None:
    mnt, faults = tsm
    faults.set(empty=1)
    with pytest.raises(QuoteSourceError) as exc:
        _source(mnt, retries=3).get_quote(RD)
    assert "empty outblob" in str(exc.value)
    assert "host quote service (QGS) failed" in exc.value.hint
    assert faults.entries_created == 1  # its own error, not retried blindly


def test_concurrent_writer_between_write_and_read_detected(tsm) -> None:
    mnt, faults = tsm
    faults.set(concurrent_write_on_read=1)
    with pytest.raises(QuoteSourceError) as exc:
        _source(mnt, retries=0).get_quote(RD)
    assert "generation changed while reading outblob" in str(exc.value)
    assert "concurrent writer" in str(exc.value)


def test_concurrent_writer_retried_to_success(tsm) -> None:
    mnt, faults = tsm
    faults.set(concurrent_write_on_read=1)
    assert parse_quote(_source(mnt, retries=1).get_quote(RD)).report_data == RD
    assert faults.entries_created == 2


def test_concurrent_writer_at_close_detected(tsm) -> None:
    mnt, faults = tsm
    faults.set(concurrent_write_at_close=1)
    with pytest.raises(QuoteSourceError, match=r"generation 0 -> 2, expected 1"):
        _source(mnt, retries=0).get_quote(RD)
    assert faults.quotes_generated == 0  # detected before outblob was read


def test_dropped_write_detected(tsm) -> None:
    mnt, faults = tsm
    faults.set(drop_write=1)
    with pytest.raises(QuoteSourceError, match=r"generation 0 -> 0, expected 1"):
        _source(mnt, retries=0).get_quote(RD)


def test_slow_quote_ok(tsm) -> None:
    mnt, faults = tsm
    faults.delay_s = 0.3
    assert parse_quote(_source(mnt).get_quote(RD)).report_data == RD


def test_provider_mismatch(tsm) -> None:
    mnt, faults = tsm
    faults.provider = "sev_guest"
    with pytest.raises(QuoteSourceError, match="provider is 'sev_guest', expected 'tdx_guest'"):
        _source(mnt).get_quote(RD)
    assert faults.entries_created == 1 and faults.quotes_generated == 0


def test_report_data_mismatch(tsm) -> None:
    mnt, faults = tsm
    faults.set(wrong_report_data=1)
    with pytest.raises(QuoteSourceError, match="report_data does not match"):
        _source(mnt).get_quote(RD)


def test_parallel_collectors_use_private_entries(tsm) -> None:
    mnt, faults = tsm
    src = _source(mnt)
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        results[i] = parse_quote(src.get_quote(bytes([i]) * 64)).report_data

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: bytes([i]) * 64 for i in range(4)}
    assert faults.quotes_generated == 4


def test_bad_input_and_missing_root(tsm, tmp_path) -> None:
    mnt, _ = tsm
    with pytest.raises(ValueError, match="report_data: expected 64 bytes, got 32"):
        _source(mnt).get_quote(bytes(32))
    with pytest.raises(TsmUnavailableError, match="not found"):
        _source(str(tmp_path / "nope")).get_quote(RD)


# -- the emulator reproduces the kernel rules the collector relies on ------------------------------------


def test_emulator_write_applied_at_close_and_size_rules(tsm) -> None:
    mnt, faults = tsm
    entry = os.path.join(mnt, "raw")
    os.mkdir(entry)
    try:
        assert sorted(os.listdir(entry)) == ["generation", "inblob", "outblob", "provider"]
        gen = lambda: int(Path(entry, "generation").read_text())  # noqa: E731
        fd = os.open(os.path.join(entry, "inblob"), os.O_WRONLY)
        os.write(fd, RD)
        assert gen() == 0  # buffered until close
        os.close(fd)
        assert gen() == 1
        fd = os.open(os.path.join(entry, "inblob"), os.O_WRONLY)
        with pytest.raises(OSError) as exc:
            os.write(fd, bytes(65))
        assert exc.value.errno == errno.EFBIG
        os.close(fd)
        fd = os.open(os.path.join(entry, "inblob"), os.O_WRONLY)
        os.write(fd, bytes(32))  # accepted now, fails on read, like the kernel
        os.close(fd)
        assert gen() == 2
        fd = os.open(os.path.join(entry, "outblob"), os.O_RDONLY)
        with pytest.raises(OSError) as exc:
            os.read(fd, 8192)
        assert exc.value.errno == errno.EINVAL
        os.close(fd)
        with pytest.raises(PermissionError):
            os.open(os.path.join(entry, "outblob"), os.O_WRONLY)
    finally:
        os.rmdir(entry)
    assert faults.quotes_generated == 0


def test_emulator_outblob_cached_until_generation_moves(tsm) -> None:
    mnt, faults = tsm
    entry = os.path.join(mnt, "cache")
    os.mkdir(entry)
    try:
        with open(os.path.join(entry, "inblob"), "wb", buffering=0) as f:
            f.write(RD)
        a = Path(entry, "outblob").read_bytes()
        b = Path(entry, "outblob").read_bytes()
        assert a == b and faults.quotes_generated == 1
        with open(os.path.join(entry, "inblob"), "wb", buffering=0) as f:
            f.write(bytes(64))
        c = Path(entry, "outblob").read_bytes()
        assert parse_quote(c).report_data == bytes(64) and faults.quotes_generated == 2
    finally:
        os.rmdir(entry)


def test_cli_quote_get_against_emulator(tsm, tmp_path, capsys, sim_pki, monkeypatch) -> None:
    from cryptography.hazmat.primitives import serialization

    from agent import log
    from agent.cli import main
    from agent.evidence.report_data import spki_sha256

    # keep main() from pointing the process-wide logging at capsys's stream (closed after this test)
    monkeypatch.setattr(log, "configure", lambda *a, **k: "console")
    mnt, _ = tsm
    cert = tmp_path / "server.crt"
    cert.write_bytes(sim_pki.pck_cert.public_bytes(serialization.Encoding.PEM))
    nonce = "ab" * 32
    out = tmp_path / "quote.bin"
    # no TDX device on this machine: quote.tee = "auto" would fail closed, so the TEE is pinned
    rc = main(["--set", f"quote.configfs_root={mnt}", "--set", "quote.tee=tdx", "--set", "quote.retry_delay_s=0",
               "quote", "get",
               "--nonce", nonce, "--cert", str(cert), "--json", "--out", str(out)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    expected = bytes.fromhex(nonce) + spki_sha256(sim_pki.pck_cert)
    assert doc["report_data"] == expected.hex() == doc["summary"]["report_data"]
    assert doc["source"] == "configfs" and doc["simulated"] is False
    assert parse_quote(out.read_bytes()).report_data == expected
    rc = main(["--set", f"quote.configfs_root={mnt}", "quote", "get", "--nonce", "ab" * 31, "--cert", str(cert)])
    assert rc == 4
    assert "nonce: expected 64 hex characters, got 62" in capsys.readouterr().err


async def test_queue_over_configfs_source(tsm, sim_pki) -> None:
    """The full production path: QuoteQueue -> ConfigfsTsmSource -> (emulated) kernel."""
    import asyncio

    from agent.evidence.quote_queue import QuoteQueue

    mnt, faults = tsm
    faults.delay_s = 0.05
    q = QuoteQueue(_source(mnt), max_len=8, default_deadline_s=30)
    wanted = [bytes([1]) * 64, bytes([2]) * 64, bytes([1]) * 64, bytes([3]) * 64]
    quotes = await asyncio.gather(*(q.get(r, caller=f"c{i}") for i, r in enumerate(wanted)))
    await q.aclose()
    for r, raw in zip(wanted, quotes, strict=True):
        parsed = parse_quote(raw)
        assert parsed.report_data == r
        assert verify_quote(parsed, root_ca_pem=sim_pki.root_ca_pem).ok
    assert quotes[0] == quotes[2]  # identical report_data shared one quote
    assert faults.quotes_generated == 3
