"""Fixtures: a real service (simulated quote source + emulated GPUs) on unix sockets in a temp dir."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.serve.server import Service
from tests.serve.helpers import make_cfg


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ca-") as d:
        yield Path(d)


@pytest.fixture
async def service_factory(short_tmp: Path, sim_dir: Path) -> AsyncIterator[Callable[..., Any]]:
    services: list[Service] = []

    async def make(**serve: Any) -> Service:
        svc = Service(make_cfg(short_tmp, sim_dir, **serve))
        services.append(svc)
        await svc.start()
        return svc

    yield make
    for svc in services:
        await svc.stop()


@pytest.fixture
async def service(service_factory: Callable[..., Any]) -> Service:
    return await service_factory()
