"""A configured persistent AK (``tpm.ak_handle``) instead of the endorsement-hierarchy primary."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from agent.config import AgentConfig
from agent.evidence import tpm
from agent.evidence.tpm import TpmError, collect_tpm_evidence
from agent.evidence.tpm_verify import verify_tpm_evidence

pytestmark = pytest.mark.integration

RESTRICTED = 0x81000123
UNRESTRICTED = 0x81000124


def _persist(cfg: AgentConfig, handle: int, attrs: str) -> str:
    """Create an ECC P-256 key under the owner hierarchy and make it persistent; returns its PEM."""
    from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC

    with tpm._LOCK:
        ctx = tpm._session(cfg.tpm.tcti, 0).ctx
        template = TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs))
        tr, pub, *_ = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)
        ctx.evict_control(ESYS_TR.OWNER, tr, handle)
        ctx.flush_context(tr)
        return pub.to_pem().decode()


def _evict(cfg: AgentConfig, handle: int) -> None:
    from tpm2_pytss import ESYS_TR

    with tpm._LOCK:
        ctx = tpm._session(cfg.tpm.tcti, 0).ctx
        ctx.evict_control(ESYS_TR.OWNER, ctx.tr_from_tpmpublic(handle), handle)
    tpm.close_session()


@pytest.fixture
def persisted(cfg: AgentConfig) -> Iterator[dict[int, str]]:
    keys = {RESTRICTED: _persist(cfg, RESTRICTED, tpm.AK_ATTRIBUTES),
            UNRESTRICTED: _persist(cfg, UNRESTRICTED, "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign")}
    yield keys
    for handle in keys:
        _evict(cfg, handle)


def test_persistent_ak_signs_the_quote(cfg: AgentConfig, persisted: dict[int, str]) -> None:
    cfg.tpm.ak_handle = RESTRICTED
    nonce = os.urandom(32)
    ev = collect_tpm_evidence(cfg, nonce)
    assert ev is not None
    assert ev["ak_public"] == persisted[RESTRICTED]
    assert verify_tpm_evidence(ev, nonce).ok
    cfg.tpm.ak_handle = 0  # back to the endorsement primary: a different key
    other = collect_tpm_evidence(cfg, nonce)
    assert other is not None and other["ak_public"] != persisted[RESTRICTED]


def test_unrestricted_key_is_refused(cfg: AgentConfig, persisted: dict[int, str]) -> None:
    cfg.tpm.ak_handle = UNRESTRICTED
    with pytest.raises(TpmError, match=r"tpm\.ak_handle: 0x81000124 is not a restricted signing key"):
        collect_tpm_evidence(cfg, b"n" * 32)


def test_missing_persistent_handle_is_a_clear_error(cfg: AgentConfig) -> None:
    cfg.tpm.ak_handle = 0x81000199
    with pytest.raises(TpmError, match=r"tpm\.ak_handle: cannot load 0x81000199 from the TPM"):
        collect_tpm_evidence(cfg, b"n" * 32)
