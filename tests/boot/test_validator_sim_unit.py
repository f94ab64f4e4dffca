"""The faithful validator's rules that need no nginx: generations from versions, the RTMR3 chain, the
measurement registry, confirm semantics, fault validation, the signing-keys document."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from agent.log import Secret
from agent.sim import quote_sim
from agent.sim.validator_routes import _promote, _rewrite
from agent.sim.validator_signing import REQUIRED_SIGNING_KEYS, SigningRoot
from agent.sim.validator_state import (
    SIM_RUNTIME_RTMR3,
    ZERO_RTMR,
    Fault,
    MeasurementSet,
    ValidatorState,
    generation_of,
    parse_version,
    rtmr3_chain,
    simulated_measurement,
)


@pytest.mark.parametrize(("version", "gen"), [
    ("0.1.3", "1.2"), ("0.2.0", "1.2"), ("1.2.9", "1.2"), ("0.0.0-sim", "1.2"),
    ("1.3.0", "1.3"), ("1.3.1-rc2", "1.3"), ("1.3", "1.3"),
    ("1.4.0", "1.4"), ("1.4", "1.4"), ("2.0.0", "1.4"),
])
def test_generation_of_version(version: str, gen: str) -> None:
    assert generation_of(version) == gen


def test_parse_version_orders_numerically() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.9")
    assert parse_version("1.4") == (1, 4, 0)


def test_rtmr3_chain_is_the_extend_fold() -> None:
    d1, d2 = hashlib.sha384(b"a").digest(), hashlib.sha384(b"b").digest()
    step1 = hashlib.sha384(bytes(48) + d1).digest()
    assert rtmr3_chain([d1, d2]) == hashlib.sha384(step1 + d2).digest()
    assert rtmr3_chain([]) == bytes(48)
    with pytest.raises(ValueError, match="48 bytes"):
        rtmr3_chain([b"short"])


def test_measurement_set_validates_and_matches() -> None:
    with pytest.raises(ValueError, match="rtmr1: expected 96 hex"):
        MeasurementSet("x", "1.4.0", "00" * 48, "00" * 48, "zz" * 48, "00" * 48)
    m = simulated_measurement("1.4")
    assert m.generation == "1.4" and m.runtime_rtmr3 == SIM_RUNTIME_RTMR3 != ZERO_RTMR
    assert simulated_measurement("1.2").runtime_rtmr3 == ZERO_RTMR  # ≤1.2 images register RTMR3 = 0
    assert simulated_measurement("1.3", "ab" * 48).runtime_rtmr3 == "ab" * 48
    boot, runtime = m.rtmrs(runtime=False), m.rtmrs(runtime=True)
    assert boot[:3] == quote_sim.DEFAULT_RTMRS[:3] and boot[3] == bytes(48)
    assert runtime[3] == bytes.fromhex(SIM_RUNTIME_RTMR3)

    class Q:
        mr_td = quote_sim.DEFAULT_MR_TD
        rtmr0, rtmr1, rtmr2, rtmr3 = boot

    assert m.matches(Q()) and not m.matches(Q(), runtime=True)
    Q.rtmr3 = runtime[3]
    assert m.matches(Q(), runtime=True) and not m.matches(Q())
    with pytest.raises(ValueError, match="generation"):
        simulated_measurement("1.5")


def test_promote_rules() -> None:
    cur, nxt = Secret("cur"), Secret("next")
    assert _promote(cur, None, True) == ("no_pending", cur)
    result, now = _promote(cur, nxt, True)
    assert result == "promoted" and now is nxt and len(cur) == 0  # the old key is wiped
    cur, nxt = Secret("cur"), Secret("next")
    result, now = _promote(cur, nxt, False)
    assert result == "discarded" and now is cur and len(nxt) == 0
    nxt = Secret("next")  # a fresh volume was formatted with `next`: kept even with rotated false (1.3.0)
    assert _promote(None, nxt, False) == ("promoted", nxt)


def test_fault_validation_and_rewrites() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Fault("explode")
    with pytest.raises(ValueError, match="override"):
        Fault("override")
    with pytest.raises(ValueError, match="missing_fields"):
        Fault("missing_fields")
    body = b'{"key": "k", "root_next": "n", "volumes": {"storage": {"current": null, "next": "x"}}}'
    assert _rewrite(Fault("missing_fields", fields=["root_next", ("volumes", "storage", "next")]), body) == \
        b'{"key": "k", "volumes": {"storage": {"current": null}}}'
    assert b'"key": 5' in _rewrite(Fault("override", fields={"key": 5}), body)
    assert _rewrite(Fault("override", fields={"key": 5}), b"not json") == b"not json"


def test_signing_root_document_verifies_and_a_flipped_bit_does_not() -> None:
    root = SigningRoot()
    doc = root.document()
    assert set(doc["keys"]) == set(REQUIRED_SIGNING_KEYS) == set(doc["signatures"])
    pub = serialization.load_pem_public_key(root.public_pem)
    for name, b64 in doc["keys"].items():
        pub.verify(base64.b64decode(doc["signatures"][name]), base64.b64decode(b64), padding.PKCS1v15(),
                   hashes.SHA256())
    import json

    bad = json.loads(_rewrite(Fault("bad_signature", fields=["helm-pubkey.gpg"]), json.dumps(doc).encode()))
    with pytest.raises(InvalidSignature):
        pub.verify(base64.b64decode(bad["signatures"]["helm-pubkey.gpg"]),
                   base64.b64decode(bad["keys"]["helm-pubkey.gpg"]), padding.PKCS1v15(), hashes.SHA256())
    assert bad["signatures"]["cosign/chutes.pub"] == doc["signatures"]["cosign/chutes.pub"]


def test_timed_values_are_single_use_and_expire() -> None:
    st = ValidatorState(b"", [])
    key = ("hk", "vm")
    v = st.issue_timed(st.confirm_nonces, key, 300, "confirm_nonce")
    assert not st.take_timed(st.confirm_nonces, key, "0" * 64, "confirm_nonce")  # wrong value keeps it
    assert st.take_timed(st.confirm_nonces, key, v, "confirm_nonce")
    assert not st.take_timed(st.confirm_nonces, key, v, "confirm_nonce")
    v = st.issue_timed(st.confirm_nonces, key, 300, "confirm_nonce")
    st.clock_offset = 301
    assert not st.take_timed(st.confirm_nonces, key, v, "confirm_nonce")
    assert dict(st.counters) == {"confirm_nonce.issued": 2, "confirm_nonce.refused": 2, "confirm_nonce.consumed": 1,
                                 "confirm_nonce.expired": 1}
