"""1.4.0 hand-off artifacts (chutes-vm-generations.md §4.3 steps 11-12, §5 k3s config, §7 table).

Three of them, each failing closed with the sek8s marker of its step:
- ``validator-ss58`` + ``validator-auth.env`` (``WRITE-VALIDATOR-AUTH-FAILED``): the per-boot validator
  hotkey the attestation proxy will accept, and nothing else.
- ``k3s-encryption-config.yaml`` (``K3S-ENCRYPTION-KEY-MISSING``): secretbox key for secrets/configmaps.
- ``signing-keys/`` (``FETCH-SIGNING-KEYS-FAILED``): cosign/Helm keys, each authenticated by an RSA
  PKCS#1 v1.5 / SHA-256 signature over its raw (base64-decoded) bytes, checked against the baked,
  measured root key, as sek8s ``fetch-signing-keys`` does with ``openssl dgst -sha256 -verify``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.errors import AgentError
from agent.fsutil import ensure_dir, write_atomic
from agent.log import get_logger
from agent.validator.proof import is_valid_validator_ss58

log = get_logger(__name__)

MARKER_VALIDATOR_AUTH = "WRITE-VALIDATOR-AUTH-FAILED"
MARKER_K3S_KEY = "K3S-ENCRYPTION-KEY-MISSING"
MARKER_SIGNING_KEYS = "FETCH-SIGNING-KEYS-FAILED"

VALIDATOR_SS58_FILE = "validator-ss58"
VALIDATOR_AUTH_ENV = "validator-auth.env"
K3S_ENCRYPTION_CONFIG = "/run/chutes/k3s-encryption-config.yaml"
SIGNING_KEYS_DIR = "/run/chutes/signing-keys"
ROOT_SIGNING_KEY = "/etc/chutes/root-signing-key.pem"
REQUIRED_SIGNING_KEYS = ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg")
MAX_BUNDLE_BYTES = 1 << 20  # a few public keys; anything near this is not a key bundle
MAX_KEY_NAME = 255
# One or more path components of [A-Za-z0-9._-], none empty and none starting with a dot: rules out
# absolute paths, "..", hidden files, backslashes, spaces, NULs and anything a shell would interpret.
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")
_B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# base64 of exactly 32 bytes: 43 symbols then one "=", the last symbol's two unused bits zero (canonical)
_B64_32 = re.compile(rb"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


class ArtifactError(AgentError):
    """A hand-off artifact could not be produced; ``str`` = ``"<MARKER>: <detail>"`` (never a secret)."""

    reason = "handoff_artifact"

    def __init__(self, marker: str, detail: str) -> None:
        super().__init__(f"{marker}: {detail}")
        self.marker = marker
        self.detail = detail


# ── validator auth (§4.3 step 11) ─────────────────────────────────────────────


def write_validator_auth(run_dir: str | os.PathLike[str], ss58: str) -> None:
    """``validator-ss58`` (the address, no newline) and ``validator-auth.env`` (``ALLOWED_VALIDATORS=<ss58>\\n``),
    both 0600, after checking ``ss58`` is a prefix-42 SS58 address of 40-50 base58 characters starting with 5.

    The value is not trimmed: a validator that sends whitespace sends something else than an address.
    """
    if not isinstance(ss58, str) or not is_valid_validator_ss58(ss58):
        shown = repr(ss58)[:80] if isinstance(ss58, str) else type(ss58).__name__
        raise ArtifactError(MARKER_VALIDATOR_AUTH, f"vm_auth_ss58 is not a valid SS58 address: {shown}")
    d = Path(run_dir)
    try:
        if not d.exists():
            ensure_dir(d, 0o700)
        write_atomic(d / VALIDATOR_SS58_FILE, ss58.encode("ascii"), 0o600)
        write_atomic(d / VALIDATOR_AUTH_ENV, f"ALLOWED_VALIDATORS={ss58}\n".encode("ascii"), 0o600)
    except OSError as exc:
        raise ArtifactError(MARKER_VALIDATOR_AUTH, f"{d}: {exc.strerror or exc}") from None
    log.info("boot.handoff.validator_auth", validator_ss58=ss58)


# ── k3s encryption config (§5) ───────────────────────────────────────────────

_K3S_HEAD = (b"apiVersion: apiserver.config.k8s.io/v1\n"
             b"kind: EncryptionConfiguration\n"
             b"resources:\n"
             b"  - resources:\n"
             b"      - secrets\n"
             b"      - configmaps\n"
             b"    providers:\n"
             b"      - secretbox:\n"
             b"          keys:\n"
             b"            - name: key1\n"
             b"              secret: ")
_K3S_TAIL = b"\n      - identity: {}\n"


def _key_bytes(key_b64: str | bytes | bytearray | None) -> bytes | bytearray:
    if key_b64 is None:
        raise ArtifactError(MARKER_K3S_KEY, "the validator sent no k3s_encryption_key")
    if isinstance(key_b64, str):
        if not key_b64.isascii():
            raise ArtifactError(MARKER_K3S_KEY, "k3s_encryption_key is not base64")
        return key_b64.encode("ascii")
    if isinstance(key_b64, bytes | bytearray):
        return key_b64
    raise ArtifactError(MARKER_K3S_KEY, f"k3s_encryption_key: expected text, got {type(key_b64).__name__}")


def write_k3s_encryption_config(path: str | os.PathLike[str], key_b64: str | bytes | bytearray | None) -> None:
    """The k3s ``EncryptionConfiguration`` (secretbox ``key1`` then ``identity``) for secrets and configmaps, 0600.

    ``key_b64`` must be standard base64 of exactly 32 bytes (secretbox's key size). It is checked by its
    shape, not decoded, so no extra copy of the key is made; the file is assembled in a ``bytearray``
    that is zeroed after the write.
    """
    raw = _key_bytes(key_b64)
    if len(raw) == 0:
        raise ArtifactError(MARKER_K3S_KEY, "k3s_encryption_key is empty")
    if _B64_32.fullmatch(raw) is None:
        raise ArtifactError(MARKER_K3S_KEY, f"k3s_encryption_key must be standard base64 of exactly 32 bytes "
                                            f"(44 characters); got {len(raw)} characters that are not")
    p = Path(path)
    buf = bytearray(_K3S_HEAD)
    buf += raw
    buf += _K3S_TAIL
    try:
        if not p.parent.exists():
            ensure_dir(p.parent, 0o700)
        write_atomic(p, buf, 0o600)
    except OSError as exc:
        raise ArtifactError(MARKER_K3S_KEY, f"{p}: {exc.strerror or exc}") from None
    finally:
        buf[:] = bytes(len(buf))
    log.info("boot.handoff.k3s_encryption_config", path=str(p))


# ── signing keys (§4.3 step 12) ──────────────────────────────────────────────


def _fail_keys(detail: str) -> ArtifactError:
    return ArtifactError(MARKER_SIGNING_KEYS, detail)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _fail_keys(f"key bundle has a duplicate JSON member {k[:64]!r}")
        out[k] = v
    return out


def is_safe_key_name(name: str) -> bool:
    """A relative path of plain components (``cosign/chutes.pub``): no ``..``, no absolute, no odd characters."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_KEY_NAME and ".." not in name
            and _KEY_NAME.fullmatch(name) is not None)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise _fail_keys(f"missing {what}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _fail_keys(f"base64 decode failed for {what}") from None


def load_root_key(pem: bytes) -> rsa.RSAPublicKey:
    """The baked root signing key (PEM SubjectPublicKeyInfo), which must be RSA."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _fail_keys("root signing key is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _fail_keys(f"root signing key must be RSA, got {type(key).__name__}")
    return key


def verify_signing_keys(body: bytes, root_public_key_pem: bytes) -> dict[str, bytes]:
    """Parse ``GET /servers/signing-keys`` and return ``{name: key bytes}`` only if every key is authentic.

    Bundle: ``{"version": …, "keys": {name: b64}, "signatures": {name: b64}}``. Every key in ``keys`` must
    have a signature that verifies (RSA PKCS#1 v1.5, SHA-256, over the decoded key bytes) under the root
    key, every name must be a safe relative path, and the three required keys must be among them. Any
    deviation raises :class:`ArtifactError` with ``FETCH-SIGNING-KEYS-FAILED``: no partial result.
    """
    root = load_root_key(root_public_key_pem)
    if len(body) > MAX_BUNDLE_BYTES:
        raise _fail_keys(f"key bundle is {len(body)} bytes, more than {MAX_BUNDLE_BYTES}")
    try:
        bundle = json.loads(body, object_pairs_hook=_no_duplicates)
    except ArtifactError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _fail_keys("key bundle is not JSON") from None
    if not isinstance(bundle, dict):
        raise _fail_keys(f"key bundle is a JSON {type(bundle).__name__}, not an object")
    version = bundle.get("version")
    if version is None or version is False or version == "" or isinstance(version, dict | list):
        raise _fail_keys("invalid key bundle: missing or null version field")
    keys, sigs = bundle.get("keys"), bundle.get("signatures")
    if not isinstance(keys, dict) or not keys:
        raise _fail_keys("key bundle contains no keys")
    if not isinstance(sigs, dict):
        raise _fail_keys("key bundle has no signatures object")

    verified: dict[str, bytes] = {}
    for name in sorted(keys):
        if not is_safe_key_name(name):
            raise _fail_keys(f"key name rejected (not a safe relative path): {name[:80]!r}")
        key = _b64(keys[name], f"key content for: {name}")
        sig = _b64(sigs.get(name), f"signature for: {name}")
        try:
            root.verify(sig, key, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _fail_keys(f"RSA signature verification FAILED for: {name}") from None
        verified[name] = key
    missing = [n for n in REQUIRED_SIGNING_KEYS if n not in verified]
    if missing:
        raise _fail_keys(f"required key missing from bundle: {', '.join(missing)}")
    log.info("boot.handoff.signing_keys_verified", version=str(version)[:64], names=sorted(verified))
    return verified


def write_signing_keys(directory: str | os.PathLike[str], keys: dict[str, bytes]) -> list[Path]:
    """Write verified keys under ``directory`` (0755), subdirectories 0755, files 0644 (public keys)."""
    base = Path(directory)
    written: list[Path] = []
    try:
        if not base.parent.exists():
            ensure_dir(base.parent, 0o700)
        ensure_dir(base, 0o755)
        for name in sorted(keys):
            if not is_safe_key_name(name):  # defence in depth: callers pass verify_signing_keys' output
                raise _fail_keys(f"key name rejected (not a safe relative path): {name[:80]!r}")
            parts = name.split("/")
            d = base
            for part in parts[:-1]:
                d = d / part
                ensure_dir(d, 0o755)
            target = d / parts[-1]
            write_atomic(target, keys[name], 0o644)
            written.append(target)
    except ArtifactError:
        raise
    except OSError as exc:
        raise _fail_keys(f"{base}: {exc.strerror or exc}") from None
    log.info("boot.handoff.signing_keys_written", directory=str(base), count=len(written))
    return written
