"""Static network setup from the config volume's netplan subset, applied with ``ip``.

Only what the host tooling writes is understood: the first ``ethernets`` entry whose name starts
with ``en`` (or whose ``match.name``/``set-name`` does), its ``addresses``, the default gateway
(``gateway4`` or a ``routes`` entry to ``default``/``0.0.0.0/0``) and ``nameservers.addresses``.
Anything that does not parse is an error naming the key. DHCP is left to initramfs-tools
(``boot.network = "initramfs"``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml


class NetworkConfigError(ValueError):
    """network-config.yaml is unusable; the message names the key."""


@dataclass(frozen=True)
class NetworkPlan:
    interface: str
    addresses: list[str]
    gateway: str | None
    nameservers: list[str] = field(default_factory=list)


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NetworkConfigError(f"network-config.yaml: {key}: expected a list")
    return value


def _pick_interface(name: str, entry: dict[str, Any], present: Sequence[str]) -> str | None:
    set_name = entry.get("set-name")
    if isinstance(set_name, str) and set_name.startswith("en"):
        return set_name
    if name.startswith("en") and ("*" not in name):
        return name
    match = entry.get("match") or {}
    pattern = match.get("name") if isinstance(match, dict) else None
    if isinstance(pattern, str) and pattern.startswith("en"):
        hits = sorted(n for n in present if fnmatch.fnmatch(n, pattern))
        return hits[0] if hits else None
    return None


def parse_netplan(text: str, present: Sequence[str] = ()) -> NetworkPlan:
    """The plan for the first ``en*`` ethernet; ``present`` = interface names on this machine."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise NetworkConfigError(f"network-config.yaml: not valid YAML ({exc.__class__.__name__})") from None
    except RecursionError:
        raise NetworkConfigError("network-config.yaml: nests too deeply") from None
    net = doc.get("network") if isinstance(doc, dict) else None
    eths = net.get("ethernets") if isinstance(net, dict) else None
    if not isinstance(eths, dict) or not eths:
        raise NetworkConfigError("network-config.yaml: network.ethernets: missing or empty")
    for name, entry in eths.items():
        entry = entry or {}
        if not isinstance(entry, dict):
            raise NetworkConfigError(f"network-config.yaml: network.ethernets.{name}: expected a mapping")
        iface = _pick_interface(str(name), entry, present)
        if iface is None:
            continue
        key = f"network.ethernets.{name}"
        if entry.get("dhcp4") is True and not entry.get("addresses"):
            raise NetworkConfigError(f"network-config.yaml: {key}.dhcp4: DHCP is handled by initramfs-tools; "
                                     "set boot.network = \"initramfs\"")
        addrs = []
        for a in _list(entry.get("addresses"), f"{key}.addresses"):
            try:
                addrs.append(str(ipaddress.ip_interface(str(a))))
            except ValueError:
                raise NetworkConfigError(
                    f"network-config.yaml: {key}.addresses: {a!r} is not an address/prefix") from None
        if not addrs:
            raise NetworkConfigError(f"network-config.yaml: {key}.addresses: no static address")
        gw = entry.get("gateway4")
        for r in _list(entry.get("routes"), f"{key}.routes"):
            if isinstance(r, dict) and str(r.get("to")) in ("default", "0.0.0.0/0") and gw is None:
                gw = r.get("via")
        if gw is not None:
            try:
                gw = str(ipaddress.ip_address(str(gw)))
            except ValueError:
                raise NetworkConfigError(f"network-config.yaml: {key}: gateway {gw!r} is not an IP address") from None
        ns_block = entry.get("nameservers") or {}
        if not isinstance(ns_block, dict):
            raise NetworkConfigError(f"network-config.yaml: {key}.nameservers: expected a mapping")
        servers = []
        for s in _list(ns_block.get("addresses"), f"{key}.nameservers.addresses"):
            try:
                servers.append(str(ipaddress.ip_address(str(s))))
            except ValueError:
                raise NetworkConfigError(
                    f"network-config.yaml: {key}.nameservers.addresses: {s!r} is not an IP") from None
        return NetworkPlan(iface, addrs, gw, servers)
    raise NetworkConfigError("network-config.yaml: no en* interface in network.ethernets")


def present_interfaces(sys_class_net: str = "/sys/class/net") -> list[str]:
    try:
        return sorted(os.listdir(sys_class_net))
    except OSError:
        return []


def commands(plan: NetworkPlan) -> list[list[str]]:
    """The ``ip`` invocations that apply ``plan`` (idempotent: ``replace``)."""
    cmds = [["ip", "link", "set", "dev", plan.interface, "up"]]
    cmds += [["ip", "addr", "replace", a, "dev", plan.interface] for a in plan.addresses]
    if plan.gateway:
        cmds.append(["ip", "route", "replace", "default", "via", plan.gateway, "dev", plan.interface])
    return cmds


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetworkConfigError(f"{' '.join(argv)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")


def apply(plan: NetworkPlan, resolv_conf: str, run: Callable[[list[str]], None] = _run) -> None:
    """Bring the interface up with its addresses, default route and resolvers."""
    for argv in commands(plan):
        run(argv)
    if plan.nameservers:
        tmp = resolv_conf + ".chutes-attest"
        with open(tmp, "w") as fh:
            fh.writelines(f"nameserver {s}\n" for s in plan.nameservers)
        os.replace(tmp, resolv_conf)
