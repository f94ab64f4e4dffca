"""Per-boot VM root CA (1.4.0) and the two leaves it signs (chutes-vm-generations.md §7, sek8s setup_vm_tls).

The CA is the mTLS client identity of every 1.4.0 initramfs call (the validator stores it from
``/provision`` as ``vm_root_ca_cert``), then signs the attestation-proxy TLS server leaf and the CVM
mTLS client leaf. Its private key lives only in this process's memory: ``ca.key`` is never written
(see :func:`write_ca`); :func:`delete_ca_key` still shreds any ``ca.key``/``ca.srl`` found there.

Choices where we differ from the shell original, on purpose:

- **X.509 v3 with ``basicConstraints CA:TRUE``.** sek8s builds the CA with ``OPENSSL_CONF=/dev/null``,
  which on OpenSSL 3.0 gives a v1 certificate without extensions (inferred). OpenSSL still accepts a
  self-signed v1 root as a trust anchor, but modern verifiers (cryptography's, rustls/webpki, Go with
  strict settings) refuse to chain a leaf under a certificate that does not say it is a CA. We add
  ``basicConstraints CA:TRUE, pathlen:0`` (critical), ``keyUsage keyCertSign, cRLSign, digitalSignature``
  (the last because the CA also signs TLS CertificateVerify as the boot client) and a subject key id;
  the leaves carry the matching authority key id. Subject, key type/size, digest and validity are as
  the reference says. The validator only hashes the SPKI and verifies leaves against the CA, which
  both forms satisfy.
- **Proxy leaf keyUsage adds ``digitalSignature``** to the reference's keyEncipherment +
  dataEncipherment. With TLS 1.3 (and TLS 1.2 ECDHE-RSA) an RSA server key is only ever used to sign
  the handshake; RFC 8446 §4.4.2.2 requires the certificate to permit signing when keyUsage is present.
  OpenSSL happens not to enforce it (tests show both variants handshake), stricter stacks may, so the
  leaf says what it is used for.
- Keys are generated with ``cryptography`` in-process (no ``openssl`` subprocess, no CSR/config scratch
  files in /tmp), and RSA-4096 generation runs in a worker thread (:func:`start_vm_root_ca`): OpenSSL
  releases the GIL while it searches for primes, so the flow overlaps it with config volume + network.

Limits: a private key held by ``cryptography`` cannot be zeroed from Python; the PEM serialisations we
make are ``bytearray`` copies that are zeroed after the write, the one ``bytes`` the library returns is
freed, not cleared.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import ipaddress
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.boot.client_cert import ClientIdentity
from agent.certs import issue, name, self_signed
from agent.errors import AgentError
from agent.fsutil import ensure_dir, write_atomic
from agent.log import get_logger

log = get_logger(__name__)

RUN_DIR = "/run/chutes"
CA_SUBDIR = "vm-root-ca"
PROXY_SUBDIR = "proxy-tls"
REGISTRY_SUBDIR = "registry-tls"
CA_DIR = f"{RUN_DIR}/{CA_SUBDIR}"

CA_KEY_BITS = 4096
LEAF_KEY_BITS = 2048
VALIDITY = dt.timedelta(days=365)
CA_SUBJECT = name("sek8s-vm-root-ca", organization="chutes", unit="sek8s")
PROXY_CN = "attestation-service"
PROXY_SERIAL = 1
CLIENT_SUBJECT = name("sek8s-cvm-mtls-client", organization="chutes", unit="sek8s")
CLIENT_SERIAL = 2
PROXY_SANS = (
    x509.DNSName("attestation-service"),
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)

T = TypeVar("T")


class VMCAError(AgentError, OSError):
    """Writing or deleting CA / leaf files failed; ``str`` names the path and the cause, never key material."""

    reason = "vm_ca"


def generate_leaf_key() -> rsa.RSAPrivateKey:
    """One RSA-2048 leaf key (started ahead in a worker thread by the boot flow)."""
    return _rsa(LEAF_KEY_BITS)


def _rsa(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _ku(*, digital_signature: bool = False, key_encipherment: bool = False, data_encipherment: bool = False,
        key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=data_encipherment,
                         key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=crl_sign,
                         encipher_only=False, decipher_only=False)


# ── Generation ────────────────────────────────────────────────────────────────


def generate_vm_root_ca() -> ClientIdentity:
    """A fresh RSA-4096 CA, self-signed SHA-256, ``O=chutes, OU=sek8s, CN=sek8s-vm-root-ca``, 365 days."""
    key = _rsa(CA_KEY_BITS)
    cert = self_signed(key, CA_SUBJECT, VALIDITY, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_ku(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
    ])
    return ClientIdentity(key, cert)


def self_signed_rsa(bits: int, cn: str | None = None, lifetime: dt.timedelta = dt.timedelta(days=1)) -> ClientIdentity:
    """The ≤1.3 boot client identity: self-signed RSA (2048 for ≤1.2, 4096 for 1.3.x), SHA-256, 1 day,
    ``CN=tdx-vm-<epoch>`` (§4.1, §4.2)."""
    if bits not in (2048, 3072, 4096):
        raise ValueError(f"bits: expected 2048, 3072 or 4096, got {bits}")
    key = _rsa(bits)
    cert = self_signed(key, cn or f"tdx-vm-{int(time.time())}", lifetime,
                       [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    return ClientIdentity(key, cert)


def start_in_thread(fn: Callable[..., T], *args: object,
                    executor: concurrent.futures.Executor | None = None) -> concurrent.futures.Future[T]:
    """Run ``fn(*args)`` off the event loop; ``asyncio.wrap_future`` the result to await it.

    Without an executor a daemon thread is used, so a boot that fails before it needs the result can
    exit without waiting for the key search to finish.
    """
    if executor is not None:
        return executor.submit(fn, *args)
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=run, name=f"keygen-{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return future


def start_vm_root_ca(executor: concurrent.futures.Executor | None = None) -> concurrent.futures.Future[ClientIdentity]:
    """Start :func:`generate_vm_root_ca` in a worker thread (RSA keygen releases the GIL in OpenSSL)."""
    return start_in_thread(generate_vm_root_ca, executor=executor)


def start_boot_identity(protocol: str) -> concurrent.futures.Future[ClientIdentity]:
    """Start the boot client key off the event loop, so RSA key generation overlaps what precedes the first call.

    1.4 / auto: the VM root CA (RSA-4096; in auto it is also the client identity if the validator turns
    out to speak 1.3 or 1.2: the validator only hashes its SPKI); 1.3: self-signed RSA-4096; 1.2:
    self-signed RSA-2048 (reference §10). Light on imports, so ``chutes-attest boot`` calls it before the
    flow's heavy imports.
    """
    if protocol in ("auto", "1.4"):
        return start_vm_root_ca()
    return start_in_thread(self_signed_rsa, 4096 if protocol == "1.3" else 2048)


# ── Files ─────────────────────────────────────────────────────────────────────


def _ensure_dir(path: Path, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    try:
        ensure_dir(path, mode, uid, gid)
    except OSError as exc:
        raise VMCAError(f"{path}: {exc.strerror or exc}") from None


def _key_pem(key: rsa.RSAPrivateKey) -> bytearray:
    return bytearray(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write(path: Path, data: bytes | bytearray, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    """``write_atomic`` (+ owner). A cut write leaves no scratch copy of the key: write_atomic zeroes and
    removes its own temp file on failure."""
    try:
        write_atomic(path, data, mode)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
    except OSError as exc:
        raise VMCAError(f"{path}: {exc.strerror or exc}") from None
    finally:
        if isinstance(data, bytearray):
            data[:] = bytes(len(data))


def _ensure_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        _ensure_dir(run_dir, 0o700)


def write_ca(ca: ClientIdentity, directory: str | os.PathLike[str] = CA_DIR) -> None:
    """``ca.crt`` (0644) in ``directory``, written crash-safe. The private key is never written.

    sek8s writes ``ca.key`` (0600) because two shell scripts share it: premount makes the CA, init-bottom's
    ``setup_vm_tls`` signs the leaves with it and then deletes it (§7). Here one process does both and
    signs the leaves from the key it holds in memory (:func:`sign_leaves`); nothing would read the file
    back, so writing it would only expose the key (a crash or SIGKILL before the delete leaves it on the
    tmpfs that moves into the real root). The state the reference requires after the boot — ``ca.crt``
    present, ``ca.key``/``ca.srl`` absent — is the same. Any stale ``ca.key``/``ca.srl`` is shredded here.
    """
    d = Path(directory)
    _ensure_run_dir(d.parent)
    _ensure_dir(d, 0o700)
    try:
        delete_ca_key(d)  # nothing from an earlier writer survives next to the new certificate
        _write(d / "ca.crt", ca.cert_pem, 0o644)
    except VMCAError:
        # The flow removes CA files only once write_ca returned: a half-written CA leaves nothing behind.
        with contextlib.suppress(OSError):
            remove_ca(d)
        raise
    log.info("boot.vm_ca.written", directory=str(d), spki_sha256=ca.spki_sha256.hex())


def _shred(path: Path) -> bool:
    """Overwrite a regular file with zeros, fsync, unlink; a symlink is only unlinked. True if removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode) and st.st_size:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                zeros = bytes(min(st.st_size, 1 << 16))
                left = st.st_size
                while left > 0:
                    left -= os.write(fd, zeros[:left])
                os.fsync(fd)
            except OSError:
                pass  # still unlink below: removing the name matters more than the overwrite
            finally:
                os.close(fd)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def delete_ca_key(directory: str | os.PathLike[str] = CA_DIR) -> list[str]:
    """Overwrite then remove ``ca.key`` and ``ca.srl``; idempotent, safe on every failure path.

    Returns the names it removed. Raises :class:`VMCAError` only when a file exists and cannot be
    unlinked (then the caller must fail closed: the key would survive into the real root).
    """
    removed = []
    for fname in ("ca.key", "ca.srl"):
        path = Path(directory) / fname
        try:
            if _shred(path):
                removed.append(fname)
        except OSError as exc:
            raise VMCAError(f"{path}: cannot delete: {exc.strerror or exc}") from None
    if removed:
        log.info("boot.vm_ca.key_deleted", directory=str(directory), removed=removed)
    return removed


def remove_ca(directory: str | os.PathLike[str] = CA_DIR) -> list[str]:
    """Premount failure: remove every CA file (key, serial, certificate), as fetch_key_and_unlock does."""
    removed = delete_ca_key(directory)
    if _shred(Path(directory) / "ca.crt"):
        removed.append("ca.crt")
    return removed


# ── Leaves ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Leaves:
    """What :func:`sign_leaves` wrote (the keys are kept for tests and the flow's own TLS checks)."""

    proxy: ClientIdentity
    client: ClientIdentity
    proxy_dir: Path
    registry_dir: Path


def _leaf_lifetime(ca: ClientIdentity) -> dt.timedelta:
    """365 days, but never past the CA's own notAfter (a leaf outliving its issuer would not verify)."""
    now = dt.datetime.now(dt.UTC)
    return min(VALIDITY, ca.cert.not_valid_after_utc - now)


def _sign(ca: ClientIdentity, subject: x509.Name, serial: int,
          extensions: list[tuple[x509.ExtensionType, bool]], key: rsa.RSAPrivateKey | None = None) -> ClientIdentity:
    key = key if key is not None else _rsa(LEAF_KEY_BITS)
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    extensions = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        *extensions,
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
        (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False),
    ]
    cert = issue(subject, key.public_key(), ca.cert.subject, ca.key, _leaf_lifetime(ca), extensions, serial)
    return ClientIdentity(key, cert)


def make_proxy_leaf(ca: ClientIdentity, key: rsa.RSAPrivateKey | None = None) -> ClientIdentity:
    """Attestation-proxy TLS server leaf: RSA-2048, CN=attestation-service, SANs, serverAuth, serial 1."""
    return _sign(ca, name(PROXY_CN), PROXY_SERIAL, [
        (_ku(digital_signature=True, key_encipherment=True, data_encipherment=True), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName(list(PROXY_SANS)), False),
    ], key)


def make_client_leaf(ca: ClientIdentity, key: rsa.RSAPrivateKey | None = None) -> ClientIdentity:
    """CVM mTLS client leaf: RSA-2048, O=chutes, OU=sek8s, CN=sek8s-cvm-mtls-client, clientAuth, serial 2."""
    return _sign(ca, CLIENT_SUBJECT, CLIENT_SERIAL, [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ], key)


def sign_leaves(ca: ClientIdentity, run_dir: str | os.PathLike[str], tdx_attest_gid: int, *,
                owner_uid: int = 0,
                leaf_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey] | None = None) -> Leaves:
    """Sign both leaves and write them under ``run_dir`` (the flow then calls :func:`delete_ca_key`).

    - ``proxy-tls/`` 0750 ``owner_uid:tdx_attest_gid``; ``server.key`` and ``server.crt`` 0640, same owner.
    - ``registry-tls/`` 0700; ``client.key`` 0600, ``client.crt`` 0644.
    ``owner_uid`` is root in production; tests running unprivileged pass their own uid.
    """
    base = Path(run_dir)
    _ensure_run_dir(base)
    # leaf_keys: (proxy, client) RSA-2048 keys generated ahead (the flow overlaps them with network waits)
    proxy = make_proxy_leaf(ca, leaf_keys[0] if leaf_keys else None)
    client = make_client_leaf(ca, leaf_keys[1] if leaf_keys else None)

    proxy_dir = base / PROXY_SUBDIR
    _ensure_dir(proxy_dir, 0o750, owner_uid, tdx_attest_gid)
    _write(proxy_dir / "server.key", _key_pem(proxy.key), 0o640, owner_uid, tdx_attest_gid)  # type: ignore[arg-type]
    _write(proxy_dir / "server.crt", proxy.cert_pem, 0o640, owner_uid, tdx_attest_gid)

    registry_dir = base / REGISTRY_SUBDIR
    _ensure_dir(registry_dir, 0o700)
    _write(registry_dir / "client.key", _key_pem(client.key), 0o600)  # type: ignore[arg-type]
    _write(registry_dir / "client.crt", client.cert_pem, 0o644)
    log.info("boot.vm_ca.leaves_signed", proxy_spki_sha256=proxy.spki_sha256.hex(),
             client_spki_sha256=client.spki_sha256.hex())
    return Leaves(proxy, client, proxy_dir, registry_dir)
