"""The C parser on the six real quotes: the expected values from testdata/tdx-quotes/README.md."""

from __future__ import annotations

import json
import mmap

import pytest

from agent.quote import Quote, QuoteError, parse_quote
from tests.quote.builders import SAMPLES, V4_SAMPLE, V5_SAMPLE, as_v5, sample

# (version, body_type, tee_tcb_svn, td_attributes, xfam, mr_td, report_data, tee_tcb_svn2, quote_len, trailing)
EXPECTED = {
    "dcapqvl_tdx_quote_v4.bin": (
        4, 2, "06010300000000000000000000000000", "0000001000000000", "e702060000000000",
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7",
        "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
        "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20", None, 4936, 70),
    "dcapqvl_tdx_quote_outdated_v5.bin": (
        5, 3, "07010300000000000000000000000000", None, None,
        "273828c46252fcbdd8ad2dd907130222b03466d52a2911d70c1a5950895d6bd1ae451d382d5a9b1b4c0ed0e5ae9a3dbd",
        "d2142b643598eb5fae2bc8529dd79a558b29f868ccbb6531cb28dab9dce47728" + "00" * 32,
        "0d010300000000000000000000000000", 5006, 0),
    "gotdxguest_quote_v5_sample.bin": (
        5, 3, "0b010400000000000000000000000000", None, None,
        "7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb001a1ced3ee19747dda8f750c3bc8f876",
        "945eaacf5abc1f719d8666a942fda03d1edcb4490277396093dc5a5289ab9f1e"
        "094aed63060cd4a4933a4dd537ed1255c9c79ecb3ed82cd1b486233e31c25c3a",
        "0d010400000000000000000000000000", 5006, 0),
    "gotdxguest_prod_quote_SPR_E4_v4_trailing_ascii.bin": (
        4, 2, "03000400000000000000000000000000", "0000004000000000", "e71a060000000000",
        "6363b8043668a3ad953278e10389574d326c6749fb78aa810ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb",
        "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545"
        "eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113", None, 4935, 39),
    "trustee_tdx_quote_4_v4_exact.bin": (
        4, 2, "03000500000000000000000000000000", "0100001000000000", "e742060000000000",
        "705ee9381b8633a9fbe532b52345e8433343d2868959f57889d84ca377c395b689cac1599ccea1b7d420483a9ce5f031",
        "7c71fe2c86eff65a7cf8dbc22b3275689fd0464a267baced1bf94fc1324656ae"
        "b755da3d44d098c0c87382f3a5f85b45c8a28fee1d3bdb38342bf96671501429", None, 4936, 0),
    "agentmanifest_gcp_configfs_v4_8000B.bin": (
        4, 2, "0d010800000000000000000000000000", "0000001000000000", "e700060000000000",
        "9bf86e6280ec4282b8b5822d8166410a456cdb720109aa799f0011fa63df1de3ee5e35e293fc410c061433163acb03a6",
        "9ebcfbe5b0724f3d58365a5443893589810117f457539768c9916624f960f6ae" + "00" * 32, None, 4935, 3065),
}
INTEL_QE_VENDOR = "939a7233f79c4ca9940a0db3957f0607"


def test_all_six_samples_present() -> None:
    assert sorted(EXPECTED) == SAMPLES


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_expected_values(name: str) -> None:
    version, btype, svn, attrs, xfam, mr_td, rd, svn2, qlen, trailing = EXPECTED[name]
    raw = sample(name)
    q = parse_quote(raw)
    assert isinstance(q, Quote)
    assert (q.version, q.att_key_type, q.tee_type) == (version, 2, 0x81)
    assert (q.qe_svn, q.pce_svn) == (0, 0)
    assert q.qe_vendor_id.hex() == INTEL_QE_VENDOR
    assert q.body_type == btype and q.body_size == {2: 584, 3: 648}[btype]
    assert q.tee_tcb_svn.hex() == svn
    if attrs is not None:
        assert q.td_attributes.hex() == attrs
        assert q.xfam.hex() == xfam
    assert q.mr_td.hex() == mr_td
    assert q.report_data.hex() == rd
    assert q.rtmr3 == bytes(48)
    if svn2 is None:
        assert q.tee_tcb_svn2 is None and q.mr_service_td is None
    else:
        assert q.tee_tcb_svn2.hex() == svn2 and len(q.mr_service_td) == 48
    assert q.vmid is None and q.td_id is None
    assert (q.quote_len, q.trailing_len) == (qlen, trailing)
    assert q.quote_len + q.trailing_len == len(raw)
    signed_end = 632 if version == 4 else 702
    assert q.signed_region == (0, signed_end) and q.signed_data == raw[:signed_end]
    assert q.raw == raw[:qlen]
    assert q.sig_data_len == qlen - signed_end - 4
    assert (q.cert_data_type, q.pck_cert_chain_type) == (6, 5)
    assert len(q.signature) == 64 and len(q.attestation_key) == 64
    assert q.signature == raw[signed_end + 4:signed_end + 68]
    assert len(q.qe_report) == 384 and len(q.qe_report_signature) == 64
    assert q.qe_auth_data in (bytes(range(32)), bytes(32))
    assert q.qe_report_data == q.qe_report[320:] and q.qe_mr_signer == q.qe_report[128:160]
    assert (q.qe_isv_prod_id, q.qe_cpu_svn, q.qe_attributes) == (2, q.qe_report[:16], q.qe_report[48:64])
    assert 4 <= q.qe_isv_svn <= 8
    assert not q.pck_cert_chain.endswith(b"\x00") and len(q.pck_cert_chain) == 3677
    certs = q.pck_certs
    assert len(certs) == 3 and all(c.startswith(b"-----BEGIN CERTIFICATE-----") for c in certs)
    assert b"".join(certs) == q.pck_cert_chain


def test_debug_flag() -> None:
    debug = {n: parse_quote(sample(n)).debug for n in SAMPLES}
    assert debug == {n: n == "trustee_tdx_quote_4_v4_exact.bin" for n in SAMPLES}


def test_trailing_ascii_is_counted_not_rejected() -> None:
    raw = sample("gotdxguest_prod_quote_SPR_E4_v4_trailing_ascii.bin")
    q = parse_quote(raw)
    assert raw[q.quote_len:] == b"\nextra bytes(only for testing purpose)\n"


def test_to_dict_is_json_hex() -> None:
    q = parse_quote(sample(V5_SAMPLE))
    d = json.loads(json.dumps(q.to_dict()))
    assert d["mr_td"] == q.mr_td.hex() and d["tee_tcb_svn2"] == "0d010400000000000000000000000000"
    assert d["tee_type_hex"] == "0x00000081" and d["signed_region"] == [0, 702]
    assert d["debug"] is False and d["td_id"] is None and len(d["pck_certs"]) == 3
    assert d["qe_auth_data"] == bytes(range(32)).hex() and d["trailing_len"] == 0


def test_buffer_protocol_without_copy() -> None:
    raw = sample(V4_SAMPLE)
    ba = bytearray(raw)
    q = parse_quote(ba)
    with pytest.raises(BufferError):  # the buffer export is held: proof that no copy was taken
        ba.extend(b"x")
    ba[568] ^= 0xFF                   # and attributes are read from the caller's memory
    assert q.report_data[0] == raw[568] ^ 0xFF
    del q
    ba.extend(b"x")                   # released with the Quote
    mv = memoryview(raw)[10:]
    with pytest.raises(QuoteError):
        parse_quote(mv)
    assert parse_quote(memoryview(raw)).mr_td == parse_quote(raw).mr_td
    with mmap.mmap(-1, len(raw)) as m:
        m.write(raw)
        q2 = parse_quote(m)
        assert q2.mr_td.hex().startswith("91eb2b44") and q2.trailing_len == 70
        del q2
    with pytest.raises(TypeError):
        parse_quote("not a buffer")


@pytest.mark.parametrize("body_type", [2, 3, 4])
def test_v5_body_types(body_type: int) -> None:
    raw = as_v5(sample(V4_SAMPLE), body_type)
    q = parse_quote(raw)
    assert (q.version, q.body_type, q.body_size) == (5, body_type, {2: 584, 3: 648, 4: 885}[body_type])
    assert q.mr_td.hex().startswith("91eb2b44d141d4ec") and q.report_data == sample(V4_SAMPLE)[568:632]
    assert q.signed_region == (0, 54 + q.body_size)
    assert (q.tee_tcb_svn2 is None) == (body_type == 2)
    if body_type == 4:
        assert q.vmid == 3 and q.td_id == bytes((i * 7 + 3) & 0xFF for i in range(1, 33))
        assert len(q.cur_servtd_attributes) == 8 and len(q.init_tee_fmspc) == 12
    else:
        assert q.vmid is None and q.dev_info is None


def _err(buf: bytes) -> QuoteError:
    with pytest.raises(QuoteError) as ei:
        parse_quote(buf)
    assert isinstance(ei.value, ValueError)
    return ei.value


def _patch(raw: bytes, off: int, data: bytes) -> bytes:
    return raw[:off] + data + raw[off + len(data):]


@pytest.mark.parametrize(("prefix", "hexbytes"), [(b"\xd8\x3d", "d8 3d"), (b"\xd2\x84", "d2 84")])
def test_cbor_cose_rejected_saying_so(prefix: bytes, hexbytes: str) -> None:
    e = _err(prefix + bytes(9000))
    assert (e.field, e.offset) == ("version", 0)
    assert hexbytes in str(e) and "CBOR/COSE" in str(e)


V4 = sample(V4_SAMPLE)
V5 = sample(V5_SAMPLE)


@pytest.mark.parametrize(("buf", "field", "offset", "words"), [
    (b"", "version", 0, "truncated"),
    (V4[:47], "header", 0, "truncated"),
    (_patch(V4, 0, b"\x03\x00"), "version", 0, "unsupported quote version 3"),
    (_patch(V4, 2, b"\x03\x00"), "att_key_type", 2, "attestation key type 3"),
    (_patch(V4, 4, b"\x00\x00\x00\x00"), "tee_type", 4, "not a TDX quote"),
    (V4[:631], "td_report_body", 48, "needs 584 bytes"),
    (V4[:634], "sig_data_len", 632, "truncated"),
    (_patch(V4, 632, b"\xff\xff\xff\xff"), "sig_data_len", 632, "claims 4294967295 bytes"),
    (_patch(V4, 632, b"\x00\x00\x00\x00"), "signature", 636, "truncated"),
    (_patch(V4, 632, (64).to_bytes(4, "little")), "attestation_key", 700, "truncated"),
    (_patch(V4, 764, b"\x05\x00"), "cert_data_type", 764, "certification data type 5"),
    (_patch(V4, 766, b"\xff\xff\xff\xff"), "cert_data_size", 766, "claims 4294967295"),
    (_patch(V4, 766, b"\x00\x00\x00\x00"), "qe_report", 770, "truncated"),
    (_patch(V4, 1218, b"\xff\xff"), "qe_auth_data_size", 1218, "claims 65535"),
    (_patch(V4, 1252, b"\x07\x00"), "pck_cert_chain_type", 1252, "nested certification data type 7"),
    (_patch(V4, 1254, b"\xff\xff\xff\xff"), "pck_cert_chain_size", 1254, "claims 4294967295"),
    (_patch(V5, 48, b"\x01\x00"), "body_type", 48, "SGX enclave report"),
    (_patch(V5, 48, b"\x09\x00"), "body_type", 48, "unsupported body type 9"),
    (_patch(V5, 50, b"\x48\x02\x00\x00"), "body_size", 50, "requires size 648, got 584"),
    (_patch(V5, 50, b"\xff\xff\xff\xff"), "body_size", 50, "got 4294967295"),
    (V5[:52], "body_size", 50, "truncated"),
])
def test_malformed_names_field_and_offset(buf: bytes, field: str, offset: int, words: str) -> None:
    e = _err(buf)
    assert (e.field, e.offset) == (field, offset)
    assert f"field '{field}' at offset {offset}" in str(e) and words in str(e)


def test_hostile_lengths_never_overread() -> None:
    # a sig_data_len that fits the buffer but nested sizes that point past their containers
    for off, val in ((766, 0xFFFFFFFF), (766, 4166 + 1), (1218, 0xFFFF), (1254, 3678 + 1), (1254, 0x7FFFFFFF)):
        with pytest.raises(QuoteError):
            parse_quote(_patch(V4[:4936], off, val.to_bytes(2 if off == 1218 else 4, "little")))
    # zero-length nested data is structurally fine: no chain, no NUL to strip
    q = parse_quote(_patch(V4[:4936], 1254, b"\x00\x00\x00\x00"))
    assert q.pck_cert_chain == b"" and q.pck_certs == [] and q.quote_len == 4936
