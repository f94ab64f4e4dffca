"""Signature self-check: passes on every real quote, fails precisely when tampered with, and works
for a quote signed under a throwaway PCK hierarchy when that hierarchy's root is pinned."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import replace

import pytest

from agent.quote import QuoteError, VerifyResult, load_pinned_root, parse_quote, verify_quote
from agent.quote.verify import CHECK_NAMES, INTEL_SGX_ROOT_CA_SHA256
from tests.quote.builders import SAMPLES, V4_SAMPLE, V5_SAMPLE, as_v5, make_pki, rebuild, resign, sample, split

ALL = set(CHECK_NAMES)


def failed(r: VerifyResult) -> set[str]:
    return {c.name for c in r.checks if not c.passed}


def test_pinned_root_is_intel_sgx_root_ca() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(load_pinned_root())
    assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == INTEL_SGX_ROOT_CA_SHA256
    assert cert.subject.rfc4514_string() == "C=US,ST=CA,L=Santa Clara,O=Intel Corporation,CN=Intel SGX Root CA"
    # the same certificate closes every real chain
    for name in SAMPLES:
        assert parse_quote(sample(name)).pck_certs[-1] == load_pinned_root()


@pytest.mark.parametrize("name", SAMPLES)
def test_real_quotes_pass_all_checks(name: str) -> None:
    r = verify_quote(parse_quote(sample(name)))
    assert [c.name for c in r.checks] == list(CHECK_NAMES)
    assert r.ok and not failed(r), r.to_dict()
    d = r.to_dict()
    assert d["ok"] is True and [c["passed"] for c in d["checks"]] == [True] * 4
    assert "Intel SGX PCK Platform CA" in r.check("pck_chain").detail


def test_accepts_bytes_and_rejects_garbage() -> None:
    assert verify_quote(sample(V5_SAMPLE)).ok
    assert verify_quote(bytearray(sample(V4_SAMPLE))).ok
    with pytest.raises(QuoteError):
        verify_quote(b"\x04\x00")


@pytest.mark.parametrize("offset", [0x10, 48, 184, 568, 631])
def test_flipped_signed_byte_breaks_quote_signature_only(offset: int) -> None:
    raw = bytearray(sample(V4_SAMPLE))
    raw[offset] ^= 0x01
    assert failed(verify_quote(bytes(raw))) == {"quote_signature"}


def test_flipped_signature_or_key() -> None:
    q = parse_quote(sample(V5_SAMPLE))
    p = split(sample(V5_SAMPLE))
    bad_sig = rebuild(replace(p, signature=bytes([p.signature[0] ^ 0x80]) + p.signature[1:]))
    assert failed(verify_quote(bad_sig)) == {"quote_signature"}
    not_on_curve = rebuild(replace(p, attestation_key=bytes(64)))
    r = verify_quote(not_on_curve)
    assert failed(r) == {"quote_signature", "qe_report_data_binding"}
    assert q.signed_region == (0, 702)


def test_altered_qe_report() -> None:
    p = split(sample(V4_SAMPLE))
    # a changed non-report_data byte: only the PCK signature over the QE report breaks
    r = verify_quote(rebuild(replace(p, qe_report=p.qe_report[:256] + b"\x09" + p.qe_report[257:])))
    assert failed(r) == {"qe_report_signature"}
    # a changed report_data byte: the signature and the key binding both break
    r = verify_quote(rebuild(replace(p, qe_report=p.qe_report[:383] + b"\x01")))
    assert failed(r) == {"qe_report_signature", "qe_report_data_binding"}
    # different auth data: binding broken, the rest intact
    r = verify_quote(rebuild(replace(p, qe_auth_data=bytes(32))))
    assert failed(r) == {"qe_report_data_binding"}
    assert "!= expected" in r.check("qe_report_data_binding").detail


def _chain_without(raw: bytes, index: int) -> bytes:
    p = split(raw)
    certs = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", p.chain, re.S)
    del certs[index]
    return rebuild(replace(p, chain=b"".join(certs) + b"\x00"))


def test_dropped_intermediate_breaks_chain() -> None:
    r = verify_quote(_chain_without(sample(V4_SAMPLE), 1))
    assert failed(r) == {"pck_chain"}
    assert "not signed by" in r.check("pck_chain").detail


def test_dropped_root_still_anchors_to_pin_but_dropped_leaf_does_not() -> None:
    assert verify_quote(_chain_without(sample(V4_SAMPLE), 2)).ok
    r = verify_quote(_chain_without(sample(V4_SAMPLE), 0))  # platform CA now poses as the leaf
    assert failed(r) == {"qe_report_signature"}


def test_empty_chain_fails_chain_and_qe_checks() -> None:
    p = split(sample(V4_SAMPLE))
    r = verify_quote(rebuild(replace(p, chain=b"")))
    assert failed(r) == {"qe_report_signature", "pck_chain"}
    assert "no PEM certificate" in r.check("pck_chain").detail


def test_foreign_root_rejects_real_quote() -> None:
    pki = make_pki()
    r = verify_quote(sample(V4_SAMPLE), root_ca_pem=pki.root_pem)
    assert failed(r) == {"pck_chain"}
    assert "not the pinned root" in r.check("pck_chain").detail


def test_simulated_pki_quote_verifies_with_its_root_only() -> None:
    pki = make_pki(root_name="Totally Not Intel Root")
    for raw in (sample(V4_SAMPLE), sample(V5_SAMPLE), as_v5(sample(V4_SAMPLE), 2)):
        forged = resign(raw, pki)
        assert verify_quote(forged, root_ca_pem=pki.root_pem).ok
        r = verify_quote(forged)  # against Intel's pin: only the chain check can fail
        assert failed(r) == {"pck_chain"}
        other = make_pki(root_name="Totally Not Intel Root")  # same subject, different key
        assert failed(verify_quote(forged, root_ca_pem=other.root_pem)) == {"pck_chain"}


def test_validity_window() -> None:
    q = parse_quote(sample(V4_SAMPLE))
    past = dt.datetime(2017, 1, 1, tzinfo=dt.UTC)
    r = verify_quote(q, now=past)
    assert failed(r) == {"pck_chain"} and "outside its validity window" in r.check("pck_chain").detail
    assert verify_quote(q, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)).ok
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    pki = make_pki(leaf_not_after=soon)
    forged = resign(sample(V4_SAMPLE), pki)
    assert verify_quote(forged, root_ca_pem=pki.root_pem).ok
    assert failed(verify_quote(forged, root_ca_pem=pki.root_pem, now=soon + dt.timedelta(days=1))) == {"pck_chain"}


def test_non_ca_issuer_rejected() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.quote.builders import SimPki, _cert

    root_k, mid_k, leaf_k = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("R", root_k, "R", root_k, True)
    mid = _cert("M", mid_k, "R", root_k, False)  # not a CA, yet it issues the leaf
    leaf = _cert("L", leaf_k, "M", mid_k, False)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, mid, root))
    pki = SimPki(root.public_bytes(serialization.Encoding.PEM), pem, leaf_k)
    r = verify_quote(resign(sample(V4_SAMPLE), pki), root_ca_pem=pki.root_pem)
    assert failed(r) == {"pck_chain"} and "'M' of certificate 0 is not a CA" in r.check("pck_chain").detail
