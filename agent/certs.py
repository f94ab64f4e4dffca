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


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def name(common_name: str, organization: str = "", unit: str = "") -> x509.Name:
    """``O=…, OU=…, CN=…`` in that order (as ``openssl req -subj /O=…/OU=…/CN=…`` writes it), empty parts left out."""
    attrs = [
        x509.NameAttribute(oid, value)
        for oid, value in ((NameOID.ORGANIZATION_NAME, organization), (NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                           (NameOID.COMMON_NAME, common_name))
        if value
    ]
    return x509.Name(attrs)


def issue(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    lifetime: dt.timedelta,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """A SHA-256 certificate for ``public_key`` signed by ``issuer_key``, valid from now - BACKDATE for ``lifetime``.

    ``serial`` None draws a random one; a CA that numbers its leaves (serial 1, 2) passes it.
    """
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def self_signed(
    key: PrivateKey,
    common_name: str | x509.Name,
    lifetime: dt.timedelta,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A certificate for ``key``, issued by itself, valid from now - BACKDATE for ``lifetime``.

    ``common_name`` is a CN string, or a full :class:`x509.Name` (see :func:`name`) for a multi-part subject.
    """
    subject = common_name if isinstance(common_name, x509.Name) else name(common_name)
    return issue(subject, key.public_key(), subject, key, lifetime, extensions)
