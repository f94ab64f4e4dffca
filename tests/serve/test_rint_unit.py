"""rint protocol logic on its own: commitment parsing/verification and the nonce store (fake clocks)."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.serve import rint
from agent.serve.ratelimit import KeyedLimiter, TokenBucket, retry_after_header
from tests.serve.helpers import flip, v3_commitment, v4_commitment


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_v3_layout_and_derivation() -> None:
    issued = secrets.token_hex(16)
    lib_fp = bytes(range(16))
    key = ec.generate_private_key(ec.SECP256K1())
    c = rint.parse_commitment(v3_commitment(issued, key=key, lib_fp=lib_fp))
    assert (c.version, len(c.pubkey), len(c.nonce), len(c.proof), len(c.signature)) == (3, 64, 16, 16, 64)
    assert c.nonce == hashlib.sha256(b"rint-nonce-v3" + lib_fp + issued.encode()).digest()[:16]
    assert rint.verify_commitment(v3_commitment(issued, key=key, lib_fp=lib_fp), issued).valid


def test_v4_layout() -> None:
    issued = secrets.token_hex(16)
    key = ed25519.Ed25519PrivateKey.generate()
    text = v4_commitment(issued, key=key)
    assert len(text) == 292
    c = rint.parse_commitment(text)
    assert (c.version, len(c.pubkey), c.nonce, len(c.proof), len(c.signature)) == (4, 32, bytes.fromhex(issued), 32, 64)
    res = rint.verify_commitment(text, issued)
    assert res.valid and res.as_json()["commitment"]["lib_proof"] == c.proof.hex()


@pytest.mark.parametrize("builder", [v3_commitment, v4_commitment])
def test_every_signed_byte_matters(builder) -> None:
    issued = secrets.token_hex(16)
    text = builder(issued)
    n = len(text) // 2
    for i in range(2, n):
        res = rint.verify_commitment(flip(text, i), issued)
        assert not res.valid, i
        # a flipped top bit of S can push it past L: refused as non-canonical before OpenSSL sees it
        assert res.reason in ("bad_signature", "nonce_mismatch", "non_canonical_signature"), (i, res.reason)


def test_v3_high_s_and_zero_signature_rejected() -> None:
    issued = secrets.token_hex(16)
    raw = bytearray.fromhex(v3_commitment(issued))
    raw[98:162] = b"\x00" * 64
    assert rint.verify_commitment(raw.hex(), issued).reason == "bad_signature"
    raw[98:162] = b"\xff" * 64  # r, s >= n
    assert rint.verify_commitment(raw.hex(), issued).reason == "bad_signature"


def test_v3_pubkey_not_on_curve() -> None:
    issued = secrets.token_hex(16)
    raw = bytearray.fromhex(v3_commitment(issued))
    raw[2:66] = b"\x01" * 64
    assert rint.verify_commitment(raw.hex(), issued).reason == "bad_signature"


@pytest.mark.parametrize(("text", "reason"), [("", "bad_length"), ("03", "bad_length"), ("0303", "bad_length"),
                                              ("0403" + "00" * 144, "unsupported_version"), ("zz", "not_hex")])
def test_format_errors(text: str, reason: str) -> None:
    res = rint.verify_commitment(text, "00" * 16)
    assert (res.valid, res.reason) == (False, reason)


def test_nonce_store_one_time_and_reasons() -> None:
    clock = Clock()
    store = rint.NonceStore(10, 100, clock=clock, wall=lambda: 0.0)
    n, expires_at = store.issue("s")
    assert expires_at == "1970-01-01T00:00:10Z"
    assert store.consume(n, "s") == "ok"
    assert store.consume(n, "s") == "replayed"
    assert store.consume("ab" * 16, "s") == "unknown_nonce"
    m, _ = store.issue("s")
    clock.t += 10.5
    assert store.consume(m, "s") == "expired"
    assert store.consume(m, "s") == "expired"
    k, _ = store.issue("s")
    clock.t += 11
    assert store.purge_expired() == 1
    assert len(store) == 0
    assert store.consume(k, "s") == "expired"


def test_nonce_store_bounded_per_scope() -> None:
    store = rint.NonceStore(60, 3)
    issued = [store.issue("s")[0] for _ in range(5)]
    assert len(store) == 3
    assert store.consume(issued[0], "s") == "unknown_nonce"  # evicted oldest
    assert store.consume(issued[-1], "s") == "ok"
    other = store.issue("t")[0]
    assert store.consume(other, "t") == "ok"


def test_token_bucket_and_keyed_limiter() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.t += 0.5
    assert bucket.take() == 0.0
    lim = KeyedLimiter(1.0, 1, max_keys=2, clock=clock)
    assert lim.check("a") == 0 and lim.check("a") > 0 and lim.check("b") == 0
    assert lim.rejected == 1
    lim.check("c")
    assert len(lim) == 2
    assert retry_after_header(0.01) == "1" and retry_after_header(2.2) == "3"
