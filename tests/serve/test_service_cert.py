"""The service certificate: created once like attestation-service-init, reused, hashed by SPKI."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.evidence.service_identity import ServiceCertError, load_or_create


def test_created_like_the_init_step_and_reused(tmp_path: Path) -> None:
    cp, kp = tmp_path / "certs" / "server.crt", tmp_path / "certs" / "server.key"
    first = load_or_create(str(cp), str(kp))
    assert kp.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cp.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=attestation-service"
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life > datetime.timedelta(days=36000)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    assert {"attestation-service", "localhost", socket.gethostname()} <= set(dns)
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= ips
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert first.spki_sha256 == hashlib.sha256(spki).digest()
    again = load_or_create(str(cp), str(kp))
    assert again.spki_sha256 == first.spki_sha256 and again.pem == cp.read_text()


def test_mismatched_or_partial_pair_is_an_error(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    load_or_create(str(a / "s.crt"), str(a / "s.key"))
    load_or_create(str(b / "s.crt"), str(b / "s.key"))
    with pytest.raises(ServiceCertError, match="does not match"):
        load_or_create(str(a / "s.crt"), str(b / "s.key"))
    (a / "s.key").unlink()
    with pytest.raises(ServiceCertError, match="service key"):  # never silently replaced
        load_or_create(str(a / "s.crt"), str(a / "s.key"))
    secret = (b / "s.key").read_bytes()
    (b / "s.key").write_bytes(secret[:100])
    with pytest.raises(ServiceCertError) as exc:
        load_or_create(str(b / "s.crt"), str(b / "s.key"))
    assert secret[40:80].decode(errors="ignore") not in str(exc.value)
