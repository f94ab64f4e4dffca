"""SPDM report parser: the documented facts of the real samples, and field-named rejection of bad input."""

from __future__ import annotations

import struct

import pytest

from agent.evidence.spdm import SpdmParseError, parse_measurement_record, parse_opaque, parse_report


def test_h100_sample_fields(h100_sample):
    r = parse_report(h100_sample.report)
    assert len(r.raw) == 4117
    assert (r.spdm_version, r.request_code, r.request_param1, r.request_param2, r.slot_id) == (0x11, 0xE0, 1, 0xFF, 0)
    assert r.nonce.hex() == "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"
    assert r.response_code == 0x60
    assert len(r.blocks) == 64
    assert [b.index for b in r.blocks] == list(range(1, 65))
    assert all(len(b.value) == 48 for b in r.blocks)
    assert r.measurement_record_len == 3520
    assert len(r.signature) == 96
    assert len(r.signed_bytes) == 4117 - 96
    o = r.opaque
    assert sum(4 + len(v) for _, v in o.entries) == 422
    assert o.driver_version == "550.90.07"
    assert o.vbios_version == "96.00.9f.00.01"
    assert (o.project, o.project_sku, o.chip_sku) == ("1010", "0200", "882")
    assert len(o.fwid) == 48
    assert o.feature_flag is None and o.version is None


def test_ppcie_samples_fields(ppcie_samples):
    for s in ppcie_samples:
        r = parse_report(s.report)
        assert len(r.raw) == 4274
        assert r.nonce == s.nonce
        assert sum(4 + len(v) for _, v in r.opaque.entries) == 579
        assert r.opaque.driver_version == "590.12"
        assert r.opaque.vbios_version == "96.00.a5.00.01"
        assert r.opaque.feature_flag == "PPCIE"
        assert r.opaque.version == 1
        assert (r.opaque.project, r.opaque.project_sku, r.opaque.chip_sku) == ("G520", "0200", "885")
        assert len(r.opaque.get("switch_pdi")) % 8 == 0


@pytest.mark.parametrize(
    ("cut", "field"),
    [
        (0, "request"),
        (36, "request"),
        (37, "response.header"),
        (44, "response.header"),
        (45 + 100, "response.measurement_record"),
        (45 + 3520 + 10, "response.nonce"),
        (45 + 3520 + 32 + 1, "response.opaque_length"),
        (45 + 3520 + 34 + 100, "response.opaque_data"),
        (4117 - 1, "response.signature"),
    ],
)
def test_truncation_names_the_field(h100_sample, cut, field):
    with pytest.raises(SpdmParseError) as ei:
        parse_report(h100_sample.report[:cut])
    assert ei.value.field == field
    assert field in str(ei.value) and "truncated" in str(ei.value)


def test_trailing_bytes_rejected(h100_sample):
    with pytest.raises(SpdmParseError, match="trailing") as ei:
        parse_report(h100_sample.report + b"\x00")
    assert ei.value.field == "report"


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (1, 0x81, "request.code"),
        (0, 0x20, "request.version"),
        (38, 0x61, "response.code"),
        (37, 0x12, "response.version"),
    ],
)
def test_bad_codes_rejected(h100_sample, offset, value, field):
    bad = bytearray(h100_sample.report)
    bad[offset] = value
    with pytest.raises(SpdmParseError) as ei:
        parse_report(bytes(bad))
    assert ei.value.field == field


def test_block_count_mismatch_rejected(h100_sample):
    bad = bytearray(h100_sample.report)
    bad[37 + 4] = 63  # one block fewer than the record holds
    with pytest.raises(SpdmParseError, match="left after 63 blocks") as ei:
        parse_report(bytes(bad))
    assert ei.value.field == "measurement_record"


def test_bad_measurement_spec_and_size():
    good = struct.pack("<BBH", 1, 1, 51) + struct.pack("<BH", 1, 48) + b"\x11" * 48
    assert parse_measurement_record(good, 1)[0].value == b"\x11" * 48
    with pytest.raises(SpdmParseError) as ei:
        parse_measurement_record(good[:1] + b"\x02" + good[2:], 1)
    assert ei.value.field == "measurement_block[0].spec"
    with pytest.raises(SpdmParseError) as ei:
        parse_measurement_record(good[:5] + struct.pack("<H", 47) + good[7:], 1)
    assert ei.value.field == "measurement_block[0].value_size"


def test_opaque_truncated_entry_and_unknown_type_kept():
    with pytest.raises(SpdmParseError) as ei:
        parse_opaque(struct.pack("<HH", 3, 10) + b"550")
    assert ei.value.field == "opaque_data.driver_version"
    with pytest.raises(SpdmParseError) as ei:
        parse_opaque(b"\x03\x00\x01")
    assert ei.value.field == "opaque_data[0].header"
    o = parse_opaque(struct.pack("<HH", 200, 2) + b"\xab\xcd" + struct.pack("<HH", 3, 4) + b"1.2\x00")
    assert o.get(200) == b"\xab\xcd" and o.driver_version == "1.2"


def test_not_bytes_rejected():
    with pytest.raises(SpdmParseError) as ei:
        parse_report("00" * 4117)  # type: ignore[arg-type]
    assert ei.value.field == "report"
