"""The netplan subset applied with the real ``ip`` tool, inside a throw-away network namespace."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from agent.boot import network
from agent.sim.luks_image import DEFAULT_NETPLAN

pytestmark = pytest.mark.integration


@pytest.fixture
def netns() -> str:
    name = f"chutes-attest-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "enp0s2", "type", "veth", "peer", "name", "peer0"],
                       check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "peer0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_static_plan_applied_with_ip(netns: str, tmp_path: Path) -> None:
    present = subprocess.run(["ip", "-n", netns, "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in present.splitlines()]
    plan = network.parse_netplan(DEFAULT_NETPLAN, names)
    assert plan.interface == "enp0s2"

    def in_ns(argv: list[str]) -> None:
        network._run([argv[0], "-n", netns, *argv[1:]])

    resolv = tmp_path / "resolv.conf"
    network.apply(plan, str(resolv), run=in_ns)
    network.apply(plan, str(resolv), run=in_ns)  # idempotent: a retried boot does not trip over itself
    addrs = subprocess.run(["ip", "-n", netns, "-o", "addr", "show", "dev", "enp0s2"], capture_output=True,
                           text=True, check=True).stdout
    assert "inet 10.20.30.40/24" in addrs
    routes = subprocess.run(["ip", "-n", netns, "route", "show", "default"], capture_output=True, text=True,
                            check=True).stdout
    assert routes.startswith("default via 10.20.30.1 dev enp0s2")
    assert resolv.read_text() == "nameserver 1.1.1.1\nnameserver 8.8.8.8\n"


def test_ip_failure_names_the_command(netns: str, tmp_path: Path) -> None:
    plan = network.NetworkPlan("enp9s9", ["10.0.0.2/24"], None, [])

    def in_ns(argv: list[str]) -> None:
        network._run([argv[0], "-n", netns, *argv[1:]])

    with pytest.raises(network.NetworkConfigError, match=r"link set dev enp9s9 up: Cannot find device \"enp9s9\""):
        network.apply(plan, str(tmp_path / "r"), run=in_ns)
