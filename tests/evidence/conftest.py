"""Fixtures for the evidence tests: the simulated PKI state (TDX PCK chain, AMD hierarchy) and the FUSE
kernel-interface emulators (configfs-tsm as tdx_guest or sev_guest, the measurement registers)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.quote_sim import SimPki, load_or_create_sim_pki


@pytest.fixture(scope="session")
def sim_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-state")


@pytest.fixture(scope="session")
def sim_pki(sim_state: Path) -> SimPki:
    return load_or_create_sim_pki(sim_state)


@pytest.fixture
def tsm(sim_state: Path, sim_pki: SimPki) -> Iterator[tuple[str, object]]:
    """A mounted configfs-tsm emulator; afterwards asserts no entry was left behind and it unmounted."""
    from agent.sim.tsm_emulator import mounted_tsm

    with mounted_tsm(str(sim_state)) as (mnt, faults):
        yield mnt, faults
        assert os.listdir(mnt) == [], "a configfs-tsm entry was left behind"
    assert not os.path.ismount(mnt)


@pytest.fixture
def measurements() -> Iterator[tuple[str, object]]:
    """A mounted tdx_guest measurements emulator (rtmrN:sha384 files)."""
    from agent.sim.tsm_mr_emulator import mounted_measurements

    with mounted_measurements() as (mnt, state):
        yield mnt, state
    assert not os.path.ismount(mnt)


@pytest.fixture
def snp_tsm(sim_state: Path) -> Iterator[tuple[str, object]]:
    """A mounted configfs-tsm emulator with provider ``sev_guest`` (simulated Genoa reports, empty auxblob);
    afterwards asserts no entry was left behind and it unmounted."""
    from agent.sim.tsm_emulator import mounted_tsm

    with mounted_tsm(str(sim_state), provider="sev_guest") as (mnt, faults):
        yield mnt, faults
        assert os.listdir(mnt) == [], "a configfs-tsm entry was left behind"
    assert not os.path.ismount(mnt)
