"""Issue 11 items 1-5 as attacks on the whole boot: redirects, TLS steered by the environment, a shifted
LUKS2 data window, and hostile network-config.yaml — each ends in TDX-LUKS-UNLOCK-FAILED, nothing unlocked."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from agent.boot import network
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.luks_header import LuksHeaderError, validate_metadata
from agent.log import Secret
from agent.sim.luks_image import make_config_volume, make_luks_image, tamper_luks2_metadata
from tests.boot.conftest import BootRig, RecordingCryptsetup, assert_never_unlocked
from tests.boot.scripted import ScriptedServer, json_answer, response

pytestmark = pytest.mark.integration


async def _scripted(tmp: Path) -> ScriptedServer:
    return await ScriptedServer(tmp / "hostile").start()


def _nonce_route(srv: ScriptedServer) -> None:
    import secrets

    srv.routes[("GET", "/servers/nonce")] = lambda r: json_answer(200, {"nonce": secrets.token_hex(32),
                                                                        "expires_at": "2030-01-01T00:00:00Z"})


async def test_redirected_attestation_never_reaches_plain_http(rig: BootRig) -> None:
    srv = await _scripted(rig.tmp)
    try:
        _nonce_route(srv)
        srv.routes[("POST", "/servers/boot/attestation")] = lambda r: response(
            307, b"", extra_headers={"Location": srv.plain_url + "/servers/boot/attestation"})
        rig.cfg.boot.validator_url, rig.cfg.boot.ca_bundle = srv.url, str(srv.tls.ca_pem)
        deps = rig.deps()
        deps.cryptsetup = RecordingCryptsetup(deps.cryptsetup)
        outcome = await rig.run(deps)
        assert_never_unlocked(rig, deps, outcome)
        reason = rig.failure_reason(outcome)
        assert "HTTP 307 (redirect to http://127.0.0.1 refused, never followed)" in reason
        assert bytes(srv.plain_bytes) == b""  # quote and X-Chutes-Nonce never went out in clear
        assert [r.method for r in srv.requests].count("POST") == rig.cfg.boot.max_attempts
    finally:
        await srv.stop()


async def test_redirected_cache_key_call_never_sends_the_boot_token_in_clear(rig: BootRig) -> None:
    srv = await _scripted(rig.tmp)
    token = "cd" * 32
    try:
        _nonce_route(srv)
        # A host-made "validator" that knows the root key (the worst case) and then redirects the cache-key call.
        srv.routes[("POST", "/servers/boot/attestation")] = lambda r: json_answer(
            200, {"key": rig.root_passphrase.reveal().decode(), "boot_token": token})
        redirect = lambda r: response(307, b"", extra_headers={"Location": srv.plain_url + r.path})  # noqa: E731
        srv.routes[("PUT", f"/servers/{rig.vm_name}/luks")] = redirect
        srv.routes[("GET", f"/servers/{rig.vm_name}/luks")] = redirect
        rig.cfg.boot.validator_url, rig.cfg.boot.ca_bundle = srv.url, str(srv.tls.ca_pem)
        rig.cfg.boot.legacy_cache_endpoints = True
        outcome = await rig.run()
        assert not outcome.ok
        assert "redirect to http://127.0.0.1 refused" in outcome.reason
        assert token.encode() not in bytes(srv.plain_bytes) and bytes(srv.plain_bytes) == b""
        assert not (Path(rig.cfg.boot.handoff_dir) / "boot-token").exists()
    finally:
        await srv.stop()


async def _run_cli(conf: Path, env_extra: dict[str, str]) -> tuple[int, str]:
    import os

    env = {**os.environ, **env_extra}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "--config", str(conf), "boot", "--no-poweroff",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, (out + err).decode()


def _cli_conf(rig: BootRig, url: str, ca_bundle: str) -> Path:
    b = rig.cfg.boot
    conf = rig.tmp / "agent-env.toml"
    conf.write_text(f"""
[quote]
source = "simulated"
simulated_state_dir = "{rig.tmp / 'sim'}"
[boot]
validator_url = "{url}"
{f'ca_bundle = "{ca_bundle}"' if ca_bundle else "# ca_bundle: the default (system bundle file)"}
network = "initramfs"
config_device = "{b.config_device}"
config_mount = "{b.config_mount}"
root_device = "{b.root_device}"
cache_enabled = false
header_dir = "{b.header_dir}"
handoff_dir = "{b.handoff_dir}"
kmsg_path = "{b.kmsg_path}"
unlock_action = "test-passphrase"
device_wait_s = 0
max_attempts = 1
[serve]
boot_status_path = "{rig.cfg.serve.boot_status_path}"
""")
    return conf


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
async def test_ssl_cert_env_cannot_make_boot_trust_a_host_server(rig: BootRig, variable: str) -> None:
    """A host-made CA on the kernel command line (init's environment) must not make boot trust a host server."""
    srv = await _scripted(rig.tmp)
    try:
        _nonce_route(srv)
        srv.routes[("POST", "/servers/boot/attestation")] = lambda r: json_answer(
            200, {"key": rig.root_passphrase.reveal().decode(), "boot_token": "ef" * 32})
        host_ca = srv.tls.ca_pem
        if variable == "SSL_CERT_DIR":  # an OpenSSL hashed directory holding the host CA
            import subprocess

            d = rig.tmp / "host-ca-dir"
            d.mkdir()
            (d / "host.pem").write_bytes(host_ca.read_bytes())
            subprocess.run(["openssl", "rehash", str(d)], check=True, capture_output=True)
            value = str(d)
        else:
            value = str(host_ca)
        # control: trusting the host CA through configuration, boot does talk to (and unlock with) it
        code, text = await _run_cli(_cli_conf(rig, srv.url, str(host_ca)), {})
        assert code == 0, text
        assert len(srv.requests) == 2
        srv.requests.clear()
        # attack: configuration keeps the default (the system bundle); the environment names the host CA
        code, text = await _run_cli(_cli_conf(rig, srv.url, ""),
                                    {variable: value, "OPENSSL_CONF": "/dev/null"})
        assert code != 0
        ignored = text.split("ignoring TLS-steering environment variables: ", 1)[1].splitlines()[0].split(", ")
        assert "OPENSSL_CONF" in ignored and variable in ignored
        assert "TDX-LUKS-UNLOCK-FAILED: attestation" in text and "TLS certificate rejected" in text
        assert srv.requests == []  # no HTTP request reached the host server
    finally:
        await srv.stop()


# --- LUKS2 data window (issue 11 item 4) ---------------------------------------------------------------

@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.update(offset=str(16777216 + 4 * 1024 * 1024)), "segments.0.offset: 20971520, expected 16777216"),
    (lambda s: s.update(iv_tweak="8192"), "segments.0.iv_tweak: '8192', expected '0'"),
    (lambda s: s.update(size="4194304"), "segments.0.size: '4194304', expected 'dynamic'"),
    (lambda s: s.update(sector_size=1024), "segments.0.sector_size: 1024 not approved"),
])
def test_shifted_data_window_is_refused_on_a_real_image(tmp_path: Path, mutate, message: str) -> None:
    img = tmp_path / "root.img"
    make_luks_image(str(img), Secret("pw"), size_mb=24)
    cs = Cryptsetup()
    assert validate_metadata(cs.dump_json(str(img)), img.read_bytes()[:4 << 20]).cipher == "aes-xts-plain64"
    tamper_luks2_metadata(str(img), lambda m: mutate(m["segments"]["0"]))
    meta = cs.dump_json(str(img))  # cryptsetup itself accepts the tampered header
    with pytest.raises(LuksHeaderError, match=message.replace("(", r"\(")):
        validate_metadata(meta, img.read_bytes()[:4 << 20])


def test_configured_data_offset(tmp_path: Path) -> None:
    img = tmp_path / "root.img"
    make_luks_image(str(img), Secret("pw"), size_mb=24)
    meta = Cryptsetup().dump_json(str(img))
    with pytest.raises(LuksHeaderError, match="expected 2097152"):
        validate_metadata(meta, data_offset=2 * 1024 * 1024)


async def test_boot_refuses_a_shifted_window(rig: BootRig) -> None:
    tamper_luks2_metadata(rig.cfg.boot.root_device,
                          lambda m: m["segments"]["0"].update(offset="20971520", iv_tweak="8192"))
    deps = rig.deps()
    deps.cryptsetup = RecordingCryptsetup(deps.cryptsetup)
    outcome = await rig.run(deps)
    assert_never_unlocked(rig, deps, outcome)
    assert "root volume header refused: segments.0.offset: 20971520, expected 16777216" in rig.failure_reason(outcome)


# --- network-config.yaml (issue 11 item 5) -------------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join(f"*a{i - 1}" for _ in range(9))
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\nnetwork: {ethernets: {enp0s2: {addresses: [10.0.0.2/24]}}}\n"


def test_alias_bomb_is_refused_fast() -> None:
    """Refused at the first anchor (line 1), before any alias is resolved: no clock needed, a bomb of 9^12
    nodes could not be expanded at all."""
    with pytest.raises(network.NetworkConfigError, match=r"anchors and aliases are not allowed \(line 1\)"):
        network.parse_netplan(_bomb(12))


@pytest.mark.parametrize(("value", "message"), [
    ('"fe80::1%eth0\\nnameserver 6.6.6.6"', "scope id"),
    ('"fe80::1%eth0 options rotate"', "scope id"),
    ('"9.9.9.9\\n"', "not an IP address"),
    ('"fe80::1%"', "scope id"),
])
def test_dns_values_are_checked_character_by_character(value: str, message: str) -> None:
    text = ("network:\n  ethernets:\n    enp0s2:\n      addresses: [10.0.0.2/24]\n"
            f"      nameservers:\n        addresses: [{value}]\n")
    with pytest.raises(network.NetworkConfigError, match=message):
        network.parse_netplan(text)


def test_scoped_ipv6_dns_is_written_cleanly(tmp_path: Path) -> None:
    text = ("network:\n  ethernets:\n    enp0s2:\n      addresses: [10.0.0.2/24]\n"
            "      nameservers:\n        addresses: [\"fe80::1%enp0s2\"]\n")
    plan = network.parse_netplan(text)
    network.apply(plan, str(tmp_path / "resolv.conf"), run=lambda argv: None)
    assert (tmp_path / "resolv.conf").read_text() == "nameserver fe80::1%enp0s2\n"


@pytest.mark.parametrize("doc", [
    "network: {ethernets: {'en\\nx': {addresses: [10.0.0.2/24]}}}",
    "network: {ethernets: {en0: {set-name: 'en0;reboot', addresses: [10.0.0.2/24]}}}",
    "network: {ethernets: {enp0s2: {addresses: ['10.0.0.2/24\\n']}}}",
    "network: {ethernets: {enp0s2: {addresses: [10.0.0.2/24], gateway4: '10.0.0.1 dev lo'}}}",
])
def test_interface_and_addresses_are_checked(doc: str) -> None:
    with pytest.raises(network.NetworkConfigError):
        network.parse_netplan(doc)


def test_document_size_and_depth_are_bounded() -> None:
    with pytest.raises(network.NetworkConfigError, match="larger than 65536 bytes"):
        network.parse_netplan("#" * 70_000)
    with pytest.raises(network.NetworkConfigError, match="nests deeper than 16"):
        network.parse_netplan("network: " + "[" * 40 + "]" * 40)


async def test_boot_refuses_an_alias_bomb_config_volume(rig: BootRig) -> None:
    make_config_volume(rig.cfg.boot.config_device, hostname=rig.vm_name, hotkey=rig.hotkey, network_yaml=_bomb())
    deps = rig.deps()
    deps.cryptsetup = RecordingCryptsetup(deps.cryptsetup)
    outcome = await rig.run(deps)
    assert_never_unlocked(rig, deps, outcome)
    assert rig.failure_reason(outcome).startswith("network: network-config.yaml: anchors and aliases")
    assert json.loads(Path(rig.cfg.serve.boot_status_path).read_text())["outcome"] == "failed"
