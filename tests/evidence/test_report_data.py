"""report_data binding: nonce (32 bytes) ‖ SHA-256(SPKI DER), strict nonce forms, no truncation or padding."""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.evidence.report_data import ReportDataError, build_report_data, parse_nonce, spki_sha256

NONCE_HEX = "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"


def _self_signed(key) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "report-data-test")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module", params=["ec", "rsa"])
def cert(request) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()) if request.param == "ec" else rsa.generate_private_key(65537, 2048)
    return _self_signed(key)


def _openssl_spki_sha256(pem: bytes) -> bytes:
    """What the sek8s/initramfs shell does: openssl x509 -pubkey | openssl pkey -pubin -outform DER | sha256."""
    pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout"], input=pem, capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True,
                         check=True).stdout
    return hashlib.sha256(der).digest()


@pytest.mark.parametrize("value", [NONCE_HEX, NONCE_HEX.upper(), bytes.fromhex(NONCE_HEX)])
def test_parse_nonce_accepts(value) -> None:
    assert parse_nonce(value) == bytes.fromhex(NONCE_HEX)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (NONCE_HEX[:-1], "got 63 characters"),
        (NONCE_HEX + "0", "got 65 characters"),
        (NONCE_HEX * 2, "got 128 characters"),
        ("", "got 0 characters"),
        ("g" + NONCE_HEX[1:], "non-hex"),
        ("0x" + NONCE_HEX[2:], "non-hex"),
        (" " + NONCE_HEX[1:], "non-hex"),
        (bytes(31), "got 31 bytes"),
        (bytes(33), "got 33 bytes"),
        (NONCE_HEX.encode(), "got 64 bytes"),  # hex text passed as bytes is not silently decoded
        (b"", "got 0 bytes"),
        (12345, "got int"),
    ],
)
def test_parse_nonce_rejects(value, needle) -> None:
    with pytest.raises(ReportDataError) as exc:
        parse_nonce(value)
    assert str(exc.value).startswith("nonce:")
    assert needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


@pytest.mark.integration  # runs the openssl command as the initramfs shell does
def test_spki_sha256_matches_openssl_in_every_input_form(cert) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    der = cert.public_bytes(serialization.Encoding.DER)
    expected = _openssl_spki_sha256(pem)
    assert spki_sha256(cert) == expected
    assert spki_sha256(pem) == expected
    assert spki_sha256(der) == expected
    assert spki_sha256(pem.decode()) == expected
    # the hash is of the SPKI, not of the whole certificate
    assert expected != hashlib.sha256(der).digest()


@pytest.mark.parametrize(
    "bad", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_spki_sha256_rejects_garbage(bad) -> None:
    with pytest.raises(ReportDataError, match=r"^certificate:"):
        spki_sha256(bad)


@pytest.mark.integration  # runs the openssl command as the initramfs shell does
def test_build_report_data_layout(cert) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    rd = build_report_data(NONCE_HEX, pem)
    assert len(rd) == 64
    assert rd[:32] == bytes.fromhex(NONCE_HEX)
    assert rd[32:] == _openssl_spki_sha256(pem)
    # the validator compares report_data_hex[0:64] with the nonce and [64:128] with the cert hash
    assert rd.hex()[:64] == NONCE_HEX
    assert build_report_data(bytes.fromhex(NONCE_HEX), cert) == rd


def test_build_report_data_rejects_bad_nonce_before_touching_cert(cert) -> None:
    with pytest.raises(ReportDataError, match=r"^nonce:"):
        build_report_data(NONCE_HEX[:62], cert)
