"""Ephemeral mTLS identity for the boot calls: a throw-away key and a self-signed certificate.

The validator only hashes the certificate's SPKI (chutes-protocol.md §2.2), so any key type works;
ECDSA P-256 is used because generating it costs well under a millisecond where RSA-2048 costs tens
to hundreds (measured figures in the issue note). The private key never touches a filesystem: the
PEM goes into an anonymous ``memfd`` that OpenSSL reads through ``/proc/self/fd/N``, and the memfd
is closed (freed) right after the SSL context has loaded it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.evidence.report_data import spki_sha256

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass
class ClientIdentity:
    key: PrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.cert)


def _memfd(name: str, data: bytes | bytearray) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def ssl_context(identity: ClientIdentity | None, ca_bundle: str = "") -> ssl.SSLContext:
    """Client SSLContext presenting ``identity`` (None: no client certificate).

    The server is verified against ``ca_bundle`` only (default: the system bundle file); nothing
    from the environment (``SSL_CERT_FILE``, ``SSL_CERT_DIR``, ``SSLKEYLOGFILE``) is consulted.
    """
    from agent.validator.transport import client_context  # lazy: vm_ca imports this module on the CLI's fast path

    ctx = client_context(ca_bundle)
    if identity is not None:
        load_identity(ctx, identity.key, identity.cert_pem)
    return ctx


def load_identity(ctx: ssl.SSLContext, key: PrivateKey, cert_pem: bytes) -> None:
    """Load a client key + certificate into ``ctx`` through anonymous memfds (never a named file)."""
    key_pem = bytearray(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ))
    key_fd = _memfd("chutes-attest-key", key_pem)
    cert_fd = _memfd("chutes-attest-cert", cert_pem)
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(key_fd)
        os.close(cert_fd)
        key_pem[:] = bytes(len(key_pem))
