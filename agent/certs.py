"""Self-signed X.509 certificates (the boot's mTLS client cert, the service's TLS cert).

Only the key, the subject and the extensions differ between the two; the validator and the proxy
hash the SPKI, so the certificate itself just has to be well-formed and currently valid.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

#: Backdating absorbs clock skew between the VM and its peers right after boot.
BACKDATE = dt.timedelta(minutes=5)


def self_signed(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    common_name: str,
    lifetime: dt.timedelta,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A certificate for ``key``, issued by itself, valid from now - BACKDATE for ``lifetime``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(key, hashes.SHA256())
