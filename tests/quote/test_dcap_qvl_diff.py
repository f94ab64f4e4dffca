"""Differential test against dcap-qvl 0.7.0: every field both parsers expose is equal, on every
sample, on synthesized v5 body-type 2/4 quotes and on mutated samples."""

from __future__ import annotations

import random

import dcap_qvl
import pytest

from agent.quote import QuoteError, parse_quote
from tests.quote.builders import SAMPLES, V4_SAMPLE, V5_SAMPLE, as_v5, sample

HEADER = {"version": "version", "attestation_key_type": "att_key_type", "tee_type": "tee_type",
          "qe_svn": "qe_svn", "pce_svn": "pce_svn", "qe_vendor_id": "qe_vendor_id", "user_data": "user_data"}
TD10 = {n: n for n in ("tee_tcb_svn", "mr_seam", "mr_signer_seam", "seam_attributes", "td_attributes", "xfam",
                       "mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "report_data")}
TD10 |= {f"rt_mr{i}": f"rtmr{i}" for i in range(4)}
TD15 = {"tee_tcb_svn2": "tee_tcb_svn2", "mr_service_td": "mr_service_td"}
TD15EX = {"vmid": "vmid", "td_id": "td_id", "dev_info": "dev_info", "init_service_td_hash": "init_servtd_hash",
          "init_service_td_attributes": "init_servtd_attributes", "init_cpu_svn": "init_cpu_svn",
          "init_tee_tcb_svn": "init_tee_tcb_svn", "init_tee_fmspc": "init_tee_fmspc",
          "cur_service_td_hash": "cur_servtd_hash", "cur_service_td_attributes": "cur_servtd_attributes"}


def compare(raw: bytes) -> int:
    """Assert equality of every shared field; returns the number of fields compared."""
    d = dcap_qvl.parse_quote(raw)
    q = parse_quote(raw)
    assert d.is_tdx()
    report_map = TD10 | (TD15 if q.body_type >= 3 else {}) | (TD15EX if q.body_type == 4 else {})
    expected_cls = {2: "PyTdReport10", 3: "PyTdReport15", 4: "PyTdReport15Ex"}[q.body_type]
    assert type(d.report).__name__ == expected_cls
    n = 0
    for theirs, ours in HEADER.items():
        assert getattr(d.header, theirs) == getattr(q, ours), theirs
        n += 1
    for theirs, ours in report_map.items():
        assert getattr(d.report, theirs) == getattr(q, ours), theirs
        n += 1
    pem = d.cert_chain_pem_bytes()  # None when dcap-qvl cannot read the chain as PEM (mutated)
    if pem is None:
        return n
    assert pem == q.pck_cert_chain
    return n + 1


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_match_dcap_qvl(name: str) -> None:
    raw = sample(name)
    assert compare(raw) == (7 + 15 + 1 + (2 if parse_quote(raw).version == 5 else 0))


@pytest.mark.parametrize("body_type", [2, 3, 4])
def test_v5_body_types_match_dcap_qvl(body_type: int) -> None:
    assert compare(as_v5(sample(V4_SAMPLE), body_type)) == 7 + 15 + 1 + {2: 0, 3: 2, 4: 12}[body_type]


def _value_regions(raw: bytes) -> list[tuple[int, int]]:
    """Byte ranges holding field values (no lengths/types): QE vendor ID + user data, the body, the sig/key."""
    q = parse_quote(raw)
    body_start = q.signed_region[1] - q.body_size
    sd = q.signed_region[1] + 4
    return [(12, 48), (body_start, q.signed_region[1]), (sd, sd + 128)]


@pytest.mark.parametrize("name", [V4_SAMPLE, V5_SAMPLE, "agentmanifest_gcp_configfs_v4_8000B.bin"])
def test_value_mutations_match_dcap_qvl(name: str) -> None:
    rng = random.Random(f"dcap-qvl:{name}")
    raw = sample(name)
    regions = _value_regions(raw)
    for _ in range(300):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 16)):
            lo, hi = rng.choice(regions)
            buf[rng.randrange(lo, hi)] = rng.randrange(256)
        compare(bytes(buf))


@pytest.mark.parametrize("name", [V4_SAMPLE, V5_SAMPLE])
def test_structural_mutations_agree_where_both_accept(name: str) -> None:
    """Mutate anywhere (lengths and types included): whenever both parsers accept, fields agree; and
    a quote we accept as TDX is never one dcap-qvl fails to parse."""
    rng = random.Random(f"structural:{name}")
    raw = sample(name)
    both = 0
    for _ in range(1500):
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(0, 1400) if rng.random() < 0.8 else rng.randrange(len(buf))
            buf[pos] = rng.choice([0, 1, 2, 3, 4, 5, 6, 0x81, 0xFF, rng.randrange(256)])
        if rng.random() < 0.2:
            del buf[rng.randrange(len(buf)):]
        data = bytes(buf)
        try:
            parse_quote(data)
        except QuoteError:
            continue
        compare(data)
        both += 1
    assert both > 300
