"""A real swtpm on loopback (fresh state from swtpm_setup, EK cert from a throw-away local CA)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from agent.config import AgentConfig
from agent.evidence import tpm
from agent.sim.swtpm import Swtpm, available


@pytest.fixture(scope="session")
def swtpm_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    assert available(), "swtpm and swtpm_setup are required (scripts/install-deps.sh installs swtpm, swtpm-tools)"
    sw = Swtpm(tmp_path_factory.mktemp("swtpm"))
    sw.setup()
    sw.start()
    yield sw
    tpm.close_session()
    sw.stop()


@pytest.fixture
def swtpm(swtpm_proc: Swtpm) -> Iterator[Swtpm]:
    """The shared swtpm, running (restarted on its port if a previous test killed it)."""
    if swtpm_proc.proc is None or swtpm_proc.proc.poll() is not None:
        swtpm_proc.kill()
        swtpm_proc.start()
    yield swtpm_proc
    tpm.close_session()


@pytest.fixture
def cfg(swtpm: Swtpm, tmp_path) -> AgentConfig:
    c = AgentConfig()
    c.tpm.tcti = swtpm.tcti
    c.tpm.event_log = str(tmp_path / "no-event-log")
    return c


def extend(cfg: AgentConfig, pcr: int, data: bytes) -> None:
    """TPM2_PCR_Extend(sha256(data)) through the agent's own ESAPI context (swtpm serves one client)."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    with tpm._LOCK:
        sess = tpm._session(cfg.tpm.tcti, cfg.tpm.ak_handle)
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=hashlib.sha256(data).digest()))
        sess.ctx.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), TPML_DIGEST_VALUES([digest]))
