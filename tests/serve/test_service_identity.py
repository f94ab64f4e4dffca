"""Service identity from the 1.4.0 boot hand-off (issue 14 item 1): the CA-signed proxy leaf is bound into
report_data, checked at start (chain to the VM root CA, key pair, key mode), and a failing hand-off never
falls back to a self-signed certificate. Older generations keep the self-signed pair."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from pathlib import Path

import pytest

from agent.config import ServeConfig
from agent.evidence.service_identity import HANDOFF, SELF_SIGNED, HandoffIdentityError, load_identity
from agent.quote import parse_quote
from tests.serve.certs_handoff import write_handoff
from tests.serve.helpers import spki_sha256_of, unix_client


def _serve_cfg(tmp: Path) -> ServeConfig:
    s = ServeConfig()
    s.cert_path = str(tmp / "etc" / "server.crt")
    s.key_path = str(tmp / "etc" / "server.key")
    s.handoff_cert_path = str(tmp / "proxy-tls" / "server.crt")
    s.handoff_key_path = str(tmp / "proxy-tls" / "server.key")
    s.vm_root_ca_path = str(tmp / "vm-root-ca" / "ca.crt")
    return s


def _handoff(s: ServeConfig, **kw):
    return write_handoff(s.handoff_cert_path, s.handoff_key_path, s.vm_root_ca_path, **kw)


@pytest.mark.parametrize("ca_extensions", [True, False])
@pytest.mark.parametrize("key_mode", [0o640, 0o600])
def test_handoff_leaf_is_the_identity(tmp_path: Path, ca_extensions: bool, key_mode: int) -> None:
    s = _serve_cfg(tmp_path)
    h = _handoff(s, ca_extensions=ca_extensions, key_mode=key_mode)
    cert = load_identity(s)
    assert cert.source == HANDOFF
    assert cert.spki_sha256 == spki_sha256_of(str(h.cert))  # independent SPKI hash of the leaf
    assert ("webpki" in cert.why) == ca_extensions and s.vm_root_ca_path in cert.why
    assert not Path(s.cert_path).exists() and not Path(s.key_path).exists()  # nothing self-signed made


def test_no_handoff_keeps_the_self_signed_pair(tmp_path: Path) -> None:
    s = _serve_cfg(tmp_path)
    cert = load_identity(s)
    assert cert.source == SELF_SIGNED and "pre-1.4.0" in cert.why
    assert cert.spki_sha256 == spki_sha256_of(s.cert_path)


@pytest.mark.parametrize("ca_extensions", [True, False])
def test_leaf_from_another_ca_is_refused(tmp_path: Path, ca_extensions: bool) -> None:
    s = _serve_cfg(tmp_path)
    _handoff(s, ca_extensions=ca_extensions, signer=2)  # same issuer name, another key: a forged leaf
    with pytest.raises(HandoffIdentityError, match=r"chain|not issued"):
        load_identity(s)
    assert not Path(s.cert_path).exists()


@pytest.mark.parametrize("ca_extensions", [True, False])
def test_expired_leaf_is_refused(tmp_path: Path, ca_extensions: bool) -> None:
    s = _serve_cfg(tmp_path)
    _handoff(s, ca_extensions=ca_extensions, not_after=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    with pytest.raises(HandoffIdentityError, match=r"valid|expired|chain"):
        load_identity(s)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_key_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    s = _serve_cfg(tmp_path)
    _handoff(s, key_mode=mode)
    with pytest.raises(HandoffIdentityError, match=f"mode 0{mode:o}"):
        load_identity(s)
    assert not Path(s.cert_path).exists()


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    s = _serve_cfg(tmp_path)
    _handoff(s, served_key=2)
    with pytest.raises(HandoffIdentityError, match="does not match"):
        load_identity(s)


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_partial_handoff_never_falls_back(tmp_path: Path, missing: str) -> None:
    s = _serve_cfg(tmp_path)
    h = _handoff(s)
    getattr(h, missing).unlink()
    with pytest.raises(HandoffIdentityError):
        load_identity(s)
    assert not Path(s.cert_path).exists() and not Path(s.key_path).exists()


async def test_service_binds_the_handoff_leaf(service_factory, short_tmp: Path) -> None:
    """End to end over the real compat socket: REPORTDATA[32:64] is the CA-signed leaf's SPKI hash."""
    h = write_handoff(str(short_tmp / "proxy-tls" / "server.crt"), str(short_tmp / "proxy-tls" / "server.key"),
                      str(short_tmp / "vm-root-ca" / "ca.crt"))
    svc = await service_factory()
    assert svc.ctx.measurements["service_identity"]["source"] == HANDOFF
    nonce = secrets.token_hex(32)
    async with unix_client(svc.cfg.serve.compat_socket) as c:
        body = await (await c.get("/attest", params={"nonce": nonce})).json()
    q = parse_quote(base64.b64decode(body["tdx_quote"]))
    assert bytes(q.report_data) == bytes.fromhex(nonce) + spki_sha256_of(str(h.cert))
    assert not Path(svc.cfg.serve.cert_path).exists()


def test_bad_handoff_never_reports_ready(short_tmp: Path, sim_dir: Path) -> None:
    """The real ``serve`` process: no READY=1, the reason in STATUS= and the journal, exit 3, no
    self-signed certificate, no sockets."""
    from tests.serve.helpers import make_cfg
    from tests.serve.proc import NotifyListener, spawn, stop

    cfg = make_cfg(short_tmp, sim_dir)
    s = cfg.serve
    write_handoff(s.handoff_cert_path, s.handoff_key_path, s.vm_root_ca_path, key_mode=0o644)
    notify = NotifyListener(short_tmp / "notify.sock")
    try:
        proc = spawn(cfg, short_tmp, env={"NOTIFY_SOCKET": notify.path})
        proc.wait(timeout=60)
        rc, out = stop(proc)
        notify.sock.settimeout(0.2)
        try:
            while True:
                notify.messages.append(notify.sock.recv(65536).decode())
        except TimeoutError:
            pass
    finally:
        notify.close()
    assert rc == 3, out
    assert not any("READY=1" in m.split("\n") for m in notify.messages)
    status = [m for m in notify.messages if "STATUS=start failed: service identity" in m]
    assert status and "mode 0644" in status[0], notify.messages
    assert "serve.start_failed" in out and "mode 0644" in out
    assert not Path(s.cert_path).exists() and not Path(s.compat_socket).exists()


def test_doctor_says_which_identity_and_why(short_tmp: Path, sim_dir: Path) -> None:
    from agent.commands.doctor import check_cert
    from tests.serve.helpers import make_cfg

    cfg = make_cfg(short_tmp, sim_dir)
    s = cfg.serve
    c = check_cert(cfg)  # nothing yet: the self-signed pair is made by serve, never by doctor
    assert c.status == "fail" and not Path(s.cert_path).exists()
    load_identity(s)
    c = check_cert(cfg)
    assert (c.status, c.detail.split(":")[0]) == ("ok", SELF_SIGNED) and "pre-1.4.0" in c.detail
    h = write_handoff(s.handoff_cert_path, s.handoff_key_path, s.vm_root_ca_path)
    c = check_cert(cfg)
    assert (c.status, c.detail.split(":")[0]) == ("ok", HANDOFF) and s.vm_root_ca_path in c.detail
    assert spki_sha256_of(str(h.cert)).hex()[:16] in c.detail
    h.key.chmod(0o644)
    c = check_cert(cfg)
    assert c.status == "fail" and "will not start" in c.detail and "0644" in c.detail
