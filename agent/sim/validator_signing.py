"""The faithful validator's ``GET /servers/signing-keys`` document under a simulated root signing key.

Real images bake ``/etc/chutes/root-signing-key.pem`` and check every key's RSA PKCS#1 v1.5 /
SHA-256 signature against it (chutes-vm-generations.md §4.3 step 12). The simulated root is a fresh
RSA key per validator; :attr:`SigningRoot.public_pem` is what a test bakes into the agent's config.
NEVER production.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

REQUIRED_SIGNING_KEYS = ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg")
SIGNING_KEYS_VERSION = "sim-1"


def _cosign_pub() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _default_keys() -> dict[str, bytes]:
    # a GPG keyring is binary: old-format public-key packet tag (0x99) + a simulated body
    helm = b"\x99\x01\x0d\x04" + b"chutes-attest simulated helm public key (untrusted)"
    return {"cosign/chutes.pub": _cosign_pub(), "cosign/dockerhub.pub": _cosign_pub(), "helm-pubkey.gpg": helm}


@dataclass
class SigningRoot:
    """A simulated root signing key and the key files it signs."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    keys: dict[str, bytes] = field(default_factory=_default_keys)
    version: str = SIGNING_KEYS_VERSION

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def document(self) -> dict[str, object]:
        """``{"version", "keys": {name: b64}, "signatures": {name: b64}}``."""
        return {
            "version": self.version,
            "keys": {n: base64.b64encode(v).decode() for n, v in self.keys.items()},
            "signatures": {n: base64.b64encode(self.sign(v)).decode() for n, v in self.keys.items()},
        }
