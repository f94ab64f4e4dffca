"""rint v4 as the validator checks it (nonce_bound, rint.v4_nonce) and strict Ed25519 (issue 11 item 13).

The small-order tests first show, with OpenSSL through ``cryptography``, that the forged commitment really
"verifies" (so the refusal is what stops it), then that ``verify_commitment`` refuses it and says why.
"""

from __future__ import annotations

import os
import secrets

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.serve import rint
from tests.serve.helpers import v3_commitment, v4_commitment

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
IDENTITY = (1).to_bytes(32, "little")


def _forged(pub: bytes, nonce: bytes, lib_proof: bytes, sig: bytes) -> str:
    return (b"\x04\x04" + pub + nonce + lib_proof + sig).hex()


def _openssl_accepts(pub: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_identity_key_forgery_is_refused_with_its_reason() -> None:
    """Regression: R = identity, S = 0 under the identity key verifies for any message in OpenSSL."""
    issued = secrets.token_hex(16)
    nonce, proof = bytes.fromhex(issued), os.urandom(32)
    sig = IDENTITY + bytes(32)
    assert _openssl_accepts(IDENTITY, sig, b"\x04" + IDENTITY + nonce + proof)  # the attack is real
    res = rint.verify_commitment(_forged(IDENTITY, nonce, proof, sig), issued)
    assert (res.valid, res.reason) == (False, "small_order_pubkey")
    assert res.as_json()["nonce_bound"] is True  # the nonce matched; the key is what failed
    res = rint.verify_commitment(_forged(IDENTITY, nonce, proof, sig), issued, v4_nonce="exact")
    assert (res.valid, res.reason) == (False, "small_order_pubkey")


def test_blocklist_entries_are_small_order_per_openssl() -> None:
    """Independent of the derivation: with R = identity and S = 0, OpenSSL accepts a message under each
    canonical listed key as soon as H(R‖A‖M) is a multiple of the key's order (<= 8), i.e. within a few
    dozen tries; a key of large order would never verify. Non-canonical entries are refused as such."""
    issued = secrets.token_hex(16)
    nonce = bytes.fromhex(issued)
    sig = IDENTITY + bytes(32)
    canonical = 0
    for enc in sorted(rint.ED25519_SMALL_ORDER):
        y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
        negative_zero = enc[31] & 0x80 and y in (1, P - 1)
        res = rint.verify_commitment(_forged(enc, nonce, os.urandom(32), sig), issued)
        assert not res.valid
        if y >= P or negative_zero:
            assert res.reason == "non_canonical_pubkey", enc.hex()
            continue
        assert res.reason == "small_order_pubkey", enc.hex()
        canonical += 1
        hits = sum(_openssl_accepts(enc, sig, b"\x04" + enc + nonce + os.urandom(32)) for _ in range(200))
        assert hits > 0, enc.hex()
    assert canonical == 8  # one canonical encoding per point of the 8-torsion
    assert len(rint.ED25519_SMALL_ORDER) == 14


def test_non_canonical_pubkey_y_ge_p() -> None:
    issued = secrets.token_hex(16)
    text = v4_commitment(issued)
    raw = bytearray.fromhex(text)
    raw[2:34] = (P + 5).to_bytes(32, "little")
    assert rint.verify_commitment(raw.hex(), issued).reason == "non_canonical_pubkey"


def test_s_ge_l_and_small_order_r_refused() -> None:
    issued = secrets.token_hex(16)
    key = ed25519.Ed25519PrivateKey.generate()
    text = v4_commitment(issued, key=key)
    assert rint.verify_commitment(text, issued).valid
    raw = bytearray.fromhex(text)
    s = int.from_bytes(raw[114:146], "little")
    raw[114:146] = (s + L).to_bytes(32, "little")  # same value mod L: malleated signature
    assert rint.verify_commitment(raw.hex(), issued).reason == "non_canonical_signature"
    raw = bytearray.fromhex(text)
    raw[82:114] = IDENTITY
    assert rint.verify_commitment(raw.hex(), issued).reason == "small_order_signature"
    raw[82:114] = (P + 3).to_bytes(32, "little")
    assert rint.verify_commitment(raw.hex(), issued).reason == "non_canonical_signature"


def test_v4_nonce_validator_semantics_and_exact_mode() -> None:
    issued = secrets.token_hex(16)
    other = os.urandom(16)  # a nonce derived some other way, signed by the chute's own key
    text = v4_commitment(issued, nonce_override=other)
    res = rint.verify_commitment(text, issued)  # default = what the validator checks
    assert (res.valid, res.reason, res.as_json()["nonce_bound"]) == (True, "ok", False)
    res = rint.verify_commitment(text, issued, v4_nonce="exact")
    assert (res.valid, res.reason, res.as_json()["nonce_bound"]) == (False, "nonce_mismatch", False)
    good = v4_commitment(issued)
    for mode in rint.V4_NONCE_MODES:
        res = rint.verify_commitment(good, issued, v4_nonce=mode)
        assert (res.valid, res.as_json()["nonce_bound"]) == (True, True)
    with pytest.raises(ValueError, match="v4_nonce"):
        rint.verify_commitment(good, issued, v4_nonce="loose")


def test_v3_unchanged_nonce_always_required() -> None:
    issued = secrets.token_hex(16)
    bad = v3_commitment(issued, nonce_override=os.urandom(16))
    for mode in rint.V4_NONCE_MODES:
        res = rint.verify_commitment(bad, issued, v4_nonce=mode)
        assert (res.valid, res.reason) == (False, "nonce_mismatch")
    res = rint.verify_commitment(v3_commitment(issued), issued)
    assert res.valid and res.as_json()["nonce_bound"] is True
