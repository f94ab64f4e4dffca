"""SEV-SNP local verification: the eight real reports verify with their real AMD chains, each policy
vector fails exactly its check, tampered copies fail the specific named check, and a report re-signed
under a throwaway AMD-shaped hierarchy verifies when that hierarchy's ARK is trusted explicitly."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import struct
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from agent.errors import BadInputError
from agent.quote import _snpreport, snp_verify
from agent.quote.snp_parser import decode_tcb, parse_snp_report
from agent.quote.snp_verify import (
    AMD_CERT_SHA256,
    CERT_TABLE_GUIDS,
    CHECK_NAMES,
    NO_VEK,
    PRODUCTS,
    SnpCertificateError,
    SnpCertTableError,
    SnpVerifyResult,
    load_amd_cert,
    load_vek,
    parse_cert_table,
    pinned_arks,
    verify_snp_report,
)
from tests.conftest import TESTDATA

pytestmark = pytest.mark.unit

SNP_DIR = TESTDATA / "sev-snp"

#: A time inside every sample certificate's window (the S4 VLEK expires 2025-12-10, the S6 VCEK starts
#: 2025-11-11).
BEFORE_S4_EXPIRY = dt.datetime(2025, 12, 1, tzinfo=dt.UTC)
AFTER_S4_EXPIRY = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Sample:
    sid: str
    product: str
    version: int
    vlek: bool

    @property
    def stem(self) -> str:
        return f"{self.sid}-{self.product.lower()}"

    @property
    def report(self) -> bytes:
        return (SNP_DIR / f"{self.stem}-v{self.version}.bin").read_bytes()

    @property
    def vek(self) -> bytes:
        return (SNP_DIR / f"{self.stem}-{'vlek' if self.vlek else 'vcek'}.der").read_bytes()

    @property
    def chain(self) -> bytes:
        return (SNP_DIR / f"{self.stem}-{'asvk' if self.vlek else 'ask'}-ark.pem").read_bytes()


SAMPLES = {
    s.sid: s
    for s in (
        Sample("S1", "Milan", 2, False), Sample("S2", "Milan", 2, False), Sample("S3", "Milan", 2, False),
        Sample("S4", "Milan", 3, True), Sample("S6", "Genoa", 5, False), Sample("S7", "Genoa", 3, False),
        Sample("S8", "Milan", 3, False), Sample("S9", "Turin", 5, False),
    )
}
#: What each real sample must fail, and nothing else, at BEFORE_S4_EXPIRY.
EXPECTED_FAILURES = {"S1": set(), "S2": {"policy_debug_off"}, "S3": set(), "S4": {"vmpl_zero"}, "S6": set(),
                     "S7": set(), "S8": set(), "S9": set()}


def failed(r: SnpVerifyResult) -> set[str]:
    return {c.name for c in r.failed()}


def names(r: SnpVerifyResult) -> list[str]:
    return [c.name for c in r.checks]


def der(pem_cert: x509.Certificate) -> bytes:
    return pem_cert.public_bytes(Encoding.DER)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def test_sample_files_present() -> None:
    for s in SAMPLES.values():
        assert len(s.report) == 1184, s.sid
        assert s.vek and s.chain


# --- the real samples ------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", sorted(SAMPLES))
@pytest.mark.parametrize("chain_from", ["chain_pem", "packaged"])
def test_real_samples_verify_with_their_chains(sid: str, chain_from: str) -> None:
    s = SAMPLES[sid]
    kwargs = {"chain_pem": s.chain} if chain_from == "chain_pem" else {}
    r = verify_snp_report(s.report, vek=s.vek, now=BEFORE_S4_EXPIRY, **kwargs)
    assert failed(r) == EXPECTED_FAILURES[sid], r.to_dict()
    assert r.ok is (not EXPECTED_FAILURES[sid])
    assert r.product == s.product
    assert r.signing_key == ("VLEK" if s.vlek else "VCEK")
    assert r.vek_source == "argument"
    assert r.chain_source == chain_from
    want = ["report_signature", "ark_pinned", "ark_self_signature", "intermediate_signed_by_ark",
            "vek_signed_by_intermediate", "validity", "tcb_matches_certificate",
            "csp_id_present" if s.vlek else "hwid_matches_chip_id", "signing_key_matches_certificate",
            "policy_debug_off", "vmpl_zero"]
    assert names(r) == want
    assert set(want) <= set(CHECK_NAMES)
    # v2 has no CPUID: the product comes from the VEK; v3+ from the report
    assert r.product_source == ("VEK productName 'Milan-B0'" if s.version == 2 else "report CPUID")
    assert any("not compared with a published launch digest" in n for n in r.not_checked)
    assert any("CRL" in n for n in r.not_checked)
    assert any("minimum" in n for n in r.not_checked)
    assert any(n.startswith("report_data_binding") for n in r.not_checked)
    assert NO_VEK not in r.not_checked


def test_s2_debug_policy_is_the_only_failure() -> None:
    s = SAMPLES["S2"]
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=s.chain)
    assert failed(r) == {"policy_debug_off"}
    assert "0xB0000" in r.check("policy_debug_off").detail and "bit 19" in r.check("policy_debug_off").detail


def test_s4_vlek_chain_before_expiry_fails_only_vmpl() -> None:
    s = SAMPLES["S4"]
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=s.chain, now=BEFORE_S4_EXPIRY)
    assert failed(r) == {"vmpl_zero"}
    assert r.check("vmpl_zero").detail == "VMPL is 1, not 0"
    assert "cc-us-east-2.amazonaws.com" in r.check("csp_id_present").detail
    assert "'SEV-VLEK-Milan' is signed by 'ARK-Milan'" in r.check("intermediate_signed_by_ark").detail
    assert "'SEV-VLEK' is signed by 'SEV-VLEK-Milan'" in r.check("vek_signed_by_intermediate").detail
    assert "ucode=217" in r.check("tcb_matches_certificate").detail  # 2-byte INTEGER in the VLEK


@pytest.mark.parametrize("now", [None, AFTER_S4_EXPIRY])
def test_s4_vlek_expired_fails_validity(now: dt.datetime | None) -> None:
    s = SAMPLES["S4"]
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=s.chain, now=now)
    assert failed(r) == {"vmpl_zero", "validity"}
    detail = r.check("validity").detail
    assert "VLEK 'SEV-VLEK' is outside its validity window" in detail and "2025-12-10" in detail


def test_s9_turin_layout_fmc_and_8_byte_hwid() -> None:
    s = SAMPLES["S9"]
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=s.chain)
    assert r.ok, r.to_dict()
    assert r.product == "Turin"
    tcb = r.check("tcb_matches_certificate").detail
    assert "0001000200000047" in tcb and "Turin layout: fmc=0 bl=1 tee=0 snp=2 ucode=71" in tcb
    assert "8 bytes, Turin" in r.check("hwid_matches_chip_id").detail


def test_s3_current_tcb_differs_from_reported_but_matches_certificate() -> None:
    s = SAMPLES["S3"]
    rep = parse_snp_report(s.report)
    assert rep.current_tcb != rep.reported_tcb
    r = verify_snp_report(rep, vek=s.vek, chain_pem=s.chain)
    assert r.ok, r.to_dict()
    assert "0300000000000873" in r.check("tcb_matches_certificate").detail
    assert "ucode=115" in r.check("tcb_matches_certificate").detail


def test_s8_two_byte_ucode_integer() -> None:
    s = SAMPLES["S8"]
    r = verify_snp_report(s.report, vek=s.vek)
    assert r.ok, r.to_dict()
    assert "ucode=219" in r.check("tcb_matches_certificate").detail


def test_accepts_bytes_bytearray_and_parsed_report() -> None:
    s = SAMPLES["S1"]
    for rep in (s.report, bytearray(s.report), memoryview(s.report), parse_snp_report(s.report),
                _snpreport.SnpReport(s.report)):
        assert verify_snp_report(rep, vek=s.vek).ok
    with pytest.raises(BadInputError):
        verify_snp_report(s.report[:-1], vek=s.vek)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_snp_report(s.report, vek=s.vek, now=dt.datetime(2026, 1, 1))


def test_to_dict_shape() -> None:
    s = SAMPLES["S6"]
    d = verify_snp_report(s.report, vek=s.vek).to_dict()
    assert d["ok"] is True and d["product"] == "Genoa" and d["signing_key"] == "VCEK"
    assert [c["passed"] for c in d["checks"]] == [True] * len(d["checks"])
    assert {"name", "passed", "detail"} == set(d["checks"][0])
    assert isinstance(d["not_checked"], list) and d["not_checked"]


def test_vek_pem_and_der_load_the_same() -> None:
    s = SAMPLES["S1"]
    cert = load_vek(s.vek)
    pem = cert.public_bytes(Encoding.PEM)
    assert der(load_vek(pem)) == s.vek
    assert verify_snp_report(s.report, vek=pem).ok
    with pytest.raises(SnpCertificateError, match="neither DER nor PEM"):
        load_vek(b"not a certificate")
    with pytest.raises(BadInputError):
        verify_snp_report(s.report, vek=b"\x30\x03\x02\x01\x00")
    with pytest.raises(SnpCertificateError, match="chain_pem"):
        verify_snp_report(s.report, vek=s.vek, chain_pem=b"garbage")


# --- tampered copies ------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", sorted(SAMPLES))
def test_flipped_measurement_bit_breaks_report_signature_only(sid: str) -> None:
    s = SAMPLES[sid]
    r = verify_snp_report(flip(s.report, 0x90 + 7, 0x10), vek=s.vek, chain_pem=s.chain, now=BEFORE_S4_EXPIRY)
    assert failed(r) == EXPECTED_FAILURES[sid] | {"report_signature"}
    assert "does not verify" in r.check("report_signature").detail


@pytest.mark.parametrize("offset", [0x04, 0x50, 0x1A0, 0x1E8, 0x2A0, 0x2E8])
def test_flipped_signed_or_signature_byte(offset: int) -> None:
    s = SAMPLES["S8"]
    r = verify_snp_report(flip(s.report, offset), vek=s.vek)
    assert "report_signature" in failed(r)
    # a CHIP_ID change also breaks the hwID binding; nothing else moves
    assert failed(r) <= {"report_signature", "hwid_matches_chip_id"}


def test_wrong_vek_fails_signature_and_hwid() -> None:
    s1, s3 = SAMPLES["S1"], SAMPLES["S3"]
    r = verify_snp_report(s1.report, vek=s3.vek, chain_pem=s1.chain)
    # S3's VCEK has the same TCB as S1 and a real Milan chain: only the key and the chip differ
    assert failed(r) == {"report_signature", "hwid_matches_chip_id"}
    assert "VCEK hwID" in r.check("hwid_matches_chip_id").detail


def test_wrong_vek_kind_fails_signing_key_check() -> None:
    s4, s8 = SAMPLES["S4"], SAMPLES["S8"]
    r = verify_snp_report(s4.report, vek=s8.vek, now=BEFORE_S4_EXPIRY)  # a VLEK report, a VCEK given
    assert {"report_signature", "signing_key_matches_certificate", "vek_signed_by_intermediate",
            "csp_id_present"} <= failed(r)
    assert "VLEK is 'SEV-VCEK', expected 'SEV-VLEK'" in r.check("vek_signed_by_intermediate").detail
    assert "KEY_INFO.SIGNING_KEY is 1 (VLEK)" in r.check("signing_key_matches_certificate").detail


@pytest.mark.parametrize(("sid", "other"), [("S1", "S6"), ("S6", "S8"), ("S9", "S6"), ("S8", "S9")])
def test_wrong_product_chain_fails_ark_and_intermediate(sid: str, other: str) -> None:
    s, o = SAMPLES[sid], SAMPLES[other]
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=o.chain)
    assert failed(r) == {"ark_pinned", "intermediate_signed_by_ark", "vek_signed_by_intermediate"}
    assert f"pinned {o.product} root" in r.check("ark_pinned").detail
    assert f"but the product line is {s.product}" in r.check("ark_pinned").detail
    assert f"expected 'SEV-{s.product}'" in r.check("intermediate_signed_by_ark").detail


def _chain_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def _corrupt_signature(cert: x509.Certificate) -> x509.Certificate:
    raw = bytearray(der(cert))
    raw[-5] ^= 0x01  # inside the signature BIT STRING: still parses
    return x509.load_der_x509_certificate(bytes(raw))


def test_corrupted_ask_signature_fails_intermediate_only() -> None:
    s = SAMPLES["S1"]
    ask, ark = load_amd_cert("Milan", "ask"), load_amd_cert("Milan", "ark")
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=_chain_pem(_corrupt_signature(ask), ark))
    assert failed(r) == {"intermediate_signed_by_ark"}
    assert "is not signed by ARK 'ARK-Milan'" in r.check("intermediate_signed_by_ark").detail


def test_corrupted_ark_fails_pin_and_self_signature() -> None:
    s = SAMPLES["S1"]
    ask, ark = load_amd_cert("Milan", "ask"), load_amd_cert("Milan", "ark")
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=_chain_pem(ask, _corrupt_signature(ark)))
    # the ARK's key is unchanged, so the ASK it signed still verifies under it
    assert failed(r) == {"ark_pinned", "ark_self_signature"}
    assert "not one of AMD's pinned ARKs" in r.check("ark_pinned").detail


def test_corrupted_vek_signature_fails_vek_link_only() -> None:
    s = SAMPLES["S1"]
    bad = flip(s.vek, len(s.vek) - 5)
    r = verify_snp_report(s.report, vek=bad)
    assert failed(r) == {"vek_signed_by_intermediate"}


def test_chain_in_any_order_and_with_extra_certificates() -> None:
    s = SAMPLES["S8"]
    ask, ark, asvk = (load_amd_cert("Milan", k) for k in ("ask", "ark", "asvk"))
    for pem in (_chain_pem(ark, ask), _chain_pem(ask, ark, asvk), _chain_pem(asvk, ark, ask)):
        assert verify_snp_report(s.report, vek=s.vek, chain_pem=pem).ok


# --- report_data binding ----------------------------------------------------------------------------

def _expected_binding(nonce: bytes, spki_der: bytes) -> bytes:
    return nonce + hashlib.sha256(spki_der).digest()


@pytest.mark.parametrize("sid", sorted(SAMPLES))
def test_report_data_binding_fails_on_samples(sid: str) -> None:
    s = SAMPLES[sid]
    spki = load_vek(s.vek).public_key().public_bytes(Encoding.DER, format=PublicFormat.SubjectPublicKeyInfo)
    want = _expected_binding(bytes(range(32)), spki)
    r = verify_snp_report(s.report, vek=s.vek, chain_pem=s.chain, expected_report_data=want,
                          now=BEFORE_S4_EXPIRY)
    assert names(r)[-1] == "report_data_binding"
    assert failed(r) == EXPECTED_FAILURES[sid] | {"report_data_binding"}
    assert want.hex() in r.check("report_data_binding").detail
    assert not any(n.startswith("report_data_binding") for n in r.not_checked)


def test_report_data_binding_passes_on_the_actual_value_and_checks_length() -> None:
    s = SAMPLES["S6"]
    actual = bytes(parse_snp_report(s.report).report_data)
    assert verify_snp_report(s.report, vek=s.vek, expected_report_data=actual).ok
    r = verify_snp_report(s.report, vek=s.vek, expected_report_data=actual[:32])
    assert failed(r) == {"report_data_binding"}
    assert "32 bytes, not 64" in r.check("report_data_binding").detail


# --- without a VEK ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sid", sorted(SAMPLES))
def test_never_ok_without_a_vek(sid: str) -> None:
    s = SAMPLES[sid]
    r = verify_snp_report(s.report, now=BEFORE_S4_EXPIRY)
    assert not r.ok
    assert r.vek_source is None
    kind = "VLEK" if s.vlek else "VCEK"
    assert NO_VEK.replace("VCEK", kind, 1) in r.not_checked
    for name in ("report_signature", "vek_signed_by_intermediate", "tcb_matches_certificate",
                 "signing_key_matches_certificate", "csp_id_present" if s.vlek else "hwid_matches_chip_id"):
        c = r.check(name)
        assert not c.passed and c.detail.startswith("not possible: ") and "nothing is fetched from AMD KDS" in c.detail
    assert not r.check("validity").passed
    if s.version >= 3:
        # the product line is known from CPUID: the packaged ASK/ASVK <- ARK still verify
        assert r.product == s.product
        for name in ("ark_pinned", "ark_self_signature", "intermediate_signed_by_ark"):
            assert r.check(name).passed, r.to_dict()
    else:
        assert r.product is None
        assert "product line undetermined" in r.check("ark_pinned").detail


def test_v2_without_vek_but_with_chain_takes_product_from_the_ark() -> None:
    s = SAMPLES["S1"]
    r = verify_snp_report(s.report, chain_pem=s.chain)
    assert r.product == "Milan" and r.product_source == "supplied ARK 'ARK-Milan'"
    assert r.check("ark_pinned").passed and r.check("intermediate_signed_by_ark").passed
    assert not r.ok


# --- the certificate table (auxblob) -----------------------------------------------------------------

def _guid(kind: str, *, le: bool = False) -> bytes:
    u = uuid.UUID(CERT_TABLE_GUIDS[kind])
    return u.bytes_le if le else u.bytes


def make_table(entries: list[tuple[bytes, bytes]], *, le: bool = False, pad: int = 0) -> bytes:
    """A GHCB certificate table: (GUID bytes, DER) entries, the all-zero terminator, then the blobs."""
    header = _ENTRY * (len(entries) + 1)
    out, body, off = b"", b"", header
    for guid, blob in entries:
        out += guid + struct.pack("<II", off, len(blob))
        body += blob
        off += len(blob)
    return out + bytes(_ENTRY) + body + bytes(pad)


_ENTRY = 24


def raw_table(entries: list[tuple[bytes, int, int]], total: int, terminator: bool = True) -> bytes:
    blob = b"".join(g + struct.pack("<II", o, n) for g, o, n in entries) + (bytes(_ENTRY) if terminator else b"")
    return blob + bytes(max(0, total - len(blob)))


def test_cert_table_parses_by_guid_in_either_byte_order() -> None:
    s = SAMPLES["S1"]
    ask, ark = der(load_amd_cert("Milan", "ask")), der(load_amd_cert("Milan", "ark"))
    for le in (False, True):
        table = make_table([(_guid("ark", le=le), ark), (_guid("vcek", le=le), s.vek), (_guid("ask", le=le), ask)],
                           pad=4096)
        assert parse_cert_table(table) == {"vcek": s.vek, "ask": ask, "ark": ark}


def test_cert_table_empty_and_unknown_guids() -> None:
    assert parse_cert_table(b"") == {}
    assert parse_cert_table(bytes(_ENTRY)) == {}
    other = uuid.UUID("ecae0c0f-0000-0000-0000-0ae2e0d565b6").bytes  # go-sev-guest's ExtraPlatformInfo
    assert parse_cert_table(make_table([(other, b"extra"), (_guid("vlek"), b"\x30\x00")])) == {"vlek": b"\x30\x00"}


def test_cert_table_rejects_precisely() -> None:
    g = _guid("vcek")
    cases: list[tuple[bytes, str, int]] = [
        (raw_table([(g, 48, 10)], 0, terminator=False)[:20],
         "no all-zero terminating entry within the 20-byte table (0 entries read)", 0),
        (raw_table([(g, 48, 10)], 0, terminator=False) + b"\x01" * 16,
         "no all-zero terminating entry within the 40-byte table (1 entries read)", 24),
        (raw_table([(g, 40, 10)], 100), "entry 0 (vcek) offset 40 points into the 48-byte entry list", 16),
        (raw_table([(g, 48, 100)], 100), "entry 0 (vcek) certificate [48, 148) ends past the 100-byte table", 16),
        (raw_table([(g, 48, 0)], 100), "entry 0 (vcek) has length 0", 20),
        (raw_table([(g, 72, 20), (_guid("ask"), 80, 20)], 200),
         "entry 1 (ask) [80, 100) overlaps entry 0 (vcek) [72, 92)", 40),
        (raw_table([(g, 72, 20), (_guid("ask"), 72, 20)], 200),
         "entry 1 (ask) [72, 92) overlaps entry 0 (vcek) [72, 92)", 40),
        (raw_table([(g, 72, 20), (_guid("vcek", le=True), 92, 20)], 200), "entry 1 (vcek) repeats the GUID of entry 0",
         24),
        (raw_table([(g, 2**32 - 1, 2)], 100), "entry 0 (vcek) certificate [4294967295, 4294967297) ends past", 16),
    ]
    for blob, message, offset in cases:
        with pytest.raises(SnpCertTableError) as ei:
            parse_cert_table(blob)
        assert message in str(ei.value), (message, str(ei.value))
        assert ei.value.offset == offset, message
        assert isinstance(ei.value, BadInputError) and isinstance(ei.value, ValueError)
    # verify_snp_report refuses a malformed table the same way
    with pytest.raises(SnpCertTableError):
        verify_snp_report(SAMPLES["S1"].report, cert_table=cases[0][0])


def test_vek_and_chain_from_the_cert_table() -> None:
    s = SAMPLES["S9"]
    ask, ark = der(load_amd_cert("Turin", "ask")), der(load_amd_cert("Turin", "ark"))
    r = verify_snp_report(s.report, cert_table=make_table([(_guid("vcek"), s.vek), (_guid("ask"), ask),
                                                           (_guid("ark"), ark)]))
    assert r.ok, r.to_dict()
    assert r.vek_source == "cert_table" and r.chain_source == "cert_table"
    # the table's VCEK wins over the vek argument (quote.snp_vek_file is the fallback)
    r = verify_snp_report(s.report, vek=SAMPLES["S6"].vek, cert_table=make_table([(_guid("vcek"), s.vek)]))
    assert r.ok and r.vek_source == "cert_table" and r.chain_source == "packaged"
    # the table has no VCEK: the argument is used
    r = verify_snp_report(s.report, vek=s.vek, cert_table=make_table([(_guid("ark"), ark)]))
    assert r.ok and r.vek_source == "argument" and r.chain_source == "cert_table+packaged"


def test_cert_table_entry_under_the_wrong_guid_is_caught_by_its_name() -> None:
    s = SAMPLES["S1"]
    ask = der(load_amd_cert("Milan", "ask"))
    r = verify_snp_report(s.report, cert_table=make_table([(_guid("vcek"), ask)]))
    assert "VCEK is 'SEV-Milan', expected 'SEV-VCEK'" in r.check("vek_signed_by_intermediate").detail
    assert not r.ok


# --- packaged AMD certificates -----------------------------------------------------------------------

_SUBJECT = {"ark": "ARK-{p}", "ask": "SEV-{p}", "asvk": "SEV-VLEK-{p}"}


@pytest.mark.parametrize(("product", "kind"), sorted(AMD_CERT_SHA256))
def test_packaged_certificate_fingerprint(product: str, kind: str) -> None:
    cert = load_amd_cert(product, kind)
    assert hashlib.sha256(der(cert)).hexdigest() == AMD_CERT_SHA256[(product, kind)]
    pem = (resources.files("agent") / "data" / "amd" / f"{product.lower()}-{kind}.pem").read_bytes()
    assert hashlib.sha256(der(x509.load_pem_x509_certificate(pem))).hexdigest() == AMD_CERT_SHA256[(product, kind)]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == _SUBJECT[kind].format(p=product)
    ark = load_amd_cert(product, "ark")
    assert cert.issuer == ark.subject
    ark.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())


def test_packaged_set_is_exactly_the_pinned_set() -> None:
    folder = resources.files("agent") / "data" / "amd"
    pems = sorted(p.name for p in folder.iterdir() if p.name.endswith(".pem"))
    assert pems == sorted(f"{p.lower()}-{k}.pem" for p, k in AMD_CERT_SHA256)
    assert len(AMD_CERT_SHA256) == 3 * len(PRODUCTS)
    assert [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for c in pinned_arks()] == [
        f"ARK-{p}" for p in PRODUCTS]


def test_packaged_file_with_another_fingerprint_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    amd = tmp_path / "data" / "amd"
    amd.mkdir(parents=True)
    # a genuine AMD certificate, but not the one pinned for this slot
    (amd / "milan-ark.pem").write_bytes(load_amd_cert("Genoa", "ark").public_bytes(Encoding.PEM))
    monkeypatch.setattr(snp_verify, "_data_dir", lambda: amd)
    load_amd_cert.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"milan-ark\.pem has fingerprint 4c6598d1.*expected 69d063b4"):
            load_amd_cert("Milan", "ark")
    finally:
        monkeypatch.undo()
        load_amd_cert.cache_clear()
    with pytest.raises(KeyError):
        load_amd_cert("Venice", "ark")


# --- a throwaway AMD-shaped hierarchy (RSA-2048 PSS CAs, P-384 VEK) ------------------------------------

_PSS_PAD = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_AMD = "1.3.6.1.4.1.3704.1."


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ext(suffix: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(_AMD + suffix), value)


def _int_tlv(v: int) -> bytes:
    content = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(content)]) + content


@dataclass(frozen=True)
class Pki:
    ark: x509.Certificate
    ask: x509.Certificate
    vek: x509.Certificate
    vek_key: ec.EllipticCurvePrivateKey

    @property
    def chain_pem(self) -> bytes:
        return _chain_pem(self.ask, self.ark)


@functools.cache
def _ca_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]:
    return (rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048),
            ec.generate_private_key(ec.SECP384R1()))


def make_pki(product: str, tcb: dict[str, int], hwid: bytes | None, *, product_name: str | None = None,
             drop: tuple[str, ...] = ()) -> Pki:
    ark_key, ask_key, vek_key = _ca_keys()
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2040, 1, 1, tzinfo=dt.UTC)

    def base(subject: str, issuer: str, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key)
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end))

    ca = x509.BasicConstraints(ca=True, path_length=None)
    ark = base(f"ARK-{product}", f"ARK-{product}", ark_key.public_key()).add_extension(ca, True) \
        .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS_PAD)
    ask = base(f"SEV-{product}", f"ARK-{product}", ask_key.public_key()) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True) \
        .sign(ark_key, hashes.SHA384(), rsa_padding=_PSS_PAD)
    b = base("SEV-VCEK", f"SEV-{product}", vek_key.public_key())
    exts = {"1": _int_tlv(1 if product == "Turin" else 0),
            "2": b"\x16" + bytes([len(product_name or product)]) + (product_name or product).encode()}
    suffix = {"bl": "3.1", "tee": "3.2", "snp": "3.3", "ucode": "3.8", "fmc": "3.9"}
    for comp, v in tcb.items():
        exts[suffix[comp]] = _int_tlv(v)
    if hwid is not None:
        exts["4"] = hwid
    for key, value in exts.items():
        if key not in drop and not (key == "2" and product_name == ""):
            b = b.add_extension(_ext(key, value), False)
    vek = b.sign(ask_key, hashes.SHA384(), rsa_padding=_PSS_PAD)
    return Pki(ark, ask, vek, vek_key)


def resign(report: bytes, key: ec.EllipticCurvePrivateKey, **fields: tuple[int, bytes]) -> bytes:
    """The report with ``fields`` (offset, bytes) replaced, re-signed with ``key``."""
    raw = bytearray(report)
    for off, value in fields.values():
        raw[off:off + len(value)] = value
    r, s = decode_dss_signature(key.sign(bytes(raw[:0x2A0]), ec.ECDSA(hashes.SHA384())))
    raw[0x2A0:0x2E8] = r.to_bytes(72, "little")
    raw[0x2E8:0x330] = s.to_bytes(72, "little")
    return bytes(raw)


def _sim(sid: str, **kw: object) -> tuple[bytes, Pki]:
    s = SAMPLES[sid]
    rep = parse_snp_report(s.report)
    product = s.product
    tcb = dict(decode_tcb(rep.reported_tcb, product))
    tcb.update(kw.pop("tcb", {}))
    chip = bytes(rep.chip_id)
    hwid = kw.pop("hwid", chip[:8] if product == "Turin" else chip)
    pki = make_pki(product, tcb, hwid, **kw)
    return resign(s.report, pki.vek_key), pki


def test_simulated_hierarchy_verifies_when_its_ark_is_trusted() -> None:
    report, pki = _sim("S8")
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert r.ok, r.to_dict()
    assert "trusted ARK given by the caller" in r.check("ark_pinned").detail
    # the same chain is not AMD's: only the pin fails
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem)
    assert failed(r) == {"ark_pinned"}
    # trusting only AMD's roots explicitly behaves like the default
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=pinned_arks())
    assert failed(r) == {"ark_pinned"}
    # trusting the simulated ARK but no chain: the trusted ARK is used, the packaged ASK does not chain to it
    r = verify_snp_report(report, vek=der(pki.vek), trusted_arks=[pki.ark])
    assert failed(r) == {"intermediate_signed_by_ark", "vek_signed_by_intermediate"}
    assert r.chain_source == "trusted_arks+packaged"


@pytest.mark.parametrize("comp", ["bl", "tee", "snp", "ucode"])
def test_tcb_component_mismatch(comp: str) -> None:
    report, pki = _sim("S8", tcb={comp: 200})
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert failed(r) == {"tcb_matches_certificate"}
    assert f"{comp}: report" in r.check("tcb_matches_certificate").detail
    assert "certificate 200" in r.check("tcb_matches_certificate").detail


def test_turin_tcb_needs_fmc() -> None:
    report, pki = _sim("S9", drop=("3.9",))
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert failed(r) == {"tcb_matches_certificate"}
    assert "fmc: no fmcSPL extension (1.3.6.1.4.1.3704.1.3.9)" in r.check("tcb_matches_certificate").detail
    report, pki = _sim("S9", tcb={"fmc": 3})
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert "fmc: report 0, certificate 3" in r.check("tcb_matches_certificate").detail


def test_hwid_encodings_and_mismatches() -> None:
    s = SAMPLES["S8"]
    chip = bytes(parse_snp_report(s.report).chip_id)
    for hwid, ok, msg in [
        (b"\x04\x40" + chip, True, "64 bytes"),                       # DER OCTET STRING wrapping
        (flip(chip, 63), False, "!= CHIP_ID"),
        (chip[:8], False, "hwID is 8 bytes; expected 64 (or 8 on Turin"),  # 8 bytes only on Turin
        (None, False, "has no hwID extension"),
    ]:
        report, pki = _sim("S8", hwid=hwid)
        r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
        assert r.check("hwid_matches_chip_id").passed is ok, (hwid, r.to_dict())
        assert msg in r.check("hwid_matches_chip_id").detail
        assert failed(r) <= {"hwid_matches_chip_id"}


def test_turin_hwid_rest_of_chip_id_must_be_zero() -> None:
    s = SAMPLES["S9"]
    rep = parse_snp_report(s.report)
    chip = bytearray(rep.chip_id)
    chip[40] = 1
    _, pki = _sim("S9", hwid=bytes(chip[:8]))
    report = resign(s.report, pki.vek_key, chip=(0x1A0, bytes(chip)))
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert failed(r) == {"hwid_matches_chip_id"}
    assert "CHIP_ID[8:64] is not zero" in r.check("hwid_matches_chip_id").detail


def test_masked_chip_id_fails_hwid() -> None:
    s = SAMPLES["S8"]
    _, pki = _sim("S8")
    report = resign(s.report, pki.vek_key, chip=(0x1A0, bytes(64)))
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert failed(r) == {"hwid_matches_chip_id"}
    assert "all zero" in r.check("hwid_matches_chip_id").detail


def test_v2_product_from_supplied_ark_when_the_vek_has_no_product_name() -> None:
    report, pki = _sim("S1", product_name="")
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert r.ok, r.to_dict()
    assert r.product == "Milan" and r.product_source == "supplied ARK 'ARK-Milan'"


def test_v2_bergamo_product_name_maps_to_genoa() -> None:
    report, pki = _sim("S1", product_name="Bergamo")
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    # the sample is Milan-shaped (ARK-Milan): Genoa is chosen from the VEK, so the chain names do not fit
    assert r.product == "Genoa" and r.product_source == "VEK productName 'Bergamo'"
    assert "ark_pinned" in failed(r)


def test_flipped_debug_bit_resigned_fails_policy_only() -> None:
    s = SAMPLES["S8"]
    report, pki = _sim("S8")
    policy = parse_snp_report(s.report).policy | (1 << 19)
    report = resign(report, pki.vek_key, policy=(0x08, struct.pack("<Q", policy)))
    r = verify_snp_report(report, vek=der(pki.vek), chain_pem=pki.chain_pem, trusted_arks=[pki.ark])
    assert failed(r) == {"policy_debug_off"}


def test_cert_table_without_a_vek_is_not_ok_and_says_why() -> None:
    s = SAMPLES["S8"]
    ask, ark = der(load_amd_cert("Milan", "ask")), der(load_amd_cert("Milan", "ark"))
    r = verify_snp_report(s.report, cert_table=make_table([(_guid("ask"), ask), (_guid("ark"), ark)]))
    assert not r.ok and r.vek_source is None and r.chain_source == "cert_table"
    why = ("VCEK not supplied: the host's certificate table has no VCEK entry (it holds: ark, ask) and "
           "quote.snp_vek_file is not set; nothing is fetched from AMD KDS")
    assert why in r.not_checked
    assert r.check("report_signature").detail == f"not possible: {why}"
    assert r.check("intermediate_signed_by_ark").passed
