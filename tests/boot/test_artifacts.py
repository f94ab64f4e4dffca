"""1.4.0 hand-off artifacts: validator auth files, k3s encryption config, signing-key bundle verification
with real RSA keys (tampering, missing keys, unsafe names, garbage JSON)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent.boot import artifacts
from agent.boot.artifacts import (
    ArtifactError,
    verify_signing_keys,
    write_k3s_encryption_config,
    write_signing_keys,
    write_validator_auth,
)
from agent.validator.proof import ss58_encode

ALICE_SS58 = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
K3S_KEY = base64.b64encode(bytes(range(32))).decode()


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# ── validator auth ───────────────────────────────────────────────────────────


def test_write_validator_auth(tmp_path: Path) -> None:
    run = tmp_path / "chutes"
    write_validator_auth(run, ALICE_SS58)
    assert (run / "validator-ss58").read_bytes() == ALICE_SS58.encode()
    assert (run / "validator-auth.env").read_bytes() == f"ALLOWED_VALIDATORS={ALICE_SS58}\n".encode()
    assert _mode(run) == 0o700
    assert _mode(run / "validator-ss58") == 0o600 and _mode(run / "validator-auth.env") == 0o600


@pytest.mark.parametrize("bad", [
    "",
    ALICE_SS58 + "\n",
    " " + ALICE_SS58,
    ALICE_SS58[:-1] + ("A" if ALICE_SS58[-1] != "A" else "B"),  # checksum
    ALICE_SS58 + "\nEVIL=1",  # env-file injection
    "5" + "A" * 47,  # passes the shell shape rule, not an address
    ss58_encode(bytes(32), prefix=2),  # Kusama address
    "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcN0HGKutQY",  # '0' not base58
])
def test_write_validator_auth_rejects_with_marker_and_writes_nothing(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ArtifactError) as exc:
        write_validator_auth(tmp_path, bad)
    assert exc.value.marker == "WRITE-VALIDATOR-AUTH-FAILED"
    assert str(exc.value).startswith("WRITE-VALIDATOR-AUTH-FAILED: vm_auth_ss58 is not a valid SS58 address")
    assert "\n" not in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_write_validator_auth_rejects_non_text(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"WRITE-VALIDATOR-AUTH-FAILED: .*NoneType"):
        write_validator_auth(tmp_path, None)  # type: ignore[arg-type]


# ── k3s encryption config ────────────────────────────────────────────────────


def test_k3s_encryption_config_content_and_mode(tmp_path: Path) -> None:
    p = tmp_path / "chutes" / "k3s-encryption-config.yaml"
    write_k3s_encryption_config(p, K3S_KEY)
    assert _mode(p) == 0o600 and _mode(p.parent) == 0o700
    doc = yaml.safe_load(p.read_text())
    assert doc == {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{
            "resources": ["secrets", "configmaps"],
            "providers": [
                {"secretbox": {"keys": [{"name": "key1", "secret": K3S_KEY}]}},
                {"identity": {}},
            ],
        }],
    }
    assert base64.b64decode(doc["resources"][0]["providers"][0]["secretbox"]["keys"][0]["secret"]) == bytes(range(32))


def test_k3s_key_accepts_bytes_and_bytearray(tmp_path: Path) -> None:
    for value in (K3S_KEY.encode(), bytearray(K3S_KEY.encode())):
        p = tmp_path / "k.yaml"
        write_k3s_encryption_config(p, value)
        assert f"secret: {K3S_KEY}\n" in p.read_text()


@pytest.mark.parametrize("bad", [
    None,
    "",
    base64.b64encode(bytes(31)).decode(),
    base64.b64encode(bytes(33)).decode(),
    base64.b64encode(bytes(32)).decode().rstrip("="),  # unpadded
    base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # url-safe alphabet
    K3S_KEY[:42] + "B=",  # non-canonical: unused bits set
    K3S_KEY + "\n",
    K3S_KEY[:20] + "\n" + K3S_KEY[21:],  # YAML injection attempt
    "é" * 44,
    b"\xff" * 44,
])
def test_k3s_key_must_be_base64_of_32_bytes(tmp_path: Path, bad: Any) -> None:
    p = tmp_path / "k.yaml"
    with pytest.raises(ArtifactError) as exc:
        write_k3s_encryption_config(p, bad)
    assert exc.value.marker == "K3S-ENCRYPTION-KEY-MISSING"
    assert str(exc.value).startswith("K3S-ENCRYPTION-KEY-MISSING: ")
    if isinstance(bad, str) and len(bad) > 8:
        assert bad not in str(exc.value)  # the (wrong) key is never echoed
    assert not p.exists()


# ── signing keys ──────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def root() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def root_pem(root: rsa.RSAPrivateKey) -> bytes:
    return root.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


KEYS = {
    "cosign/chutes.pub": b"-----BEGIN PUBLIC KEY-----\nchutes\n-----END PUBLIC KEY-----\n",
    "cosign/dockerhub.pub": b"-----BEGIN PUBLIC KEY-----\ndockerhub\n-----END PUBLIC KEY-----\n",
    "helm-pubkey.gpg": bytes(range(256)),  # binary OpenPGP keyring bytes
}


def _sign(key: rsa.RSAPrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()


def _bundle(root: rsa.RSAPrivateKey, keys: dict[str, bytes] | None = None, **override: Any) -> dict[str, Any]:
    keys = KEYS if keys is None else keys
    b: dict[str, Any] = {
        "version": "2026-09-01",
        "keys": {n: base64.b64encode(v).decode() for n, v in keys.items()},
        "signatures": {n: _sign(root, v) for n, v in keys.items()},
    }
    b.update(override)
    return b


def _body(bundle: Any) -> bytes:
    return json.dumps(bundle).encode()


def test_verify_signing_keys_returns_the_decoded_keys(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    extra = dict(KEYS, **{"cosign/extra-2.pub": b"extra"})
    assert verify_signing_keys(_body(_bundle(root, extra)), root_pem) == extra


def test_signature_is_over_the_raw_decoded_key_bytes(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    """Signing the base64 text instead of the bytes (a plausible mistake) must not verify."""
    b = _bundle(root)
    b["signatures"]["helm-pubkey.gpg"] = _sign(root, b["keys"]["helm-pubkey.gpg"].encode())
    with pytest.raises(ArtifactError, match=r"RSA signature verification FAILED for: helm-pubkey.gpg"):
        verify_signing_keys(_body(b), root_pem)


def test_tampered_key_and_tampered_signature_fail(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    b = _bundle(root)
    b["keys"]["cosign/chutes.pub"] = base64.b64encode(KEYS["cosign/chutes.pub"] + b" ").decode()
    with pytest.raises(ArtifactError) as exc:
        verify_signing_keys(_body(b), root_pem)
    assert str(exc.value) == "FETCH-SIGNING-KEYS-FAILED: RSA signature verification FAILED for: cosign/chutes.pub"
    b = _bundle(root)
    sig = bytearray(base64.b64decode(b["signatures"]["cosign/dockerhub.pub"]))
    sig[10] ^= 1
    b["signatures"]["cosign/dockerhub.pub"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(ArtifactError, match=r"verification FAILED for: cosign/dockerhub.pub"):
        verify_signing_keys(_body(b), root_pem)


def test_signed_by_another_key_fails(root_pem: bytes) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ArtifactError, match="verification FAILED"):
        verify_signing_keys(_body(_bundle(impostor)), root_pem)


def test_pss_signature_is_not_accepted(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    b = _bundle(root)
    data = KEYS["helm-pubkey.gpg"]
    b["signatures"]["helm-pubkey.gpg"] = base64.b64encode(root.sign(
        data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())).decode()
    with pytest.raises(ArtifactError, match=r"verification FAILED for: helm-pubkey.gpg"):
        verify_signing_keys(_body(b), root_pem)


@pytest.mark.parametrize("missing", artifacts.REQUIRED_SIGNING_KEYS)
def test_each_required_key_must_be_present(root: rsa.RSAPrivateKey, root_pem: bytes, missing: str) -> None:
    keys = {n: v for n, v in KEYS.items() if n != missing}
    with pytest.raises(ArtifactError) as exc:
        verify_signing_keys(_body(_bundle(root, keys)), root_pem)
    assert str(exc.value) == f"FETCH-SIGNING-KEYS-FAILED: required key missing from bundle: {missing}"


def test_a_key_without_signature_fails(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    b = _bundle(root)
    del b["signatures"]["cosign/chutes.pub"]
    with pytest.raises(ArtifactError, match=r"missing signature for: cosign/chutes.pub"):
        verify_signing_keys(_body(b), root_pem)


@pytest.mark.parametrize("name", [
    "../etc/passwd", "cosign/../../x", "/etc/chutes/root-signing-key.pem", "cosign//x.pub", "cosign/", ".hidden",
    "cosign/.x", "a\\b", "a b", "a\nb", "a\x00b", "cosign/x..pub", "~root/x", "$(reboot)", "é.pub", "x" * 256, "",
])
def test_unsafe_names_are_rejected_even_when_signed(root: rsa.RSAPrivateKey, root_pem: bytes, name: str) -> None:
    keys = dict(KEYS, **{name: b"payload"})
    with pytest.raises(ArtifactError, match="key name rejected"):
        verify_signing_keys(_body(_bundle(root, keys)), root_pem)


@pytest.mark.parametrize("body", [
    b"", b"not json", b"{", b"[]", b"null", b'"str"', b"\xff\xfe", b"[" * 100000,
    b'{"version":"1","keys":{},"signatures":{}}',
    b'{"version":"1","keys":[],"signatures":{}}',
    b'{"version":"1","keys":{"helm-pubkey.gpg":"AA=="}}',
    b'{"version":"1","keys":{"helm-pubkey.gpg":"AA=="},"signatures":{"helm-pubkey.gpg":"%%%"}}',
    b'{"version":"1","keys":{"helm-pubkey.gpg":""},"signatures":{"helm-pubkey.gpg":"AA=="}}',
    b'{"version":"1","keys":{"helm-pubkey.gpg":5},"signatures":{"helm-pubkey.gpg":"AA=="}}',
])
def test_garbage_bundles_fail_closed(root_pem: bytes, body: bytes) -> None:
    with pytest.raises(ArtifactError) as exc:
        verify_signing_keys(body, root_pem)
    assert exc.value.marker == "FETCH-SIGNING-KEYS-FAILED"


@pytest.mark.parametrize("version", [None, "", False, {}, []])
def test_version_is_required(root: rsa.RSAPrivateKey, root_pem: bytes, version: Any) -> None:
    with pytest.raises(ArtifactError, match="missing or null version"):
        verify_signing_keys(_body(_bundle(root, version=version)), root_pem)
    b = _bundle(root)
    del b["version"]
    with pytest.raises(ArtifactError, match="missing or null version"):
        verify_signing_keys(_body(b), root_pem)


def test_duplicate_members_and_oversize_bodies_are_refused(root: rsa.RSAPrivateKey, root_pem: bytes) -> None:
    good = _body(_bundle(root))
    dup = good[:-1] + b', "keys": {}}'
    with pytest.raises(ArtifactError, match="duplicate JSON member 'keys'"):
        verify_signing_keys(dup, root_pem)
    with pytest.raises(ArtifactError, match="more than"):
        verify_signing_keys(good + b" " * artifacts.MAX_BUNDLE_BYTES, root_pem)


def test_root_key_must_be_an_rsa_pem(root: rsa.RSAPrivateKey) -> None:
    body = _body(_bundle(root))
    with pytest.raises(ArtifactError, match="root signing key is not a PEM public key"):
        verify_signing_keys(body, b"garbage")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ArtifactError, match="root signing key must be RSA"):
        verify_signing_keys(body, ec_pem)


def test_write_signing_keys_layout_and_modes(root: rsa.RSAPrivateKey, root_pem: bytes, tmp_path: Path) -> None:
    keys = verify_signing_keys(_body(_bundle(root)), root_pem)
    out = tmp_path / "chutes" / "signing-keys"
    written = write_signing_keys(out, keys)
    assert sorted(str(p.relative_to(out)) for p in written) == sorted(KEYS)
    for name, data in KEYS.items():
        assert (out / name).read_bytes() == data
        assert _mode(out / name) == 0o644
    assert _mode(out) == 0o755 and _mode(out / "cosign") == 0o755
    assert sorted(os.listdir(out / "cosign")) == ["chutes.pub", "dockerhub.pub"]


def test_write_signing_keys_refuses_unsafe_names_and_symlinked_dirs(tmp_path: Path) -> None:
    out = tmp_path / "signing-keys"
    with pytest.raises(ArtifactError, match="key name rejected"):
        write_signing_keys(out, {"../escape": b"x"})
    assert not (tmp_path / "escape").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "cosign").symlink_to(elsewhere)
    with pytest.raises(ArtifactError, match="FETCH-SIGNING-KEYS-FAILED"):
        write_signing_keys(out, {"cosign/chutes.pub": b"x"})
    assert os.listdir(elsewhere) == []
