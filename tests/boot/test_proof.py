"""sr25519 request proof: published Substrate vectors, the exact message, SS58 codec errors, secret hygiene."""

from __future__ import annotations

import hashlib
import json
import pickle

import base58
import pytest
import sr25519

from agent.validator import proof
from agent.validator.proof import (
    Hotkey,
    HotkeyMismatchError,
    KeyMaterialError,
    SS58Error,
    WipedKeyError,
    check_cross,
    is_valid_validator_ss58,
    proof_headers,
    proof_message,
    ss58_decode,
    ss58_encode,
    verify_proof,
)

# Substrate's well-known dev account //Alice (subkey inspect //Alice; sp-core's own tests pin the
# public key; the sek8s sr25519 signer pins the SS58 and the 64-byte private key layout).
ALICE_SEED = "e5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a"
ALICE_PUBLIC = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d"
ALICE_SS58 = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
ALICE_PRIVATE_KEY = ("33a6f3093f158a7109f679410bef1a0c54168145e0cecb4df006c1c2fffb1f09"
                     "925a225d97aa00682d6a59b95b18780c10d7032336e88f3442b42361f4a66011")
# A signature made by polkadot-js (signing context "substrate") over a raw message, published in
# logion-network/logion-backend-ts test/unit/services/util-crypto.spec.ts.
PJS_ADDRESS = "5Gv8YYFu8H1btvmrJy9FjjAWfb99wrhV3uhPFoNEr918utyR"
PJS_MESSAGE = b"test message\n"
PJS_SIGNATURE = ("22f91b41ba12f8663ddce26bfc90dbfe6a51683fd3782ad679ab2a5fdbe7d44c"
                 "2a119f22c74eea22555e5483eb7f42b828f189a38379d59c3b607d2461f0858e")
# sp-core verify_known_old_message_should_work: a pre-audit (schnorrkel 0.1) signature that modern
# verification must reject.
OLD_PUBLIC = "b4bfa1f7a5166695eb75299fd1c4c03ea212871c342f2c5dfea0902b2c246918"
OLD_SIGNATURE = ("5a9755f069939f45d96aaf125cf5ce7ba1db998686f87f2fb3cbdea922078741"
                 "a73891ba265f70c31436e18a9acd14d189d73c12317ab6c313285cd938453202")
OLD_MESSAGE = b"Verifying that I am the owner of 5G9hQLdsKQswNPgB499DeA5PkFBbgkLPJWkkS6FAM6xGQ8xD. Hash: 221455a3\n"

NONCE = "9f" * 32


def test_alice_seed_derives_the_published_public_key_and_ss58() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    assert hk.public_key.hex() == ALICE_PUBLIC
    assert hk.ss58 == ALICE_SS58
    assert ss58_encode(bytes.fromhex(ALICE_PUBLIC)) == ALICE_SS58
    assert ss58_decode(ALICE_SS58).hex() == ALICE_PUBLIC


def test_alice_private_key_derives_the_same_hotkey_and_signs_for_it() -> None:
    hk = Hotkey.from_private_key_hex(ALICE_PRIVATE_KEY)
    assert hk.ss58 == ALICE_SS58
    msg = proof_message(hk.ss58, NONCE, b"{}")
    assert sr25519.verify(hk.sign(msg), msg, bytes.fromhex(ALICE_PUBLIC))


def test_published_polkadot_js_signature_verifies_with_the_same_primitive() -> None:
    public = ss58_decode(PJS_ADDRESS)
    assert sr25519.verify(bytes.fromhex(PJS_SIGNATURE), PJS_MESSAGE, public)
    assert not sr25519.verify(bytes.fromhex(PJS_SIGNATURE), PJS_MESSAGE + b"x", public)


def test_preaudit_signature_is_rejected_as_sp_core_rejects_it() -> None:
    # modern schnorrkel refuses it outright (no marker bit); verify_proof maps that refusal to False
    with pytest.raises(ValueError, match="not marked as a schnorrkel signature"):
        sr25519.verify(bytes.fromhex(OLD_SIGNATURE), OLD_MESSAGE, bytes.fromhex(OLD_PUBLIC))


def test_proof_message_is_ss58_nonce_and_body_sha256_hex() -> None:
    body = b'{"quote":"AAAA","vm_name":"vm-1","miner_hotkey":"x","first_boot":true}'
    expected = f"{ALICE_SS58}:{NONCE}:{hashlib.sha256(body).hexdigest()}".encode()
    assert proof_message(ALICE_SS58, NONCE, body) == expected
    assert proof_message(ALICE_SS58, NONCE, b"") == (
        f"{ALICE_SS58}:{NONCE}:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".encode())


def test_proof_headers_sign_the_exact_body_and_verify_with_the_library() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    body = json.dumps({"volumes": {"root": {"rotated": True}}}, separators=(",", ":")).encode()
    headers = proof_headers(hk, NONCE, body)
    assert set(headers) == {"X-Chutes-Hotkey", "X-Chutes-Nonce", "X-Chutes-Signature"}
    assert headers["X-Chutes-Hotkey"] == ALICE_SS58
    assert headers["X-Chutes-Nonce"] == NONCE
    sig = headers["X-Chutes-Signature"]
    assert len(sig) == 128 and sig == sig.lower() and bytes.fromhex(sig)
    # the library's own verification, over the message rebuilt from the exact bytes
    assert sr25519.verify(bytes.fromhex(sig), proof_message(ALICE_SS58, NONCE, body), hk.public_key)
    assert verify_proof(ALICE_SS58, NONCE, body, sig)
    # a re-serialised body (one extra space), another nonce, another hotkey: all rejected
    assert not verify_proof(ALICE_SS58, NONCE, body.replace(b":", b": ", 1), sig)
    assert not verify_proof(ALICE_SS58, "8f" * 32, body, sig)
    assert not verify_proof(PJS_ADDRESS, NONCE, body, sig)


def test_signatures_are_randomized_and_each_verifies() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    a = proof_headers(hk, NONCE, b"x")["X-Chutes-Signature"]
    b = proof_headers(hk, NONCE, b"x")["X-Chutes-Signature"]
    assert a != b
    assert verify_proof(ALICE_SS58, NONCE, b"x", a) and verify_proof(ALICE_SS58, NONCE, b"x", b)


@pytest.mark.parametrize("sig", ["", "zz" * 64, "ab" * 63, "ab" * 65, "00" * 64, "ff" * 64])
def test_verify_proof_is_false_for_malformed_signatures(sig: str) -> None:
    assert verify_proof(ALICE_SS58, NONCE, b"x", sig) is False


def test_verify_proof_is_false_for_a_bad_address() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    sig = proof_headers(hk, NONCE, b"x")["X-Chutes-Signature"]
    assert verify_proof(ALICE_SS58[:-1] + "Z", NONCE, b"x", sig) is False


def test_seed_parsing_trims_whitespace_and_accepts_bytes() -> None:
    assert Hotkey.from_seed_hex(f"  {ALICE_SEED}\n").ss58 == ALICE_SS58
    assert Hotkey.from_seed_hex(ALICE_SEED.upper().encode()).ss58 == ALICE_SS58
    buf = bytearray(ALICE_SEED.encode() + b"\n")
    assert Hotkey.from_seed_hex(buf).ss58 == ALICE_SS58


@pytest.mark.parametrize(("text", "message"), [
    ("0x" + ALICE_SEED, "miner-seed: must not have a 0x prefix"),
    (ALICE_SEED[:-2], "miner-seed: expected 64 hex characters, got 62"),
    (ALICE_SEED + "00", "miner-seed: expected 64 hex characters, got 66"),
    ("", "miner-seed: expected 64 hex characters, got 0"),
    (ALICE_SEED[:10] + "g" + ALICE_SEED[11:], "miner-seed: non-hex character at position 10"),
    (ALICE_SEED[:63] + "é", "miner-seed: non-hex character at position 63"),
])
def test_bad_seeds_fail_precisely_without_echoing_the_seed(text: str, message: str) -> None:
    with pytest.raises(KeyMaterialError) as exc:
        Hotkey.from_seed_hex(text)
    assert str(exc.value) == message
    assert ALICE_SEED[:16] not in repr(exc.value) and exc.value.__cause__ is None


def test_bad_private_keys_fail_precisely() -> None:
    with pytest.raises(KeyMaterialError, match=r"^miner-private-key: expected 128 hex characters, got 64$"):
        Hotkey.from_private_key_hex(ALICE_SEED)
    # a scalar that is not canonical (all 0xff) is refused by schnorrkel
    with pytest.raises(KeyMaterialError, match=r"^miner-private-key: not a valid sr25519 secret key$"):
        Hotkey.from_private_key_hex("ff" * 64)


def test_repr_str_and_pickle_never_show_the_secret() -> None:
    hk = Hotkey.from_private_key_hex(ALICE_PRIVATE_KEY)
    for text in (repr(hk), str(hk), f"{hk}"):
        assert ALICE_SS58 in text and "<redacted>" in text
        assert ALICE_PRIVATE_KEY[:16] not in text and ALICE_SEED[:16] not in text
    with pytest.raises(TypeError):
        pickle.dumps(hk)
    assert not hasattr(hk, "__dict__")


def test_wipe_zeroes_the_secret_buffer_and_blocks_signing() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    buf = hk._secret  # the very buffer that held the 64-byte secret
    assert bytes(buf).hex() == ALICE_PRIVATE_KEY
    hk.wipe()
    assert buf == bytearray() and hk.wiped
    with pytest.raises(WipedKeyError):
        proof_headers(hk, NONCE, b"x")
    assert hk.ss58 == ALICE_SS58  # the public identity stays usable for logs
    hk.wipe()  # idempotent


def test_ss58_decode_errors_are_precise() -> None:
    with pytest.raises(SS58Error, match=r"character '0' at position 3 is not in the base58 alphabet"):
        ss58_decode("5Gr0vaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY")
    with pytest.raises(SS58Error, match=r"character 'l' at position 0"):
        ss58_decode("l" + ALICE_SS58[1:])
    with pytest.raises(SS58Error, match="checksum mismatch"):
        ss58_decode(ALICE_SS58[:10] + ("A" if ALICE_SS58[10] != "A" else "B") + ALICE_SS58[11:])
    with pytest.raises(SS58Error, match=r"decodes to \d+ bytes, expected 35"):
        ss58_decode(ALICE_SS58[:-3])
    with pytest.raises(SS58Error, match="is empty"):
        ss58_decode("")
    # Polkadot (prefix 0) and Kusama (prefix 2) encodings of Alice's key: valid SS58, wrong network
    for prefix in (0, 2):
        other = ss58_encode(bytes.fromhex(ALICE_PUBLIC), prefix=prefix)
        assert other != ALICE_SS58
        with pytest.raises(SS58Error, match=rf"network prefix {prefix}, expected 42"):
            ss58_decode(other)


def test_ss58_checksum_is_blake2b_ss58pre() -> None:
    raw = base58.b58decode(ALICE_SS58)
    assert raw[0] == 42 and raw[1:33].hex() == ALICE_PUBLIC
    assert raw[33:] == hashlib.blake2b(b"SS58PRE" + raw[:33], digest_size=64).digest()[:2]


@pytest.mark.parametrize(("text", "ok"), [
    (ALICE_SS58, True),
    (PJS_ADDRESS, True),
    (ALICE_SS58[:10] + ("A" if ALICE_SS58[10] != "A" else "B") + ALICE_SS58[11:], False),  # shape ok, checksum not
    (ALICE_SS58 + "\n", False),
    (ALICE_SS58 + "; rm -rf /", False),
    ("5" + "1" * 38, False),  # 39 chars
    ("5" * 51, False),
    (ss58_encode(bytes.fromhex(ALICE_PUBLIC), prefix=2), False),
    ("", False),
])
def test_is_valid_validator_ss58(text: str, ok: bool) -> None:
    assert is_valid_validator_ss58(text) is ok


def test_is_valid_validator_ss58_requires_the_decode_not_just_the_shell_rule() -> None:
    # passes the sek8s shell rule (length, leading 5, alphabet) but is not an address
    fake = "5" + "A" * 47
    assert 40 <= len(fake) <= 50 and set(fake) <= set(proof.BASE58_ALPHABET)
    assert not is_valid_validator_ss58(fake)


def test_vm_auth_ss58_checksum_refused_in_the_boot_answer() -> None:
    """Issue 18 item 9: the boot answer's ``vm_auth_ss58`` is checked with its blake2b-512 checksum
    (``"SS58PRE" ‖ prefix ‖ key``, first 2 bytes) where it arrives, before any rotation."""
    from agent.validator.schemas import BootAttestationResponse, GenerationError, classify_generation

    raw = base58.b58decode(ALICE_SS58)
    flipped_raw = raw[:-1] + bytes([raw[-1] ^ 0x01])  # one checksum bit: same length, same prefix, same key
    flipped = base58.b58encode(flipped_raw).decode()
    assert flipped != ALICE_SS58 and len(flipped) == len(ALICE_SS58)
    assert proof.validator_ss58_problem(ALICE_SS58) is None
    assert proof.validator_ss58_problem(flipped) == "SS58 address checksum mismatch (typo in the address?)"
    assert proof.validator_ss58_problem("5" + "1" * 38) == "39 characters (expected 40-50, starting with 5)"

    def answer(ss58: str) -> BootAttestationResponse:
        return BootAttestationResponse.parse(json.dumps({
            "key": "k", "luks_quote_nonce": "cd" * 32, "root_next": "ef" * 64, "root_confirm_nonce": "01" * 32,
            "vm_auth_ss58": ss58}).encode())

    assert classify_generation(answer(ALICE_SS58)) == "1.4"
    with pytest.raises(GenerationError, match="'vm_auth_ss58' is not a valid SS58 address: SS58 address checksum"):
        classify_generation(answer(flipped))
    assert GenerationError.final  # the boot stops: no retry, no rotation


def test_check_cross() -> None:
    hk = Hotkey.from_seed_hex(ALICE_SEED)
    check_cross(hk, None)
    check_cross(hk, "  \n")
    check_cross(hk, ALICE_SS58 + "\n")
    with pytest.raises(HotkeyMismatchError, match=f"miner-ss58 {PJS_ADDRESS} does not match the hotkey {ALICE_SS58}"):
        check_cross(hk, PJS_ADDRESS)
    with pytest.raises(HotkeyMismatchError, match=r"miner-ss58 is not a valid SS58 address: .*checksum"):
        check_cross(hk, ALICE_SS58[:-1] + ("A" if ALICE_SS58[-1] != "A" else "B"))
