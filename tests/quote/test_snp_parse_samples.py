"""The C SEV-SNP parser on the eight real reports: tests/data/sev-snp/README.md's expected values, and an
independent ``struct`` model of the layout (docs/reference/sev-snp.md section 1.2) written here."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from agent.quote import SnpReport, decode_tcb, evidence_kind, parse_evidence, parse_snp_report
from agent.quote.snp_parser import BYTES_FIELDS, INT_FIELDS
from tests.conftest import TESTDATA

SNP_DIR = TESTDATA / "sev-snp"
REPORTS = sorted(p.name for p in SNP_DIR.glob("*.bin"))

# The README's "Expected values" table, plus the product / version / debug / key columns of its report table.
# (guest_svn, key_info, platform, current_tcb, reported_tcb, committed_tcb, fw current, fw committed,
#  measurement[:8] hex, report_data[:8] hex, version, product, debug, vmpl)
EXPECTED: dict[str, tuple[Any, ...]] = {
    "S1-milan-v2.bin": (0, 0x0, 0x1, "0300000000000873", "0300000000000873", "0300000000000873", "1.52.4", "1.52.4",
                        "7a1e5c266c0108db", "d447b55d197491bf", 2, None, False, 0),
    "S2-milan-v2.bin": (0, 0x0, 0x1, "0200000000000544", "0200000000000544", "0200000000000544", "1.49.3", "1.49.3",
                        "b07af9620f3b839b", "0102030405000000", 2, None, True, 0),
    "S3-milan-v2.bin": (4, 0x0, 0x1, "03000000000008ce", "0300000000000873", "0300000000000873", "1.52.4", "1.52.4",
                        "a1f3930413247bb3", "ec6c52d7533cc2c4", 2, None, False, 0),
    "S4-milan-v3.bin": (0, 0x4, 0x27, "04000000000018dc", "04000000000018d9", "04000000000018db", "1.55.29",
                        "1.55.29", "8922ebbdd00ec2c5", "819770b7e6ea6df8", 3, "Milan", False, 1),
    "S6-genoa-v5.bin": (0, 0x0, 0x25, "0a00000000001b58", "0a00000000001b58", "0a00000000001b58", "1.55.49",
                        "1.55.49", "bece7399a4da054a", "bb851e203747c368", 5, "Genoa", False, 0),
    "S7-genoa-v3.bin": (0, 0x0, 0x25, "0900000000001748", "0900000000001748", "0900000000001748", "1.55.39",
                        "1.55.39", "b0f5d097b5c7addd", "ed6f6333fec8605e", 3, "Genoa", False, 0),
    "S8-milan-v3.bin": (0, 0x0, 0x25, "04000000000018db", "04000000000018db", "04000000000018db", "1.55.29",
                        "1.55.29", "195b01b74976a1fa", "a7ca989b0359ea4e", 3, "Milan", False, 0),
    "S9-turin-v5.bin": (0, 0x0, 0x67, "0001000200000047", "0001000200000047", "0001000200000047", "1.55.61",
                        "1.55.61", "f924dd18f168df60", "e0fd0bdb6aa4030a", 5, "Turin", False, 0),
}
# The README's decoded REPORTED_TCB per sample (product layout; the v2 Milan samples decoded as Milan).
REPORTED_DECODED = {
    "S1-milan-v2.bin": ("Milan", {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}),
    "S2-milan-v2.bin": ("Milan", {"bl": 2, "tee": 0, "snp": 5, "ucode": 68}),
    "S3-milan-v2.bin": ("Milan", {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}),
    "S4-milan-v3.bin": ("Milan", {"bl": 4, "tee": 0, "snp": 24, "ucode": 217}),
    "S6-genoa-v5.bin": ("Genoa", {"bl": 10, "tee": 0, "snp": 27, "ucode": 88}),
    "S7-genoa-v3.bin": ("Genoa", {"bl": 9, "tee": 0, "snp": 23, "ucode": 72}),
    "S8-milan-v3.bin": ("Milan", {"bl": 4, "tee": 0, "snp": 24, "ucode": 219}),
    "S9-turin-v5.bin": ("Turin", {"fmc": 0, "bl": 1, "tee": 0, "snp": 2, "ucode": 71}),
}

# --- the independent model: one struct format for the 1184 bytes, names per section 1.2 -------------------
_LAYOUT = [
    ("version", "I"), ("guest_svn", "I"), ("policy", "Q"), ("family_id", "16s"), ("image_id", "16s"),
    ("vmpl", "I"), ("signature_algo", "I"), ("current_tcb", "8s"), ("platform_info", "Q"), ("key_info", "I"),
    ("_r04c", "4s"), ("report_data", "64s"), ("measurement", "48s"), ("host_data", "32s"),
    ("id_key_digest", "48s"), ("author_key_digest", "48s"), ("report_id", "32s"), ("report_id_ma", "32s"),
    ("reported_tcb", "8s"), ("cpuid_fam_id", "B"), ("cpuid_mod_id", "B"), ("cpuid_step", "B"), ("_r18b", "21s"),
    ("chip_id", "64s"), ("committed_tcb", "8s"), ("current_build", "B"), ("current_minor", "B"),
    ("current_major", "B"), ("_r1eb", "B"), ("committed_build", "B"), ("committed_minor", "B"),
    ("committed_major", "B"), ("_r1ef", "B"), ("launch_tcb", "8s"), ("launch_mit_vector", "Q"),
    ("current_mit_vector", "Q"), ("_r208", "152s"), ("signature_r", "72s"), ("signature_s", "72s"),
    ("_sig_tail", "368s"),
]
_FMT = "<" + "".join(f for _, f in _LAYOUT)
assert struct.calcsize(_FMT) == 1184


def model(raw: bytes) -> dict[str, Any]:
    d = dict(zip([n for n, _ in _LAYOUT], struct.unpack(_FMT, raw), strict=True))
    if d["version"] < 3:
        for k in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step"):
            d[k] = None
    if d["version"] < 5:
        d["launch_mit_vector"] = d["current_mit_vector"] = None
    return {k: v for k, v in d.items() if not k.startswith("_")}


def load(name: str) -> bytes:
    return (SNP_DIR / name).read_bytes()


def test_all_eight_samples_are_here() -> None:
    assert REPORTS == sorted(EXPECTED)


@pytest.mark.parametrize("name", REPORTS)
def test_every_field_equals_the_struct_model(name: str) -> None:
    raw = load(name)
    r = parse_snp_report(raw)
    m = model(raw)
    assert set(m) == set(BYTES_FIELDS) | set(INT_FIELDS)
    for key, value in m.items():
        assert getattr(r, key) == value, key
    assert r.raw == raw and r.signed_data == raw[:0x2A0]


@pytest.mark.parametrize("name", REPORTS)
def test_readme_expected_values(name: str) -> None:
    (svn, key_info, platform, cur, rep, com, fw_cur, fw_com, meas, rd, version, product, debug,
     vmpl) = EXPECTED[name]
    r = parse_snp_report(load(name))
    assert isinstance(r, SnpReport)
    assert (r.version, r.guest_svn, r.key_info, r.platform_info, r.vmpl) == (version, svn, key_info, platform, vmpl)
    assert (r.current_tcb.hex(), r.reported_tcb.hex(), r.committed_tcb.hex()) == (cur, rep, com)
    assert (r.current_firmware, r.committed_firmware) == (fw_cur, fw_com)
    assert r.measurement.hex()[:16] == meas and r.report_data.hex()[:16] == rd
    assert r.product == product and r.debug is debug
    assert r.signature_algo == 1
    # common to all eight
    assert not any(r.host_data) and not any(r.author_key_digest) and r.report_id_ma == b"\xff" * 32
    assert len(r.report_data) == 64 and len(r.measurement) == 48 and len(r.chip_id) == 64


@pytest.mark.parametrize("name", REPORTS)
def test_reported_tcb_decodes_per_product(name: str) -> None:
    product, decoded = REPORTED_DECODED[name]
    r = parse_snp_report(load(name))
    assert decode_tcb(r.reported_tcb, product) == decoded
    if r.product is not None:
        assert r.tcb("reported_tcb") == decoded
        assert r.to_dict()["reported_tcb_decoded"] == decoded
    else:
        assert r.tcb("reported_tcb") is None


def test_debug_policy_on_s2_only() -> None:
    assert [n for n in REPORTS if parse_snp_report(load(n)).debug] == ["S2-milan-v2.bin"]
    r = parse_snp_report(load("S2-milan-v2.bin"))
    assert r.policy == 0xB0000 and r.report_data == bytes([1, 2, 3, 4, 5]) + bytes(59)


def test_vlek_on_s4_only() -> None:
    keys = {n: parse_snp_report(load(n)).signing_key for n in REPORTS}
    assert keys == {n: (1 if n.startswith("S4") else 0) for n in REPORTS}
    r = parse_snp_report(load("S4-milan-v3.bin"))
    assert r.signing_key_name == "VLEK" and not any(r.chip_id)
    assert (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (0x19, 0x01, 0x01)


def test_turin_sample() -> None:
    r = parse_snp_report(load("S9-turin-v5.bin"))
    assert r.product == "Turin" and (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (0x1A, 0x02, 0x01)
    # FMC0 BL1 TEE0 SNP2 uc71, in the Turin byte order; the Milan layout would read it wrongly
    assert decode_tcb(r.reported_tcb, "Turin") == {"fmc": 0, "bl": 1, "tee": 0, "snp": 2, "ucode": 71}
    assert decode_tcb(r.reported_tcb, "Milan") != decode_tcb(r.reported_tcb, "Turin")
    assert r.platform_info == 0x67 and r.platform_unknown_bits == 0x40  # reserved bit 6: reported, not fatal
    assert r.chip_id[:8].hex() == "3b42092f69c656d3" and not any(r.chip_id[8:])
    assert (r.launch_mit_vector, r.current_mit_vector) == (0, 0)


def test_genoa_v5_mitigation_vectors_and_v2_v3_none() -> None:
    r = parse_snp_report(load("S6-genoa-v5.bin"))
    assert (r.launch_mit_vector, r.current_mit_vector) == (0xB, 0xB)
    v3 = parse_snp_report(load("S7-genoa-v3.bin"))
    assert v3.launch_mit_vector is None and v3.current_mit_vector is None and v3.cpuid_fam_id == 0x19
    v2 = parse_snp_report(load("S1-milan-v2.bin"))
    assert v2.cpuid_fam_id is None and v2.cpuid_mod_id is None and v2.cpuid_step is None and v2.product is None


def test_id_block_fields_on_s3() -> None:
    r = parse_snp_report(load("S3-milan-v2.bin"))
    assert r.guest_svn == 4 and any(r.id_key_digest) and r.policy == 0x3001F
    assert r.current_tcb[7] == 0xCE and r.reported_tcb[7] == 0x73


@pytest.mark.parametrize("name", REPORTS)
def test_to_dict_is_json_and_complete(name: str) -> None:
    r = parse_snp_report(load(name))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["tee"] == "snp" and d["version"] == r.version and d["measurement"] == r.measurement.hex()
    assert d["current_firmware"] == r.current_firmware and d["product"] == r.product
    assert d["signed_region"] == [0, 0x2A0] and d["debug"] == r.debug
    assert set(BYTES_FIELDS) | set(INT_FIELDS) <= set(d)
    text = repr(r)
    assert text.startswith(f"<SnpReport v{r.version} ") and r.measurement.hex()[:16] in text


@pytest.mark.parametrize("name", REPORTS)
def test_evidence_kind_snp(name: str) -> None:
    raw = load(name)
    assert evidence_kind(raw) == "snp"
    assert isinstance(parse_evidence(raw), SnpReport)


def test_evidence_kind_tdx_on_every_tdx_sample(quotes_dir: Path) -> None:
    from agent.quote import Quote

    names = sorted(quotes_dir.glob("*.bin"))
    assert len(names) == 6
    for p in names:
        raw = p.read_bytes()
        assert evidence_kind(raw) == "tdx", p.name
        assert isinstance(parse_evidence(raw), Quote)
