"""Test builders for the 1.4.0 boot hand-off: a VM root CA and a proxy leaf shaped like setup_vm_tls makes
them (chutes-vm-generations.md §7): leaf RSA-2048, CN/SAN attestation-service, KU keyEncipherment +
dataEncipherment, EKU serverAuth, serial 1, no authority key identifier (``openssl x509 -req`` with an
extfile adds none), key 0640, cert 0640. RSA-2048 CAs here (the real one is RSA-4096) keep the tests fast;
the chain logic does not depend on the size."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEYS: list[rsa.RSAPrivateKey] = []


def rsa_key(i: int) -> rsa.RSAPrivateKey:
    """Key number ``i`` of a small per-process pool (RSA generation is the slow part)."""
    while len(_KEYS) <= i:
        _KEYS.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _KEYS[i]


def make_ca(key: rsa.RSAPrivateKey, *, extensions: bool = True, days: int = 365) -> x509.Certificate:
    """The VM root CA: O=chutes, OU=sek8s, CN=sek8s-vm-root-ca; ``extensions=False`` = no extensions at all,
    as an ``OPENSSL_CONF=/dev/null`` build may leave it."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chutes"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "sek8s"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "sek8s-vm-root-ca")])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days)))
    if extensions:
        b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return b.sign(key, hashes.SHA256())


def make_leaf(leaf_key: rsa.RSAPrivateKey, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey, *,
              not_after: dt.datetime | None = None, eku=ExtendedKeyUsageOID.SERVER_AUTH) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation-service")]))
            .issuer_name(ca.subject).public_key(leaf_key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(days=365))
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("attestation-service"), x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))


@dataclass
class Handoff:
    cert: Path
    key: Path
    ca: Path
    leaf: x509.Certificate


def write_handoff(cert_path: str, key_path: str, ca_path: str, *, ca_extensions: bool = True,
                  key_mode: int = 0o640, signer: int = 0, leaf_key: int = 1, served_key: int | None = None,
                  not_after: dt.datetime | None = None) -> Handoff:
    """Write CA + leaf + key like the boot does. ``signer`` picks the key that signs the leaf (0 = the CA's
    own); ``served_key`` writes a different private key next to the leaf (a mismatched pair)."""
    ca_key = rsa_key(0)
    ca = make_ca(ca_key, extensions=ca_extensions)
    leaf = make_leaf(rsa_key(leaf_key), ca, rsa_key(signer), not_after=not_after)
    cp, kp, cap = Path(cert_path), Path(key_path), Path(ca_path)
    for d, mode in ((cp.parent, 0o750), (cap.parent, 0o700)):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, mode)
    cap.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cp.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    os.chmod(cp, 0o640)
    k = rsa_key(leaf_key if served_key is None else served_key)
    kp.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption()))
    os.chmod(kp, key_mode)
    return Handoff(cp, kp, cap, leaf)
