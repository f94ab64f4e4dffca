"""The in-process boot rigs' BootDeps: the production defaults with the network applied to a scratch
resolv.conf (no real interface touched) and retry back-off that does not wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.boot import network
from agent.boot.config_volume import BootIdentity
from agent.boot.flow import BootDeps, default_deps
from agent.config import AgentConfig


def rig_deps(cfg: AgentConfig, source: Any, console: Any, tmp: Path) -> BootDeps:
    d = default_deps(cfg, source, console=console)

    def setup_network(ident: BootIdentity) -> str:
        assert ident.network_yaml is not None
        plan = network.parse_netplan(ident.network_yaml, ["lo", "enp0s2"])
        network.apply(plan, str(tmp / "resolv.conf"), run=lambda argv: None)
        return plan.interface

    async def no_wait(_s: float) -> None:
        return None

    d.setup_network, d.sleep = setup_network, no_wait
    return d
