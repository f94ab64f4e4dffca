"""Security review (H10) regressions for the hand-off identity check when the VM root CA carries no
basicConstraints (the ``OPENSSL_CONF=/dev/null`` shape, checked directly rather than by path validation).
That branch must refuse what the path-validation branch refuses: a "CA" whose keyUsage forbids signing
certificates (RFC 5280 §4.2.1.3), the CA certificate served as its own leaf (the CA key would then sit
group-readable for the proxy), and a leaf that does not name ``attestation-service``."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.evidence.service_identity import HandoffIdentityError, load_handoff
from tests.serve.certs_handoff import make_ca, make_leaf, rsa_key

NOW = dt.datetime.now(dt.UTC)
CA_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chutes"),
                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "sek8s"),
                     x509.NameAttribute(NameOID.COMMON_NAME, "sek8s-vm-root-ca")])


def _ku(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _write(tmp: Path, ca: x509.Certificate, leaf: x509.Certificate, key_index: int) -> tuple[str, str, str]:
    cp, kp, cap = tmp / "server.crt", tmp / "server.key", tmp / "ca.crt"
    cap.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cp.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(rsa_key(key_index).private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption()))
    os.chmod(kp, 0o640)
    return str(cp), str(kp), str(cap)


def test_control_the_extensionless_ca_and_reference_leaf_pass(tmp_path: Path) -> None:
    ca = make_ca(rsa_key(0), extensions=False)
    cert = load_handoff(*_write(tmp_path, ca, make_leaf(rsa_key(1), ca, rsa_key(0)), 1))
    assert cert.cert.subject.rfc4514_string() == "CN=attestation-service"


def test_ca_whose_key_usage_forbids_certificate_signing_is_refused(tmp_path: Path) -> None:
    key = rsa_key(0)
    ca = (x509.CertificateBuilder().subject_name(CA_NAME).issuer_name(CA_NAME).public_key(key.public_key())
          .serial_number(7).not_valid_before(NOW - dt.timedelta(minutes=5))
          .not_valid_after(NOW + dt.timedelta(days=30))
          .add_extension(_ku(cert_sign=False), critical=True)
          .sign(key, hashes.SHA256()))
    with pytest.raises(HandoffIdentityError, match="keyCertSign"):
        load_handoff(*_write(tmp_path, ca, make_leaf(rsa_key(1), ca, key), 1))


def test_the_ca_served_as_its_own_leaf_is_refused(tmp_path: Path) -> None:
    ca = make_ca(rsa_key(0), extensions=False)
    with pytest.raises(HandoffIdentityError, match="the VM root CA itself"):
        load_handoff(*_write(tmp_path, ca, ca, 0))


def test_leaf_without_the_service_name_is_refused(tmp_path: Path) -> None:
    ca = make_ca(rsa_key(0), extensions=False)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "something-else")]))
            .issuer_name(ca.subject).public_key(rsa_key(1).public_key()).serial_number(1)
            .not_valid_before(NOW - dt.timedelta(minutes=5)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
            .sign(rsa_key(0), hashes.SHA256()))
    with pytest.raises(HandoffIdentityError, match="attestation-service"):
        load_handoff(*_write(tmp_path, ca, leaf, 1))
