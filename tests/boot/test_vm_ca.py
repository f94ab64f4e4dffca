"""VM root CA and its leaves: subjects, extensions, serials, validity, file modes, chain verification with
cryptography's verifier, real TLS handshakes over loopback sockets, CA key deletion, off-loop generation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from agent.boot import vm_ca
from agent.boot.client_cert import ClientIdentity, ssl_context
from agent.certs import BACKDATE, issue, self_signed
from agent.evidence.report_data import spki_sha256


@pytest.fixture(scope="module")
def ca() -> ClientIdentity:
    """One RSA-4096 CA for the module (each costs ~0.5-2 s of CPU on this machine)."""
    return vm_ca.generate_vm_root_ca()


@pytest.fixture(scope="module")
def leaves(ca: ClientIdentity, tmp_path_factory: pytest.TempPathFactory) -> vm_ca.Leaves:
    run = tmp_path_factory.mktemp("run") / "chutes"
    return vm_ca.sign_leaves(ca, run, os.getgid(), owner_uid=os.getuid())


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def _rdn(cert: x509.Certificate) -> list[tuple[str, str]]:
    return [(a.oid._name, str(a.value)) for a in cert.subject]


def test_ca_subject_key_digest_validity_and_ca_extensions(ca: ClientIdentity) -> None:
    cert = ca.cert
    assert _rdn(cert) == [("organizationName", "chutes"), ("organizationalUnitName", "sek8s"),
                          ("commonName", "sek8s-vm-root-ca")]
    assert cert.issuer == cert.subject
    assert isinstance(ca.key, rsa.RSAPrivateKey) and ca.key.key_size == 4096
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    assert cert.version == x509.Version.v3
    # a year from issue (valid from BACKDATE before it): read off the certificate, not the clock at test time
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == vm_ca.VALIDITY + BACKDATE
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and ku.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed: the signature checks under its own key
    assert ca.spki_sha256 == spki_sha256(cert)


def test_each_boot_gets_a_fresh_ca(ca: ClientIdentity) -> None:
    other = vm_ca.start_vm_root_ca().result(timeout=120)
    assert other.spki_sha256 != ca.spki_sha256
    assert other.cert.subject == ca.cert.subject


def test_write_ca_files_and_modes(ca: ClientIdentity, tmp_path: Path) -> None:
    d = tmp_path / "chutes" / "vm-root-ca"
    vm_ca.write_ca(ca, d)
    assert _mode(d.parent) == 0o700 and _mode(d) == 0o700
    assert _mode(d / "ca.crt") == 0o644
    assert x509.load_pem_x509_certificate((d / "ca.crt").read_bytes()) == ca.cert
    # issue 18 item 9: the private key is never written (the leaves are signed from memory), no temp files
    assert sorted(os.listdir(d)) == ["ca.crt"]
    assert b"PRIVATE KEY" not in (d / "ca.crt").read_bytes()


def test_write_ca_shreds_a_stale_key_and_leaves_sign_without_any_key_file(ca: ClientIdentity,
                                                                          tmp_path: Path) -> None:
    run = tmp_path / "chutes"
    d = run / "vm-root-ca"
    d.mkdir(parents=True, mode=0o700)
    (d / "ca.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nstale\n")
    (d / "ca.srl").write_text("02\n")
    os.link(d / "ca.key", tmp_path / "inode-witness")
    vm_ca.write_ca(ca, d)
    assert sorted(os.listdir(d)) == ["ca.crt"]
    witness = (tmp_path / "inode-witness").read_bytes()
    assert witness == bytes(len(witness))  # overwritten, not only unlinked
    out = vm_ca.sign_leaves(ca, run, os.getgid(), owner_uid=os.getuid())
    assert not (d / "ca.key").exists()
    ca_cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    for crt in (out.proxy_dir / "server.crt", out.registry_dir / "client.crt"):
        x509.load_pem_x509_certificate(crt.read_bytes()).verify_directly_issued_by(ca_cert)
    assert vm_ca.delete_ca_key(d) == []  # nothing to delete: there never was a key file


def test_write_ca_refuses_a_symlinked_directory(ca: ClientIdentity, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "vm-root-ca").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(vm_ca.VMCAError, match="not a directory"):
        vm_ca.write_ca(ca, tmp_path / "vm-root-ca")
    assert os.listdir(tmp_path / "elsewhere") == []


def test_delete_ca_key_overwrites_removes_and_is_idempotent(ca: ClientIdentity, tmp_path: Path) -> None:
    d = tmp_path / "vm-root-ca"
    vm_ca.write_ca(ca, d)
    _plant_key(ca, d)
    (d / "ca.srl").write_text("02\n")
    # keep a second link to the key's inode: it shows the bytes were overwritten before the unlink
    os.link(d / "ca.key", tmp_path / "inode-witness")
    assert b"PRIVATE KEY" in (tmp_path / "inode-witness").read_bytes()
    assert vm_ca.delete_ca_key(d) == ["ca.key", "ca.srl"]
    assert sorted(os.listdir(d)) == ["ca.crt"]
    witness = (tmp_path / "inode-witness").read_bytes()
    assert witness and witness == bytes(len(witness))
    assert vm_ca.delete_ca_key(d) == []
    assert vm_ca.delete_ca_key(tmp_path / "never-created") == []


def test_ca_dir_stays_private(ca: ClientIdentity, tmp_path: Path) -> None:
    """vm-root-ca/ is 0700 and stays so once ca.key is gone (reference §7, §12.6): the service reads ca.crt
    through its unit's BindReadOnlyPaths=, never through the directory's mode."""
    d = tmp_path / "vm-root-ca"
    vm_ca.write_ca(ca, d)
    assert _mode(d) == 0o700 and _mode(d / "ca.crt") == 0o644
    vm_ca.delete_ca_key(d)
    assert _mode(d) == 0o700 and sorted(os.listdir(d)) == ["ca.crt"]


def test_remove_ca_removes_every_ca_file(ca: ClientIdentity, tmp_path: Path) -> None:
    d = tmp_path / "vm-root-ca"
    vm_ca.write_ca(ca, d)
    assert vm_ca.remove_ca(d) == ["ca.crt"]
    assert os.listdir(d) == []
    vm_ca.write_ca(ca, d)
    _plant_key(ca, d)
    assert sorted(vm_ca.remove_ca(d)) == ["ca.crt", "ca.key"]
    assert os.listdir(d) == []


def _plant_key(ca: ClientIdentity, d: Path) -> None:
    """A ``ca.key`` as sek8s (or an older agent) writes it: the agent itself never does."""
    pem = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    (d / "ca.key").write_bytes(pem)
    os.chmod(d / "ca.key", 0o600)


def test_proxy_leaf_fields(ca: ClientIdentity, leaves: vm_ca.Leaves) -> None:
    cert = leaves.proxy.cert
    assert _rdn(cert) == [("commonName", "attestation-service")]
    assert cert.issuer == ca.cert.subject and cert.serial_number == 1
    assert isinstance(leaves.proxy.key, rsa.RSAPrivateKey) and leaves.proxy.key.key_size == 2048
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["attestation-service", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_encipherment and ku.data_encipherment and ku.digital_signature
    assert not ku.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = cert.not_valid_after_utc - cert.not_valid_before_utc - BACKDATE  # from its issue, not from now
    assert vm_ca.VALIDITY - dt.timedelta(hours=1) < life <= vm_ca.VALIDITY  # issued within the CA's first hour
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_client_leaf_fields(ca: ClientIdentity, leaves: vm_ca.Leaves) -> None:
    cert = leaves.client.cert
    assert _rdn(cert) == [("organizationName", "chutes"), ("organizationalUnitName", "sek8s"),
                          ("commonName", "sek8s-cvm-mtls-client")]
    assert cert.issuer == ca.cert.subject and cert.serial_number == 2
    assert leaves.client.key.key_size == 2048  # type: ignore[union-attr]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    life = cert.not_valid_after_utc - cert.not_valid_before_utc - BACKDATE  # from its issue, not from now
    assert vm_ca.VALIDITY - dt.timedelta(hours=1) < life <= vm_ca.VALIDITY  # issued within the CA's first hour


def test_leaf_files_and_modes(leaves: vm_ca.Leaves) -> None:
    p, r = leaves.proxy_dir, leaves.registry_dir
    assert p.name == "proxy-tls" and r.name == "registry-tls" and p.parent == r.parent
    assert _mode(p) == 0o750 and _mode(p / "server.key") == 0o640 and _mode(p / "server.crt") == 0o640
    assert _mode(r) == 0o700 and _mode(r / "client.key") == 0o600 and _mode(r / "client.crt") == 0o644
    for f in (p, p / "server.key", p / "server.crt"):
        assert os.lstat(f).st_gid == os.getgid()
    assert x509.load_pem_x509_certificate((p / "server.crt").read_bytes()) == leaves.proxy.cert
    assert x509.load_pem_x509_certificate((r / "client.crt").read_bytes()) == leaves.client.cert
    k = serialization.load_pem_private_key((r / "client.key").read_bytes(), None)
    assert k.public_key().public_numbers() == leaves.client.key.public_key().public_numbers()  # type: ignore[union-attr]


def test_chain_verifies_with_cryptography_verifier(ca: ClientIdentity, leaves: vm_ca.Leaves) -> None:
    store = Store([ca.cert])
    server = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("attestation-service"))
    chain = server.verify(leaves.proxy.cert, [])
    assert chain[-1] == ca.cert
    PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(
        leaves.proxy.cert, [])
    # cryptography's client profile demands a SAN, which the reference client leaf does not carry; the
    # leaf's signature and issuer are checked directly here, and OpenSSL (what nginx and containerd use)
    # verifies the whole chain in the mTLS handshake test below.
    leaves.client.cert.verify_directly_issued_by(ca.cert)
    leaves.proxy.cert.verify_directly_issued_by(ca.cert)
    # the client leaf is not a server certificate, and a different CA does not anchor either leaf
    with pytest.raises(VerificationError):
        server.verify(leaves.client.cert, [])
    stranger = vm_ca.self_signed_rsa(2048, cn="stranger")
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([stranger.cert])).build_server_verifier(
            x509.DNSName("attestation-service")).verify(leaves.proxy.cert, [])


def _v1_like_ca() -> ClientIdentity:
    """What the reference's OPENSSL_CONF=/dev/null produces: same subject, no extensions (v3 without
    extensions is what cryptography can build; modern verifiers treat both the same)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ClientIdentity(key, self_signed(key, vm_ca.CA_SUBJECT, dt.timedelta(days=1)))


def test_a_ca_without_basic_constraints_does_not_anchor_under_a_modern_verifier() -> None:
    """Why the CA is v3 with CA:TRUE: the same leaf under an extension-less CA is refused."""
    bare = _v1_like_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation-service")]), key.public_key(),
                 bare.cert.subject, bare.key, dt.timedelta(days=1),
                 [(x509.SubjectAlternativeName([x509.DNSName("attestation-service")]), False)], 1)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([bare.cert])).build_server_verifier(
            x509.DNSName("attestation-service")).verify(leaf, [])


# ── real TLS over loopback ────────────────────────────────────────────────────


class OneShotServer:
    """A real TCP listener on loopback that completes one TLS handshake and echoes ``pong:<data>``."""

    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self.ctx = ctx
        self.host = host
        self.peer: bytes | None = None
        self.error: BaseException | None = None
        self._srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._srv.bind((host, 0))
        self._srv.listen(1)
        self.port = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn, _ = self._srv.accept()
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.peer = tls.getpeercert(binary_form=True)
                tls.sendall(b"pong:" + tls.recv(16))
        except (ssl.SSLError, OSError) as exc:
            self.error = exc

    def __enter__(self) -> OneShotServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(10)
        self._srv.close()


def _server_ctx(leaves: vm_ca.Leaves, version: ssl.TLSVersion, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(leaves.proxy_dir / "server.crt", leaves.proxy_dir / "server.key")
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


def _write_ca_crt(ca: ClientIdentity, tmp_path: Path) -> Path:
    p = tmp_path / "ca.crt"
    p.write_bytes(ca.cert_pem)
    return p


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize(("host", "sni"), [("127.0.0.1", "attestation-service"), ("127.0.0.1", "localhost"),
                                           ("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
def test_tls_handshake_with_proxy_leaf_verified_against_ca(
        ca: ClientIdentity, leaves: vm_ca.Leaves, tmp_path: Path, version: ssl.TLSVersion, host: str, sni: str) -> None:
    client = ssl.create_default_context(cafile=str(_write_ca_crt(ca, tmp_path)))
    client.minimum_version = client.maximum_version = version
    with OneShotServer(_server_ctx(leaves, version), host) as srv, \
            socket.create_connection((host, srv.port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname=sni) as tls:
        assert tls.version() == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
        assert tls.getpeercert(binary_form=True) == leaves.proxy.cert.public_bytes(serialization.Encoding.DER)
        tls.sendall(b"ping")
        assert tls.recv(16) == b"pong:ping"


def test_tls_handshake_rejects_a_wrong_name_and_a_foreign_ca(ca: ClientIdentity, leaves: vm_ca.Leaves,
                                                             tmp_path: Path) -> None:
    for sni, cafile in (("chutes.ai", _write_ca_crt(ca, tmp_path)), ("attestation-service", None)):
        client = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        with OneShotServer(_server_ctx(leaves, ssl.TLSVersion.TLSv1_3)) as srv, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                pytest.raises(ssl.SSLCertVerificationError):
            client.wrap_socket(raw, server_hostname=sni)


def test_mtls_with_client_leaf_and_with_the_ca_itself_as_boot_identity(ca: ClientIdentity, leaves: vm_ca.Leaves,
                                                                        tmp_path: Path) -> None:
    """The registry leaf chains to the CA as an mTLS client; the CA works as the boot client identity
    through the flow's own context builder (client_cert.ssl_context)."""
    cafile = _write_ca_crt(ca, tmp_path)
    for identity in (leaves.client, ca):
        client = ssl_context(identity, str(cafile))
        with OneShotServer(_server_ctx(leaves, ssl.TLSVersion.TLSv1_3, client_ca=cafile)) as srv:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                    client.wrap_socket(raw, server_hostname="attestation-service") as tls:
                tls.sendall(b"hi")
                assert tls.recv(16) == b"pong:hi"
        assert srv.error is None
        assert srv.peer == identity.cert.public_bytes(serialization.Encoding.DER)


def test_mtls_refuses_a_client_not_signed_by_the_ca(ca: ClientIdentity, leaves: vm_ca.Leaves, tmp_path: Path) -> None:
    cafile = _write_ca_crt(ca, tmp_path)
    stranger = vm_ca.self_signed_rsa(2048, cn="sek8s-cvm-mtls-client")
    client = ssl_context(stranger, str(cafile))
    with OneShotServer(_server_ctx(leaves, ssl.TLSVersion.TLSv1_3, client_ca=cafile)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname="attestation-service") as tls:
            with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.3: the alert arrives on first read
                tls.sendall(b"hi")
                tls.recv(16)
    assert isinstance(srv.error, ssl.SSLError) and "certificate" in str(srv.error)
    assert srv.peer is None


def test_reference_key_usage_without_digital_signature_also_handshakes_with_openssl(
        ca: ClientIdentity, tmp_path: Path) -> None:
    """Documents the choice: OpenSSL does not enforce digitalSignature for an RSA TLS 1.3 server, so the
    verbatim reference leaf works here; we add the bit because RFC 8446 requires it (stricter stacks)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = issue(vm_ca.name(vm_ca.PROXY_CN), key.public_key(), ca.cert.subject, ca.key, dt.timedelta(days=1), [
        (vm_ca._ku(key_encipherment=True, data_encipherment=True), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(list(vm_ca.PROXY_SANS)), False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False),
    ], 1)
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "s.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    client = ssl.create_default_context(cafile=str(_write_ca_crt(ca, tmp_path)))
    with OneShotServer(server) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="attestation-service") as tls:
        tls.sendall(b"x")
        assert tls.recv(16) == b"pong:x"


# ── off the event loop ───────────────────────────────────────────────────────


async def test_ca_generation_overlaps_the_event_loop() -> None:
    """The loop keeps ticking (1 ms sleeps) while the RSA-4096 search runs in its worker thread."""
    loop_thread = threading.get_ident()
    seen: list[int] = []

    loop_ticked = threading.Event()
    during: list[object] = []

    def gen() -> ClientIdentity:
        seen.append(threading.get_ident())
        during.append(loop_ticked.wait(60))
        during.append(ticks)
        identity = vm_ca.generate_vm_root_ca()
        during.append(ticks)
        return identity

    fut = asyncio.wrap_future(vm_ca.start_in_thread(gen))
    ticks = 0
    while not fut.done():
        await asyncio.sleep(0.001)
        ticks += 1
        if ticks == 3:
            loop_ticked.set()
    identity = await fut
    assert seen and seen[0] != loop_thread
    assert identity.key.key_size == 4096  # type: ignore[union-attr]
    # the worker waited for the loop to tick before its keygen: a loop blocked by the keygen never would
    assert during[0] is True, during
    # and the loop went on ticking while the key search ran (no timing: a count of ticks seen by the worker)
    assert during[2] > during[1], during


def test_start_vm_root_ca_with_an_executor_and_error_propagation() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = vm_ca.start_vm_root_ca(ex)
        assert fut.result(timeout=120).cert.subject == vm_ca.CA_SUBJECT

    def boom() -> None:
        raise RuntimeError("keygen failed")
    with pytest.raises(RuntimeError, match="keygen failed"):
        vm_ca.start_in_thread(boom).result(timeout=10)


def test_self_signed_rsa_for_older_generations() -> None:
    before = int(time.time())  # the epoch in the name and the expiry lie between these two readings
    ident = vm_ca.self_signed_rsa(2048)
    after = time.time()
    cert = ident.cert
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and cn.startswith("tdx-vm-") and before <= int(cn[7:]) <= after
    assert cert.issuer == cert.subject and ident.key.key_size == 2048  # type: ignore[union-attr]
    day = dt.timedelta(days=1).total_seconds()
    assert before + day <= cert.not_valid_after_utc.timestamp() <= after + day
    assert vm_ca.self_signed_rsa(2048, cn="tdx-vm-42").cert.subject.rfc4514_string() == "CN=tdx-vm-42"
    with pytest.raises(ValueError, match="bits"):
        vm_ca.self_signed_rsa(1024)


# ── as root: real ownership, and OpenSSL's own verifier ─────────────────────


@pytest.mark.integration
def test_as_root_leaf_owners_and_openssl_verify(ca: ClientIdentity, tmp_path: Path) -> None:
    gid = 4242  # a group id nobody here is in: proves the chown really happened
    out = vm_ca.sign_leaves(ca, tmp_path / "chutes", gid)
    for f in (out.proxy_dir, out.proxy_dir / "server.key", out.proxy_dir / "server.crt"):
        st = os.lstat(f)
        assert (st.st_uid, st.st_gid) == (0, gid), f
    for f in (out.registry_dir, out.registry_dir / "client.key", out.registry_dir / "client.crt"):
        assert os.lstat(f).st_uid == 0
    vm_ca.write_ca(ca, tmp_path / "chutes" / "vm-root-ca")
    cafile = tmp_path / "chutes" / "vm-root-ca" / "ca.crt"
    for crt, purpose in ((out.proxy_dir / "server.crt", "sslserver"), (out.registry_dir / "client.crt", "sslclient")):
        res = subprocess.run(["openssl", "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(cafile),
                              str(crt)], capture_output=True, text=True, check=False)
        assert res.returncode == 0 and res.stdout.strip().endswith(": OK"), res.stdout + res.stderr
    wrong = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(cafile),
                            str(out.registry_dir / "client.crt")], capture_output=True, text=True, check=False)
    assert wrong.returncode != 0
    vm_ca.delete_ca_key(cafile.parent)
    assert not (cafile.parent / "ca.key").exists()
