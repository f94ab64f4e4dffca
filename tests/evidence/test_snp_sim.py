"""The simulated SEV-SNP guest: real v5 reports and an AMD-shaped VCEK <- ASK <- ARK chain that verify only
against the simulated ARK, given explicitly. Layout and signatures are checked here with independent code
(struct offsets of sev-snp.md §1.2, cryptography directly), then with the project's parser and verifier."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID, ObjectIdentifier

from agent.evidence.base import QuoteSource, TeeEvidence
from agent.quote.snp_parser import decode_tcb, parse_snp_report
from agent.quote.snp_verify import parse_cert_table, verify_snp_report
from agent.sim.snp_sim import (
    PRODUCTS,
    SimulatedSnpSource,
    cert_table,
    load_or_create_sim_amd,
    sim_amd_roots,
    sim_kds,
)

RD = bytes(range(64))
PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
AMD = "1.3.6.1.4.1.3704.1."


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir with all three product lines (two RSA-4096 keys each, made once for the module)."""
    d = tmp_path_factory.mktemp("snp-sim")
    for p in PRODUCTS:
        load_or_create_sim_amd(d, p)
    return d


@pytest.fixture(scope="module")
def genoa(state: Path) -> SimulatedSnpSource:
    return SimulatedSnpSource(state)


def ext(cert: x509.Certificate, oid: str) -> bytes:
    value = cert.extensions.get_extension_for_oid(ObjectIdentifier(oid)).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return bytes(value.value)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_report_layout_by_offset(genoa: SimulatedSnpSource) -> None:
    raw = genoa.get_quote(RD)
    assert len(raw) == 1184
    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0)
    vmpl, sig_algo = struct.unpack_from("<II", raw, 0x30)
    platform, key_info = struct.unpack_from("<QI", raw, 0x40)
    assert (version, guest_svn, policy, vmpl, sig_algo, key_info) == (5, 0, 0x30000, 0, 1, 0)
    assert platform == 0x25
    assert raw[0x50:0x90] == RD
    assert raw[0x90:0xC0] == genoa.measurement and len(genoa.measurement) == 48
    assert raw[0x160:0x180] == b"\xff" * 32  # REPORT_ID_MA: no migration agent
    tcb = bytes.fromhex("0a00000000001b58")
    assert raw[0x38:0x40] == raw[0x180:0x188] == raw[0x1E0:0x1E8] == raw[0x1F0:0x1F8] == tcb
    assert raw[0x188:0x18B] == bytes([0x19, 0x11, 0x01])  # Genoa CPUID
    assert raw[0x1A0:0x1E0] == genoa.chip_id and any(genoa.chip_id)
    assert raw[0x1E8:0x1EB] == bytes([49, 55, 1])  # firmware 1.55.49 (build, minor, major)
    assert not any(raw[0x330:])  # the signature's reserved tail


def test_signature_verifies_with_the_vcek_independently(genoa: SimulatedSnpSource) -> None:
    raw = genoa.get_quote(RD)
    vcek = x509.load_der_x509_certificate(genoa.vcek_der)
    key = vcek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    key.verify(encode_dss_signature(r, s), raw[:0x2A0], ec.ECDSA(hashes.SHA384()))
    tampered = bytearray(raw)
    tampered[0x50] ^= 1
    with pytest.raises(InvalidSignature):
        key.verify(encode_dss_signature(r, s), bytes(tampered[:0x2A0]), ec.ECDSA(hashes.SHA384()))


def test_parser_reads_it(genoa: SimulatedSnpSource) -> None:
    r = parse_snp_report(genoa.get_quote(RD))
    assert (r.version, r.policy, r.vmpl, r.signature_algo, r.key_info, r.signing_key) == (5, 0x30000, 0, 1, 0, 0)
    assert (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step, r.product) == (0x19, 0x11, 0x01, "Genoa")
    assert r.report_data == RD and r.chip_id == genoa.chip_id and r.debug is False
    assert r.current_firmware == "1.55.49"


def test_identity_is_stable_per_state_dir(state: Path, genoa: SimulatedSnpSource, tmp_path: Path) -> None:
    again = SimulatedSnpSource(state)
    assert (again.chip_id, again.measurement, again.vcek_der) == (genoa.chip_id, genoa.measurement, genoa.vcek_der)
    other = SimulatedSnpSource(tmp_path / "other")
    assert other.chip_id != genoa.chip_id and other.measurement != genoa.measurement


def test_chain_has_amds_shape_and_says_simulated(state: Path) -> None:
    chain = load_or_create_sim_amd(state, "Genoa")
    ark, ask, vcek = chain.ark, chain.ask, chain.vcek
    assert [cn(c) for c in (ark, ask, vcek)] == ["ARK-Genoa", "SEV-Genoa", "SEV-VCEK"]
    for c in (ark, ask, vcek):
        org = c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
        unit = c.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
        assert "SIMULATED" in str(org) and "SIMULATED" in str(unit) and "not Advanced Micro Devices" in str(org)
        assert c.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
        assert isinstance(c.signature_hash_algorithm, hashes.SHA384)
    assert ark.subject == ark.issuer and ask.issuer == ark.subject and vcek.issuer == ask.subject
    for child, parent in ((ark, ark), (ask, ark), (vcek, ask)):
        pub = parent.public_key()
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 4096
        pub.verify(child.signature, child.tbs_certificate_bytes, PSS48, hashes.SHA384())  # salt exactly 48
    assert ark.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    bc = ask.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    # the VCEK: serial 1 (AMD: 0, which cryptography cannot build), AMD's extensions only
    assert vcek.serial_number == 1
    assert all(e.oid.dotted_string.startswith(AMD) for e in vcek.extensions)
    assert (vcek.not_valid_after_utc - vcek.not_valid_before_utc).days >= 7 * 365


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_vcek_extensions_match_the_report(state: Path, product: str) -> None:
    src = SimulatedSnpSource(state, product)
    r = parse_snp_report(src.get_quote(RD))
    vcek = x509.load_der_x509_certificate(src.vcek_der)
    spec = PRODUCTS[product]
    assert r.product == product and (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == spec.cpuid
    assert ext(vcek, AMD + "1") == bytes([0x02, 0x01, 1 if product == "Turin" else 0])  # structVersion
    name = spec.product_name.encode()
    assert ext(vcek, AMD + "2") == bytes([0x16, len(name)]) + name  # productName, IA5String
    tcb = decode_tcb(r.reported_tcb, product)
    oids = {"bl": "3.1", "tee": "3.2", "snp": "3.3", "ucode": "3.8", "fmc": "3.9"}
    for comp, value in tcb.items():
        der = ext(vcek, AMD + oids[comp])
        assert der[0] == 0x02 and int.from_bytes(der[2:], "big") == value, comp
    if product == "Milan":
        assert ext(vcek, AMD + "3.8") == bytes.fromhex("020200db")  # ucodeSPL 219: two content bytes
    hwid = ext(vcek, AMD + "4")  # raw, no DER tag
    if product == "Turin":
        assert "fmc" in tcb and len(hwid) == 8 and hwid == r.chip_id[:8] and not any(r.chip_id[8:])
    else:
        assert len(hwid) == 64 and hwid == r.chip_id


@pytest.mark.parametrize("product", list(PRODUCTS))
def test_verifies_against_the_simulated_ark_only(state: Path, product: str) -> None:
    src = SimulatedSnpSource(state, product)
    rd = os.urandom(64)
    raw = src.get_quote(rd)
    ok = verify_snp_report(raw, vek=src.vcek_der, chain_pem=src.chain_pem, trusted_arks=sim_amd_roots(state),
                           expected_report_data=rd)
    assert ok.ok, [(c.name, c.detail) for c in ok.failed()]
    assert ok.product == product and ok.check("ark_pinned").passed
    # the default: AMD's pinned ARKs; the simulated root is not one of them
    pinned = verify_snp_report(raw, vek=src.vcek_der, chain_pem=src.chain_pem, expected_report_data=rd)
    assert not pinned.ok
    assert not pinned.check("ark_pinned").passed and "not one of AMD's pinned ARKs" in pinned.check("ark_pinned").detail
    # and without the simulated chain, AMD's packaged ASK did not sign the simulated VCEK
    packaged = verify_snp_report(raw, vek=src.vcek_der)
    assert not packaged.ok and not packaged.check("vek_signed_by_intermediate").passed


def test_cert_table_verifies_on_its_own(state: Path, genoa: SimulatedSnpSource) -> None:
    ev = SimulatedSnpSource(state, with_cert_table=True).get_evidence(RD)
    assert isinstance(ev, TeeEvidence) and ev.tee == "snp" and ev.aux == genoa.cert_table
    res = verify_snp_report(ev.raw, cert_table=ev.aux, trusted_arks=sim_amd_roots(state, ["Genoa"]))
    assert res.ok and res.vek_source == "cert_table" and res.chain_source == "cert_table"
    assert genoa.get_evidence(RD).aux == b""  # the default: an empty table, like upstream KVM


def test_cert_table_layout(genoa: SimulatedSnpSource) -> None:
    chain = genoa.chain
    blob = cert_table(chain.vcek_der, chain.ask_der, chain.ark_der)
    guids = ["63da758d-e664-4564-adc5-f4b93be8accd", "4ab7b379-bbac-4fe4-a02f-05aef327c782",
             "c0b406a4-a803-4952-9743-3fb6014cd0ae"]
    ders = [chain.vcek_der, chain.ask_der, chain.ark_der]
    for i, (g, der) in enumerate(zip(guids, ders, strict=True)):
        guid, off, length = blob[24 * i:24 * i + 16], *struct.unpack_from("<II", blob, 24 * i + 16)
        assert guid == uuid.UUID(g).bytes  # RFC 4122 byte order
        assert off >= 96 and blob[off:off + length] == der
    assert blob[72:96] == bytes(24)  # the all-zero terminator
    assert len(blob) == 96 + sum(map(len, ders))
    assert parse_cert_table(blob) == {"vcek": chain.vcek_der, "ask": chain.ask_der, "ark": chain.ark_der}
    assert parse_cert_table(cert_table(chain.vcek_der, vlek=True)) == {"vlek": chain.vcek_der}


def test_debug_policy_and_custom_measurement(state: Path) -> None:
    m = hashlib.sha384(b"other image").digest()
    src = SimulatedSnpSource(state, measurement=m, debug=True)
    r = parse_snp_report(src.get_quote(RD))
    assert r.debug and r.policy == 0x30000 | 1 << 19 and r.measurement == m
    res = verify_snp_report(r, vek=src.vcek_der, chain_pem=src.chain_pem, trusted_arks=src.arks)
    assert [c.name for c in res.failed()] == ["policy_debug_off"]
    with pytest.raises(ValueError, match="measurement"):
        SimulatedSnpSource(state, measurement=b"short")
    with pytest.raises(ValueError, match="product"):
        SimulatedSnpSource(state, "Venice")


def test_vmpl_and_input_checks(genoa: SimulatedSnpSource) -> None:
    assert parse_snp_report(genoa.report(RD, vmpl=2)).vmpl == 2
    for bad in (b"", bytes(63), bytes(65)):
        with pytest.raises(ValueError, match="report_data"):
            genoa.get_quote(bad)
    with pytest.raises(ValueError, match="vmpl"):
        genoa.report(RD, vmpl=4)


def test_is_a_quote_source(genoa: SimulatedSnpSource) -> None:
    assert isinstance(genoa, QuoteSource) and genoa.tee == "snp" and genoa.name == "simulated"


def test_state_persisted_keys_0600(tmp_path: Path) -> None:
    d = tmp_path / "st"
    a = sim_amd_roots(d)  # nothing there yet: Genoa's is made
    assert [cn(c) for c in a] == ["ARK-Genoa"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    files = sorted(p.name for p in d.iterdir())
    assert files == ["sim-amd-genoa-ark.key", "sim-amd-genoa-ark.pem", "sim-amd-genoa-ask.key",
                     "sim-amd-genoa-ask.pem", "sim-amd-genoa-vcek.key", "sim-amd-genoa-vcek.pem", "sim-amd.lock",
                     "sim-snp-seed"]
    for name in files:
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    b = sim_amd_roots(d)
    der = serialization.Encoding.DER
    assert [c.public_bytes(der) for c in a] == [c.public_bytes(der) for c in b]  # made once


def test_sim_kds(state: Path, genoa: SimulatedSnpSource) -> None:
    kds = sim_kds(state)
    assert len(kds.arks) == 3 and sorted(cn(a) for a in kds.arks) == ["ARK-Genoa", "ARK-Milan", "ARK-Turin"]
    assert kds.veks[genoa.chip_id.hex()] == genoa.vcek_der and len(kds.veks) == 3
    assert kds.measurement == genoa.measurement
    assert len(x509.load_pem_x509_certificates(kds.chain_pem)) == 6
    one = sim_kds(state, ["Genoa"])
    assert list(one.veks) == [genoa.chip_id.hex()] and one.chain_pem == genoa.chain_pem
