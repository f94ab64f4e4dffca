"""Unit tests: names, netplan subset, retry policy, response schemas, mTLS identity, fail-closed output."""

from __future__ import annotations

import io
import os
import ssl

import pytest

from agent.boot import failure, network
from agent.boot.client_cert import ssl_context
from agent.boot.names import InvalidNameError, sanitize_vm_name, ss58_encode, validate_hotkey
from agent.boot.vm_ca import self_signed_rsa
from agent.evidence.report_data import spki_sha256
from agent.validator.errors import ValidatorHTTPError, ValidatorProtocolError, ValidatorTransportError
from agent.validator.retry import Action, RetryPolicy, parse_retry_after
from agent.validator.schemas import BootAttestationResponse, NonceResponse, VolumeKeyResponse

# --- names -------------------------------------------------------------------------------------------


def test_known_validator_hotkey_is_valid() -> None:
    hk = "5Dt7HZ7Zpw4DppPxFM7Ke3Cm7sDAWhsZXmM5ZAmE7dSVJbcQ"  # chutes-protocol.md §2.9
    assert validate_hotkey(hk + "\n") == hk


def test_hotkey_roundtrip_and_errors() -> None:
    hk = ss58_encode(bytes(range(32)))
    assert validate_hotkey(hk) == hk
    with pytest.raises(InvalidNameError, match="checksum mismatch"):
        validate_hotkey(hk[:-1] + ("a" if hk[-1] != "a" else "b"))
    with pytest.raises(InvalidNameError, match="not base58"):
        validate_hotkey("0OIl" + hk[4:])
    with pytest.raises(InvalidNameError, match="empty"):
        validate_hotkey("  \n")
    with pytest.raises(InvalidNameError, match="decodes to"):
        validate_hotkey("5Dt7HZ7Zpw4D")


def test_hotkey_first_64_chars() -> None:
    hk = ss58_encode(bytes(32))
    assert validate_hotkey(hk + " " * 30 + "garbage-after-64") == hk


def test_vm_name_sanitised() -> None:
    assert sanitize_vm_name(" my.vm/01_a-b\n") == "myvm01_a-b"
    with pytest.raises(InvalidNameError, match="hostname: empty"):
        sanitize_vm_name("../..")
    with pytest.raises(InvalidNameError, match="at most 63"):
        sanitize_vm_name("a" * 64)


# --- netplan ------------------------------------------------------------------------------------------

NETPLAN_GW4 = """
network:
  version: 2
  ethernets:
    lo0: {addresses: [127.0.0.2/8]}
    ens3:
      addresses:
        - 192.168.7.9/24
      gateway4: 192.168.7.1
      nameservers: {addresses: [9.9.9.9]}
"""

NETPLAN_MATCH = """
network:
  ethernets:
    id0:
      match: {name: "en*"}
      addresses: [10.0.0.2/16, "fd00::2/64"]
      routes: [{to: 0.0.0.0/0, via: 10.0.0.1}]
"""


def test_netplan_gateway4() -> None:
    plan = network.parse_netplan(NETPLAN_GW4)
    assert plan == network.NetworkPlan("ens3", ["192.168.7.9/24"], "192.168.7.1", ["9.9.9.9"])


def test_netplan_match_uses_present_interface() -> None:
    plan = network.parse_netplan(NETPLAN_MATCH, ["lo", "eth9", "enp1s0", "enp0s3"])
    assert plan.interface == "enp0s3"
    assert plan.addresses == ["10.0.0.2/16", "fd00::2/64"] and plan.gateway == "10.0.0.1"


@pytest.mark.parametrize(("text", "message"), [
    ("network: {ethernets: {ens3: {dhcp4: true}}}", "boot.network"),
    ("network: {ethernets: {ens3: {addresses: [300.1.1.1/24]}}}", "ens3.addresses: '300.1.1.1/24'"),
    ("network: {ethernets: {ens3: {addresses: [10.0.0.1/8], gateway4: nope}}}", "gateway: 'nope'"),
    ("network: {ethernets: {eth0: {addresses: [10.0.0.1/8]}}}", "no en* interface"),
    ("network: [", "not valid YAML"),
    ("network: {}", "network.ethernets: missing"),
])
def test_netplan_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(network.NetworkConfigError) as exc:
        network.parse_netplan(text)
    assert message in str(exc.value)


def test_network_apply_commands(tmp_path) -> None:
    seen: list[list[str]] = []
    plan = network.parse_netplan(NETPLAN_GW4)
    network.apply(plan, str(tmp_path / "resolv.conf"), run=seen.append)
    assert seen[-1] == ["ip", "route", "replace", "default", "via", "192.168.7.1", "dev", "ens3"]
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 9.9.9.9\n"


# --- retry policy --------------------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=4, total_timeout_s=100, backoff_s=1, backoff_max_s=10)


@pytest.mark.parametrize(("status", "action", "delay"), [
    (401, Action.STOP, 0.0), (403, Action.STOP, 0.0), (404, Action.STOP, 0.0),
    (500, Action.RETRY, 1.0), (502, Action.RETRY, 1.0), (400, Action.RETRY, 1.0), (307, Action.RETRY, 1.0),
    (429, Action.RETRY, 5.0),  # no Retry-After: 2 x attempt + backoff (reference §3.6)
])
def test_decision_by_status(status: int, action: Action, delay: float) -> None:
    d = POLICY.decide(ValidatorHTTPError("x", status), attempt=2, elapsed_s=0)
    assert (d.action, d.delay_s) == (action, delay)


def test_retry_after_honoured_and_capped() -> None:
    assert POLICY.decide(ValidatorHTTPError("x", 429, retry_after_s=7), 1, 0).delay_s == 7
    assert POLICY.decide(ValidatorHTTPError("x", 429, retry_after_s=60), 1, 0).delay_s == 60  # honoured in full
    assert POLICY.decide(ValidatorHTTPError("x", 429, retry_after_s=700), 1, 0).action is Action.STOP  # > budget


def test_bounds() -> None:
    assert POLICY.decide(ValidatorTransportError("x", "refused"), 4, 0).action is Action.STOP
    d = POLICY.decide(ValidatorTransportError("x", "refused"), 1, 99.5)
    assert d.action is Action.STOP and "total time budget" in d.why


def test_parse_retry_after() -> None:
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- schemas --------------------------------------------------------------------------------------------


def test_nonce_schema() -> None:
    n = NonceResponse.parse(b'{"nonce": "' + b"ab" * 32 + b'", "expires_at": "2026-01-01T00:00:00Z"}')
    assert n.nonce == "ab" * 32
    with pytest.raises(ValidatorProtocolError, match="field 'nonce' must be 64 lowercase hex"):
        NonceResponse.parse(b'{"nonce": "AB"}')
    with pytest.raises(ValidatorProtocolError, match="field 'nonce' missing"):
        NonceResponse.parse(b'{"expires_at": "x"}')
    with pytest.raises(ValidatorProtocolError, match="body is JSON list"):
        NonceResponse.parse(b"[]")


def test_boot_schema_generations_and_redaction() -> None:
    r = BootAttestationResponse.parse(b'{"key": "k3y", "boot_token": "t0k", "vm_auth_ss58": "5X", "extra": 1}')
    assert bytes(r.key.reveal()) == b"k3y" and r.fields_seen == ["boot_token", "extra", "key", "vm_auth_ss58"]
    assert "k3y" not in repr(r) and "t0k" not in repr(r)
    r.wipe()
    assert len(r.key) == 0 and r.boot_token is not None and len(r.boot_token) == 0
    newer = BootAttestationResponse.parse(b'{"key": "k", "luks_quote_nonce": "n"}')
    assert newer.boot_token is None and newer.luks_quote_nonce == "n"
    with pytest.raises(ValidatorProtocolError, match="field 'key' missing"):
        BootAttestationResponse.parse(b'{"boot_token": "t"}')
    with pytest.raises(ValidatorProtocolError, match="field 'boot_token' missing"):
        BootAttestationResponse.parse(b'{"key": "k"}')
    with pytest.raises(ValidatorProtocolError, match="not JSON"):
        BootAttestationResponse.parse(b'{"key": "k3y", "boot_t')


def test_protocol_error_never_echoes_the_body() -> None:
    with pytest.raises(ValidatorProtocolError) as exc:
        VolumeKeyResponse.parse("GET", b'{"passphrase": "s3cr3t-value", ')
    assert "s3cr3t" not in str(exc.value)


# --- mTLS identity ---------------------------------------------------------------------------------------


def test_identity_and_context_without_key_files(tmp_path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    ident = self_signed_rsa(2048)
    assert ident.cert.subject.rfc4514_string().startswith("CN=tdx-vm-")
    assert ident.spki_sha256 == spki_sha256(ident.cert_pem)
    ctx = ssl_context(ident)
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before, "memfds must be closed after loading"


def test_rsa_sizes_and_bad_size() -> None:
    assert self_signed_rsa(4096).key.key_size == 4096
    with pytest.raises(ValueError, match="bits"):
        self_signed_rsa(1024)


# --- fail closed ------------------------------------------------------------------------------------------


def test_announce_console_and_kmsg(tmp_path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.touch()
    out = io.StringIO()
    line = failure.announce("attestation: HTTP 404\n(VM not found)", str(kmsg), out)
    assert line == "TDX-LUKS-UNLOCK-FAILED: attestation: HTTP 404 (VM not found)"
    assert out.getvalue() == line + "\n"
    assert kmsg.read_text() == f"<2>chutes-attest: {line}\n"
    failure.announce("x", str(tmp_path / "missing-dir" / "kmsg"), out)  # unwritable kmsg is fine


def test_poweroff_refused_outside_initramfs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failure, "in_initramfs", lambda: False)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("must not power off")

    monkeypatch.setattr(failure.subprocess, "run", boom)
    monkeypatch.setattr(failure.ctypes, "CDLL", boom)
    out = io.StringIO()
    failure.power_off(False, out)
    assert "NOT powering off" in out.getvalue()


# --- fuzz: validator answers are parsed or refused with ValidatorProtocolError, nothing else -----------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_bodies = st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["nonce", "key", "boot_token", "passphrase", "luks_quote_nonce", "x"]), c, max_size=4),
    max_leaves=10,
).map(lambda v: __import__("json").dumps(v).encode())


@settings(max_examples=300, deadline=None)
@given(body=_bodies)
def test_schema_parsers_never_crash(body: bytes) -> None:
    for parse in (NonceResponse.parse, BootAttestationResponse.parse, lambda b: VolumeKeyResponse.parse("GET", b)):
        try:
            parse(body)
        except ValidatorProtocolError:
            pass


def test_deeply_nested_body() -> None:
    with pytest.raises(ValidatorProtocolError, match="body nests too deeply"):
        BootAttestationResponse.parse(b"[" * 200000)


_netplan_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from(
        ["10.0.0.2/24", "10.0.0.1", "default", "en*", "enp0s1"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["network", "ethernets", "enp0s1", "eth0", "addresses", "gateway4", "routes", "to", "via", "nameservers",
         "match", "name", "set-name", "dhcp4"]), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(doc=_netplan_values)
def test_netplan_parser_never_crashes(doc: object) -> None:
    import yaml

    try:
        network.parse_netplan(yaml.safe_dump(doc), ["enp0s1"])
    except network.NetworkConfigError:
        pass


def test_validator_parsers_only_raise_protocol_errors() -> None:
    """Hostile validator bodies end in the retry policy (ValidatorError), never in an internal crash."""
    from agent.validator.client import _detail
    from agent.validator.retry import parse_retry_after
    from agent.validator.schemas import BootAttestationResponse, VolumeKeyResponse

    assert _detail(b"[" * 100_000) == ""
    assert parse_retry_after("\u00b2") is None
    assert parse_retry_after("7") == 7.0
    with pytest.raises(ValidatorProtocolError, match="not valid Unicode"):
        BootAttestationResponse.parse(b'{"key": "\\ud800", "boot_token": "t"}')
    with pytest.raises(ValidatorProtocolError, match="not valid Unicode"):
        VolumeKeyResponse.parse("GET /servers/x/luks", b'{"passphrase": "a\\udfff"}')
    with pytest.raises(ValidatorProtocolError, match="nests too deeply"):
        BootAttestationResponse.parse(b"[" * 100_000)


def test_netplan_nesting_is_a_network_config_error() -> None:
    with pytest.raises(network.NetworkConfigError, match=r"nests (too deeply|deeper than)"):
        network.parse_netplan("network:\n  ethernets:\n    en0:\n      addresses: " + "[" * 5000 + "]" * 5000)


def test_config_volume_refuses_fifo_without_blocking(tmp_path) -> None:
    from agent.boot.config_volume import ConfigVolumeError, read_identity_from_dir

    os.mkfifo(tmp_path / "hostname")
    (tmp_path / "miner-ss58").write_text("x\n")
    with pytest.raises(ConfigVolumeError, match="'hostname' is not a regular file"):
        read_identity_from_dir(tmp_path)
