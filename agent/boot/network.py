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

from agent.errors import BadInputError


class NetworkConfigError(BadInputError, ValueError):
    """network-config.yaml is unusable; the message names the key."""


#: Size and nesting bounds for the host-supplied document (netplan needs 5 levels; 16 leaves room).
MAX_DOCUMENT_BYTES = 64 * 1024
MAX_DEPTH = 16
MAX_NODES = 4096
_IFNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ADDR_CHARS = frozenset("0123456789abcdefABCDEF:./")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (no "billion laughs") and bounds depth and node count.

    Checked on the event stream, before any node is built, so a hostile document costs at most
    ``MAX_NODES`` events of work.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise NetworkConfigError(f"network-config.yaml: anchors and aliases are not allowed "
                                     f"(line {event.start_mark.line + 1})")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise NetworkConfigError(f"network-config.yaml: more than {MAX_NODES} nodes")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise NetworkConfigError(f"network-config.yaml: nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_document(text: str) -> Any:
    """Parse the bounded netplan document (size, depth, node count; no anchors/aliases, no tags)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise NetworkConfigError(f"network-config.yaml: larger than {MAX_DOCUMENT_BYTES} bytes")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise NetworkConfigError(f"network-config.yaml: not valid YAML ({exc.__class__.__name__})") from None
    except RecursionError:
        raise NetworkConfigError("network-config.yaml: nests too deeply") from None
    finally:
        loader.dispose()


def check_ifname(name: str, key: str) -> str:
    """A Linux interface name: 1-15 of ``[A-Za-z0-9_.-]``, not ``.``/``..`` (it goes into ``ip`` argv)."""
    if not 1 <= len(name) <= 15 or any(c not in _IFNAME_CHARS for c in name) or name in (".", ".."):
        raise NetworkConfigError(f"network-config.yaml: {key}: {name!r} is not a valid interface name")
    return name


def _ip(value: Any, key: str, *, interface: bool = False) -> str:
    """An IPv4/IPv6 address (or address/prefix) checked character by character, scope id included.

    ``ipaddress`` accepts any text after ``%`` as an IPv6 scope id (newlines too), and these values are
    written into resolv.conf and passed to ``ip``: only hex digits, ``:``, ``.``, ``/`` and an interface
    name after ``%`` get through.
    """
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise NetworkConfigError(f"network-config.yaml: {key}: {value!r} is not an IP address")
    text = str(value)
    base, pct, scope = text.partition("%")
    if pct:
        scope, slash, prefix = scope.partition("/")
        check_ifname(scope, f"{key} (scope id)")
        base = base + slash + prefix
    if not base or any(c not in _ADDR_CHARS for c in base):
        raise NetworkConfigError(f"network-config.yaml: {key}: {text!r} is not an IP address")
    try:
        parsed = str(ipaddress.ip_interface(text) if interface else ipaddress.ip_address(text))
    except ValueError:
        what = "an address/prefix" if interface else "an IP address"
        raise NetworkConfigError(f"network-config.yaml: {key}: {text!r} is not {what}") from None
    if any(c not in _ADDR_CHARS and c not in _IFNAME_CHARS and c != "%" for c in parsed):
        raise NetworkConfigError(f"network-config.yaml: {key}: {text!r} is not an IP address")
    return parsed


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
        return check_ifname(set_name, f"network.ethernets.{name}.set-name")
    if name.startswith("en") and ("*" not in name):
        return check_ifname(name, "network.ethernets")
    match = entry.get("match") or {}
    pattern = match.get("name") if isinstance(match, dict) else None
    if isinstance(pattern, str) and pattern.startswith("en"):
        hits = sorted(n for n in present if fnmatch.fnmatchcase(n, pattern))
        return check_ifname(hits[0], f"network.ethernets.{name}.match.name") if hits else None
    return None


def parse_netplan(text: str, present: Sequence[str] = ()) -> NetworkPlan:
    """The plan for the first ``en*`` ethernet; ``present`` = interface names on this machine."""
    doc = load_document(text)
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
        addrs = [_ip(a, f"{key}.addresses", interface=True)
                 for a in _list(entry.get("addresses"), f"{key}.addresses")]
        if not addrs:
            raise NetworkConfigError(f"network-config.yaml: {key}.addresses: no static address")
        gw = entry.get("gateway4")
        for r in _list(entry.get("routes"), f"{key}.routes"):
            if isinstance(r, dict) and str(r.get("to")) in ("default", "0.0.0.0/0") and gw is None:
                gw = r.get("via")
        if gw is not None:
            gw = _ip(gw, f"{key} gateway")
        ns_block = entry.get("nameservers") or {}
        if not isinstance(ns_block, dict):
            raise NetworkConfigError(f"network-config.yaml: {key}.nameservers: expected a mapping")
        servers = [_ip(s, f"{key}.nameservers.addresses")
                   for s in _list(ns_block.get("addresses"), f"{key}.nameservers.addresses")]
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
    for value in (plan.interface, *plan.addresses, plan.gateway or "", *plan.nameservers):
        if any(c not in _ADDR_CHARS and c not in _IFNAME_CHARS and c != "%" for c in value):
            raise NetworkConfigError(f"network plan: {value!r} has characters no address or interface name has")
    if plan.nameservers:
        tmp = resolv_conf + ".chutes-attest"
        with open(tmp, "w") as fh:
            fh.writelines(f"nameserver {s}\n" for s in plan.nameservers)
        os.replace(tmp, resolv_conf)
