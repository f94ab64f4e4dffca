"""The SEV-SNP C extension: every rejection by field and offset, buffer handling, CPython conventions, and a
property test that no byte mutation crashes it or slips past the rules of docs/reference/sev-snp.md section 1."""

from __future__ import annotations

import gc
import importlib.util
import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import BadInputError
from agent.quote import SnpReport, SnpReportError, evidence_kind, parse_evidence, parse_snp_report
from agent.quote import _snpreport as ext
from agent.quote.snp_parser import BYTES_FIELDS, INT_FIELDS, REPORT_SIZE, SIGNED_SIZE
from tests.quote.test_snp_parse_samples import SNP_DIR, model

V2 = (SNP_DIR / "S1-milan-v2.bin").read_bytes()
V3 = (SNP_DIR / "S8-milan-v3.bin").read_bytes()
V5 = (SNP_DIR / "S6-genoa-v5.bin").read_bytes()
TURIN = (SNP_DIR / "S9-turin-v5.bin").read_bytes()


def with_u32(raw: bytes, off: int, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<I", b, off, value)
    return bytes(b)


def with_u64(raw: bytes, off: int, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<Q", b, off, value)
    return bytes(b)


def with_byte(raw: bytes, off: int, value: int = 0x5A) -> bytes:
    b = bytearray(raw)
    b[off] = value
    return bytes(b)


def rejected(raw: object) -> SnpReportError:
    with pytest.raises(SnpReportError) as exc:
        parse_snp_report(raw)  # type: ignore[arg-type]
    return exc.value


# --- length, version, algorithm, key info, policy -----------------------------------------------------------

@pytest.mark.parametrize("n", [0, 4, 1183, 1185, 2 * 1184])
def test_length_must_be_exactly_1184(n: int) -> None:
    data = (V5 * 2)[:n]
    err = rejected(data)
    assert (err.field, err.offset) == ("report", 0)
    assert str(err) == f"field 'report' at offset 0x000: length {n} bytes, an SEV-SNP report is exactly 1184 bytes"


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_version_outside_2_to_5(version: int) -> None:
    err = rejected(with_u32(V5, 0, version))
    assert (err.field, err.offset) == ("version", 0)
    assert f"unsupported report version {version} (expected 2 to 5)" in str(err)


def test_version_4_is_laid_out_like_3() -> None:
    r = parse_snp_report(with_u32(V3, 0, 4))
    assert r.version == 4 and r.cpuid_fam_id == 0x19 and r.launch_mit_vector is None and r.product == "Milan"


@pytest.mark.parametrize("algo", [0, 2, 0x100])
def test_signature_algo_must_be_1(algo: int) -> None:
    err = rejected(with_u32(V5, 0x34, algo))
    assert (err.field, err.offset) == ("signature_algo", 0x34)
    assert f"signature algorithm {algo}, expected 1" in str(err)


def test_signing_key_7_is_an_unsigned_report() -> None:
    err = rejected(with_u32(V5, 0x48, 7 << 2))
    assert (err.field, err.offset) == ("key_info", 0x48)
    assert "SIGNING_KEY 7: the report is unsigned" in str(err)


@pytest.mark.parametrize("key", [2, 3, 4, 5, 6])
def test_reserved_signing_keys(key: int) -> None:
    err = rejected(with_u32(V5, 0x48, key << 2))
    assert (err.field, err.offset) == ("key_info", 0x48)
    assert f"SIGNING_KEY {key} is reserved" in str(err)


@pytest.mark.parametrize("bit", [5, 8, 31])
def test_key_info_reserved_bits(bit: int) -> None:
    err = rejected(with_u32(V5, 0x48, 1 << bit))
    assert (err.field, err.offset) == ("key_info", 0x48) and "reserved bits 31:5" in str(err)


def test_key_info_low_bits_and_vlek_accepted() -> None:
    r = parse_snp_report(with_u32(V5, 0x48, 0b111))  # AUTHOR_KEY_EN, MASK_CHIP_KEY, SIGNING_KEY 1
    assert r.key_info == 7 and r.signing_key == 1 and r.signing_key_name == "VLEK"


def test_policy_bit_17_must_be_set() -> None:
    err = rejected(with_u64(V5, 8, 0x30000 & ~(1 << 17)))
    assert (err.field, err.offset) == ("policy", 8) and "reserved bit 17 clear" in str(err)


@pytest.mark.parametrize("bit", [26, 27, 32, 47, 63])
def test_policy_bits_63_26_must_be_zero(bit: int) -> None:
    err = rejected(with_u64(V5, 8, 0x30000 | (1 << bit)))
    assert (err.field, err.offset) == ("policy", 8) and "reserved bits 63:26 set" in str(err)


def test_policy_known_bits_accepted_and_debug_is_bit_19() -> None:
    r = parse_snp_report(with_u64(V5, 8, (1 << 26) - 1))
    assert r.policy == (1 << 26) - 1 and r.debug is True
    assert parse_snp_report(with_u64(V5, 8, 0x30000 | (1 << 3))).debug is False


# --- must-be-zero ranges per version -----------------------------------------------------------------------

# (sample, field, first, last): each range is checked at its first and last byte.
MBZ = [
    (V2, "reserved_04c", 0x04C, 0x04F), (V3, "reserved_04c", 0x04C, 0x04F), (V5, "reserved_04c", 0x04C, 0x04F),
    (V2, "reserved_188", 0x188, 0x19F),
    (V3, "reserved_18b", 0x18B, 0x19F), (V5, "reserved_18b", 0x18B, 0x19F),
    (V2, "reserved_1eb", 0x1EB, 0x1EB), (V3, "reserved_1eb", 0x1EB, 0x1EB), (V5, "reserved_1eb", 0x1EB, 0x1EB),
    (V2, "reserved_1ef", 0x1EF, 0x1EF), (V3, "reserved_1ef", 0x1EF, 0x1EF), (V5, "reserved_1ef", 0x1EF, 0x1EF),
    (V2, "reserved_1f8", 0x1F8, 0x29F), (V3, "reserved_1f8", 0x1F8, 0x29F),
    (with_u32(V3, 0, 4), "reserved_1f8", 0x1F8, 0x29F),
    (V5, "reserved_208", 0x208, 0x29F),
    (V2, "signature_reserved", 0x330, 0x49F), (V5, "signature_reserved", 0x330, 0x49F),
]


@pytest.mark.parametrize(("base", "field", "first", "last"), MBZ,
                         ids=[f"v{b[0]}-{f}-{a:03x}" for b, f, a, _ in MBZ])
@pytest.mark.parametrize("where", ["first", "last"])
def test_reserved_range_must_be_zero(base: bytes, field: str, first: int, last: int, where: str) -> None:
    off = first if where == "first" else last
    err = rejected(with_byte(base, off))
    assert (err.field, err.offset) == (field, off)
    assert str(err) == (f"field '{field}' at offset 0x{off:03x}: reserved bytes 0x{first:03x}-0x{last:03x} "
                        f"must be zero (byte 0x5a at 0x{off:03x})")


def test_the_same_bytes_are_fields_in_later_versions() -> None:
    # 0x188-0x18A: CPUID from v3 on; 0x1F8-0x207: mitigation vectors in v5
    r3 = parse_snp_report(with_byte(V3, 0x18A, 0x7F))
    assert r3.cpuid_step == 0x7F
    r5 = parse_snp_report(with_u64(with_u64(V5, 0x1F8, 0x1122334455667788), 0x200, 2**64 - 1))
    assert (r5.launch_mit_vector, r5.current_mit_vector) == (0x1122334455667788, 2**64 - 1)


def test_unknown_platform_bits_are_reported_not_fatal() -> None:
    r = parse_snp_report(with_u64(V5, 0x40, 0x25 | (1 << 6) | (1 << 40)))
    assert r.platform_unknown_bits == (1 << 6) | (1 << 40)
    assert parse_snp_report(with_u64(V5, 0x40, 0xBF)).platform_unknown_bits == 0


@pytest.mark.parametrize(("fam", "mod", "product"), [
    (0x19, 0x00, "Milan"), (0x19, 0x01, "Milan"), (0x19, 0x0F, "Milan"), (0x19, 0x10, "Genoa"), (0x19, 0x11, "Genoa"),
    (0x19, 0x1F, "Genoa"), (0x19, 0xA0, "Genoa"), (0x19, 0xAF, "Genoa"), (0x19, 0x20, None), (0x19, 0x9F, None),
    (0x1A, 0x00, "Turin"), (0x1A, 0x02, "Turin"), (0x1A, 0x11, "Turin"), (0x1A, 0x12, None), (0x1A, 0x50, None),
    (0x17, 0x31, None), (0x00, 0x00, None),
])
def test_product_from_cpuid(fam: int, mod: int, product: str | None) -> None:
    r = parse_snp_report(with_byte(with_byte(V5, 0x188, fam), 0x189, mod))
    assert r.product == product
    if product is None:
        assert r.tcb() is None and r.to_dict()["reported_tcb_decoded"] is None


# --- the error type ----------------------------------------------------------------------------------------

def test_error_is_bad_input_and_value_error() -> None:
    err = rejected(b"")
    assert isinstance(err, BadInputError) and isinstance(err, ValueError)
    assert err.exit_code == 4 and err.reason == "bad_input"
    assert SnpReportError is ext.SnpReportError and SnpReportError.__module__ == "agent.quote._snpreport"


# --- buffers -----------------------------------------------------------------------------------------------

def test_bytearray_memoryview_and_mmap_inputs() -> None:
    ref = parse_snp_report(TURIN).to_dict()
    assert parse_snp_report(bytearray(TURIN)).to_dict() == ref
    assert parse_snp_report(memoryview(TURIN)).to_dict() == ref
    assert parse_snp_report(memoryview(b"xx" + TURIN + b"yy")[2:-2]).to_dict() == ref
    with mmap.mmap(-1, len(TURIN)) as mm:
        mm.write(TURIN)
        r = parse_snp_report(mm)
        assert r.to_dict() == ref
        del r
        gc.collect()


def test_non_contiguous_and_non_buffer_inputs_are_refused() -> None:
    with pytest.raises(BufferError):
        parse_snp_report(memoryview(TURIN * 2)[::2])
    with pytest.raises(TypeError):
        parse_snp_report("x" * 1184)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SnpReport(TURIN, TURIN)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SnpReport(buffer=TURIN)  # type: ignore[call-arg]


def test_buffer_is_held_not_copied() -> None:
    buf = bytearray(V5)
    r = parse_snp_report(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the export pins the size
    buf[0x90] ^= 0xFF  # the bytes are read from the caller's buffer on access
    assert r.measurement[0] == V5[0x90] ^ 0xFF
    del r
    gc.collect()
    buf.extend(b"x")
    assert len(buf) == 1185


def test_rejected_input_releases_the_buffer() -> None:
    buf = bytearray(with_u32(V5, 0, 9))
    rejected(buf)
    buf.extend(b"x")  # no export left behind


# --- CPython conventions, tables defined once ----------------------------------------------------------------

def test_field_tables_come_from_the_extension_and_match_the_getters() -> None:
    assert BYTES_FIELDS is ext.BYTES_FIELDS and INT_FIELDS is ext.INT_FIELDS
    assert (REPORT_SIZE, SIGNED_SIZE) == (1184, 0x2A0)
    assert len(BYTES_FIELDS) == 16 and len(INT_FIELDS) == 18
    getters = {n for n, v in vars(ext.SnpReport).items() if type(v).__name__ == "getset_descriptor"}
    assert set(BYTES_FIELDS) | set(INT_FIELDS) | {"signed_data", "raw", "debug", "signing_key",
                                                   "platform_unknown_bits", "product"} == getters
    r = parse_snp_report(V5)
    for name in BYTES_FIELDS:
        assert isinstance(getattr(r, name), bytes), name
    for name in INT_FIELDS:
        assert isinstance(getattr(r, name), int), name


def test_report_is_an_immutable_heap_type_with_gc_and_a_python_subclass() -> None:
    t = ext.SnpReport
    assert t.__flags__ & (1 << 9) and t.__flags__ & (1 << 14)  # HEAPTYPE, HAVE_GC
    with pytest.raises(TypeError):
        t.version = 1
    r = parse_snp_report(V5)
    assert type(r) is SnpReport and isinstance(r, t)
    with pytest.raises(AttributeError):
        r.version = 3
    with pytest.raises(AttributeError):
        r.extra = 1  # type: ignore[attr-defined]


def test_a_second_module_instance_has_its_own_type_and_exception() -> None:
    spec = importlib.util.find_spec("agent.quote._snpreport")
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other.SnpReport is not ext.SnpReport and other.SnpReportError is not ext.SnpReportError
    with pytest.raises(other.SnpReportError):
        other.SnpReport(b"")
    assert other.SnpReport(V5).version == 5


def test_cycle_through_the_buffer_is_collected() -> None:
    class Holder(bytearray):
        pass

    h = Holder(V5)
    h.report = parse_snp_report(h)  # type: ignore[attr-defined]
    del h
    gc.collect()  # must neither leak nor crash


# --- kind detection ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"", b"abc", bytes(8), bytes(1184), with_u32(V5, 0, 6), V5[:-1], V5 + b"\0",
    b"\x04\x00\x02\x00\x82\x00\x00\x00" + bytes(100), b"\x03\x00\x02\x00\x81\x00\x00\x00" + bytes(100),
    b"\x04\x00\x03\x00\x81\x00\x00\x00" + bytes(100), b"\x04\x00\x02\x00\x81\x00",
])
def test_evidence_kind_on_garbage_names_both_readings(data: bytes) -> None:
    with pytest.raises(BadInputError) as exc:
        evidence_kind(data)
    text = str(exc.value)
    assert "not an SEV-SNP report" in text and "not a TDX quote" in text and f"({len(data)} bytes)" in text
    assert exc.value.reason == "unknown_evidence"
    with pytest.raises(BadInputError):
        parse_evidence(data)


def test_evidence_kind_accepts_buffers() -> None:
    assert evidence_kind(memoryview(V5)) == "snp" and evidence_kind(bytearray(V2)) == "snp"


def test_snp_shaped_but_malformed_is_an_snp_error_from_parse_evidence() -> None:
    with pytest.raises(SnpReportError) as exc:
        parse_evidence(with_u32(V5, 0x34, 2))
    assert exc.value.field == "signature_algo"


# --- property: any single-byte (or few-byte) mutation parses or raises SnpReportError ------------------------

_MBZ_RANGES = {2: [(0x4C, 0x50), (0x188, 0x1A0), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x1F8, 0x2A0), (0x330, 0x4A0)],
               3: [(0x4C, 0x50), (0x18B, 0x1A0), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x1F8, 0x2A0), (0x330, 0x4A0)],
               5: [(0x4C, 0x50), (0x18B, 0x1A0), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x208, 0x2A0), (0x330, 0x4A0)]}
_MBZ_RANGES[4] = _MBZ_RANGES[3]


def model_valid(raw: bytes) -> bool:
    """The acceptance rules of section 1.10, restated independently of the C code."""
    if len(raw) != 1184:
        return False
    version, = struct.unpack_from("<I", raw, 0)
    policy, = struct.unpack_from("<Q", raw, 8)
    algo, = struct.unpack_from("<I", raw, 0x34)
    key_info, = struct.unpack_from("<I", raw, 0x48)
    return (2 <= version <= 5 and algo == 1 and key_info >> 5 == 0 and (key_info >> 2) & 7 in (0, 1)
            and policy >> 17 & 1 == 1 and policy >> 26 == 0
            and all(not any(raw[a:b]) for a, b in _MBZ_RANGES[version]))


SEEDS = [V2, V3, V5, TURIN]


@settings(max_examples=400, deadline=None)
@given(seed=st.sampled_from(SEEDS),
       edits=st.lists(st.tuples(st.integers(0, 1183), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutating_bytes_never_crashes_and_matches_the_model(seed: bytes, edits: list[tuple[int, int]]) -> None:
    b = bytearray(seed)
    for off, value in edits:
        b[off] = value
    raw = bytes(b)
    try:
        r = parse_snp_report(raw)
    except SnpReportError as exc:
        assert not model_valid(raw)
        assert isinstance(exc.field, str) and 0 <= exc.offset < 1184
        return
    assert model_valid(raw)
    m = model(raw)
    for key, value in m.items():
        assert getattr(r, key) == value, key
    assert r.debug is bool(r.policy >> 19 & 1) and r.signing_key == (r.key_info >> 2) & 7
    assert r.platform_unknown_bits == r.platform_info & ~0xBF
    r.to_dict()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=1300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        parse_snp_report(data)
    except SnpReportError:
        pass
    try:
        evidence_kind(data)
    except BadInputError:
        pass


def test_type_stub_lists_every_getter() -> None:
    import ast
    from pathlib import Path

    stub = ast.parse(Path(ext.__file__).with_name("_snpreport.pyi").read_text())
    cls = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "SnpReport")
    annotated = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    getters = {n for n, v in vars(ext.SnpReport).items() if type(v).__name__ == "getset_descriptor"}
    assert annotated == getters
