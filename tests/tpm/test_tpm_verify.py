"""The self-check on hand-marshalled TPM structures signed with software keys (no TPM needed)."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.evidence.tpm_verify import (
    TPM_GENERATED_VALUE,
    TpmParseError,
    parse_attest,
    parse_signature,
    verify_tpm_evidence,
)

NONCE = bytes(range(32))
PCRS = {0: b"\x00" * 32, 7: b"\x07" * 32, 14: b"\x0e" * 32}
SHA256 = 0x000B


def tpm2b(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def attest(nonce: bytes = NONCE, pcrs: dict[int, bytes] = PCRS, magic: int = TPM_GENERATED_VALUE,
           typ: int = 0x8018, digest: bytes | None = None) -> bytes:
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    if digest is None:
        digest = hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest()
    return (struct.pack(">IH", magic, typ) + tpm2b(b"\x00\x0b" + b"\x55" * 32) + tpm2b(nonce)
            + struct.pack(">QIIB", 1234, 5, 6, 1) + struct.pack(">Q", 0x2019102300163636)
            + struct.pack(">IHB", 1, SHA256, 3) + bytes(bitmap) + tpm2b(digest))


def evidence(key, sig: bytes, att: bytes, pcrs: dict[int, bytes] = PCRS) -> dict:
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {"attest": base64.b64encode(att).decode(), "signature": base64.b64encode(sig).decode(),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in pcrs.items()}}, "ak_public": pem.decode(),
            "ek_certificate": None, "event_log": None}


def ecdsa_sig(key: ec.EllipticCurvePrivateKey, att: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(att, ec.ECDSA(hashes.SHA256())))
    return struct.pack(">HH", 0x0018, SHA256) + tpm2b(r.to_bytes(32, "big")) + tpm2b(s.to_bytes(32, "big"))


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_ecdsa_quote_verifies_and_reports_fields(ec_key) -> None:
    att = attest()
    result = verify_tpm_evidence(evidence(ec_key, ecdsa_sig(ec_key, att), att), NONCE)
    assert result.ok, result.to_dict()
    assert result.info["pcrs"] == "sha256:0,7,14" and result.info["clock"] == 1234
    assert result.info["reset_count"] == 5 and result.info["restart_count"] == 6
    assert result.attest is not None and result.attest.safe is True
    assert result.to_dict()["not_checked"] == ["ak_binding", "ek_chain", "pcr_policy", "event_log"]


@pytest.mark.parametrize(("alg", "pad"), [(0x0014, "pkcs1"), (0x0016, "pss")])
def test_rsa_quotes_verify(alg: int, pad: str) -> None:
    key = rsa.generate_private_key(65537, 2048)
    att = attest()
    scheme = (padding.PKCS1v15() if pad == "pkcs1"
              else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32))
    sig = struct.pack(">HH", alg, SHA256) + tpm2b(key.sign(att, scheme, hashes.SHA256()))
    assert verify_tpm_evidence(evidence(key, sig, att), NONCE).ok
    wrong = struct.pack(">HH", 0x0016 if alg == 0x0014 else 0x0014, SHA256) + sig[4:]
    assert [c.name for c in verify_tpm_evidence(evidence(key, wrong, att), NONCE).failed()] == ["signature"]


def test_signature_by_another_key_fails(ec_key) -> None:
    att = attest()
    other = ec.generate_private_key(ec.SECP256R1())
    result = verify_tpm_evidence(evidence(ec_key, ecdsa_sig(other, att), att), NONCE)
    assert [c.name for c in result.failed()] == ["signature"]
    assert result.failed()[0].detail == "signature does not verify with ak_public"


def test_ecdsa_signature_with_rsa_ak_names_the_mismatch(ec_key) -> None:
    att = attest()
    rsa_key = rsa.generate_private_key(65537, 2048)
    result = verify_tpm_evidence(evidence(rsa_key, ecdsa_sig(ec_key, att), att), NONCE)
    assert result.failed()[0].detail == "ak_public: ECDSA signature but the AK is not an EC key"


def test_non_tpm_generated_data_is_refused_even_if_signed(ec_key) -> None:
    """A restricted AK only signs TPM_GENERATED structures; anything else is not a quote."""
    att = attest(magic=0x12345678)
    result = verify_tpm_evidence(evidence(ec_key, ecdsa_sig(ec_key, att), att), NONCE)
    assert [c.name for c in result.failed()] == ["attest"]
    assert "not TPM_GENERATED_VALUE" in result.failed()[0].detail
    att = attest(typ=0x8017)  # TPM_ST_ATTEST_CERTIFY
    assert "not TPM_ST_ATTEST_QUOTE" in verify_tpm_evidence(
        evidence(ec_key, ecdsa_sig(ec_key, att), att), NONCE).failed()[0].detail


def test_quote_over_no_pcrs_fails(ec_key) -> None:
    att = attest(pcrs={})
    result = verify_tpm_evidence(evidence(ec_key, ecdsa_sig(ec_key, att), att, pcrs={}), NONCE)
    assert not result.ok


def test_wrong_digest_fails(ec_key) -> None:
    att = attest(digest=b"\x99" * 32)
    result = verify_tpm_evidence(evidence(ec_key, ecdsa_sig(ec_key, att), att), NONCE)
    assert [c.name for c in result.failed()] == ["pcr_digest"]


def test_parse_errors_name_the_field() -> None:
    att = attest()
    with pytest.raises(TpmParseError, match="attest: truncated in pcrDigest"):
        parse_attest(att[:-1])
    with pytest.raises(TpmParseError, match="attest: 1 trailing bytes"):
        parse_attest(att + b"\x00")
    with pytest.raises(TpmParseError, match="signature: unsupported sigAlg 0x0001"):
        parse_signature(struct.pack(">HH", 0x0001, SHA256))
    with pytest.raises(TpmParseError, match="signature: hash: unsupported hash algorithm 0x0099"):
        parse_signature(struct.pack(">HH", 0x0018, 0x0099))


@pytest.mark.parametrize(("mutate", "detail"), [
    (lambda e: e.pop("attest"), "attest: missing"),
    (lambda e: e.update(signature="not base64!"), "signature: not valid base64"),
    (lambda e: e.update(attest=""), "attest: expected a non-empty base64 string"),
    (lambda e: e.update(pcrs={"sha256": {"0": "00"}}), "pcrs.sha256.0: expected 64 hex characters"),
    (lambda e: e.update(pcrs={"sha256": {"x": "00" * 32}}), "pcrs.sha256.x: PCR index must be a decimal string"),
    (lambda e: e.update(pcrs={"md5": {}}), "pcrs.md5: unknown bank"),
    (lambda e: e.update(ak_public="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
     "ak_public: not a PEM public key"),
])
def test_malformed_evidence_is_a_failed_check_naming_the_field(ec_key, mutate, detail: str) -> None:
    att = attest()
    ev = evidence(ec_key, ecdsa_sig(ec_key, att), att)
    mutate(ev)
    result = verify_tpm_evidence(ev, NONCE)
    assert not result.ok and result.checks[0].name == "decode"
    assert result.checks[0].detail.startswith(detail)


def test_non_dict_evidence() -> None:
    assert verify_tpm_evidence(None, NONCE).checks[0].detail == "evidence: expected an object"  # type: ignore[arg-type]
