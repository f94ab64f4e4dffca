"""The service certificate whose SPKI hash is bound into every runtime quote (chutes-protocol.md §4.3).

It lives with the evidence (not in ``serve``) because the service and the ``evidence``/``doctor`` commands
must bind and report the very same identity.

Two generations (chutes-vm-generations.md §7, §8):

- 1.4.0+: the boot hands off a CA-signed proxy leaf (``/run/chutes/proxy-tls/server.{crt,key}``, signed by the
  per-boot VM root CA ``/run/chutes/vm-root-ca/ca.crt``). The proxy on :30443 serves that leaf, so it is
  the identity: at start it must chain to the CA, match its key, and its key must not be readable by
  others (group-readable 0640 is how the proxy reads it). Any failure stops the service; a self-signed
  certificate is never made in its place (:func:`load_identity`).
- older: the self-signed pair below.

Same material as the old ``attestation-service-init`` step: RSA-2048, self-signed, ``CN=attestation-service``,
SANs for the service name, localhost, the hostname and loopback addresses, ~100 years validity. Created
once when absent (key 0600, written atomically); the proxy on :30443 serves the same key, so the hash the
validator computes from the TLS session equals the one in REPORTDATA[32:64].
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.certs import self_signed
from agent.errors import UnavailableError, VerificationError
from agent.evidence.report_data import spki_sha256
from agent.fsutil import write_atomic
from agent.log import get_logger

if TYPE_CHECKING:
    from agent.config import ServeConfig

log = get_logger(__name__)
VALIDITY_DAYS = 36500


class ServiceCertError(UnavailableError, RuntimeError):
    """The certificate/key pair is missing, unreadable or does not match."""


class HandoffIdentityError(VerificationError, ServiceCertError):
    """The boot hand-off leaf is there but fails a check (chain, key pair, key mode): never serve."""

    reason = "service_identity"


#: Which identity the service uses: the boot's CA-signed leaf, or the older self-signed pair.
HANDOFF = "handoff-ca-signed"
SELF_SIGNED = "self-signed"


@dataclass(frozen=True)
class ServiceCert:
    cert: x509.Certificate
    pem: str
    spki_sha256: bytes
    source: str = SELF_SIGNED
    #: One line: why this identity is the one in use (doctor and the start-up log say it).
    why: str = ""

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


_SKIP_IFACES = ("lo", "docker", "virbr", "veth", "br-", "kube", "cni", "flannel", "cali")


def interface_addresses() -> list[str]:
    """IPs of UP interfaces other than loopback/container bridges (as setup-tls-certs.sh picks them)."""
    import fcntl
    import struct

    out: list[str] = []
    # /sys/class/net, not socket.if_nameindex(): that opens a netlink socket, which the unit's
    # RestrictAddressFamilies= forbids.
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        names = []
    for name in names:
        if name.startswith(_SKIP_IFACES):
            continue
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        except (OSError, ValueError):
            continue
        if not flags & 0x1:  # IFF_UP
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                out.append(socket.inet_ntoa(raw[20:24]))
            except OSError:
                pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            addr, _i, _p, scope, _f, name = line.split()
            if scope == "00" and not name.startswith(_SKIP_IFACES):  # global scope only
                out.append(str(ipaddress.IPv6Address(bytes.fromhex(addr))))
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(out))


def generate(cert_path: Path, key_path: Path, hostname: str | None = None) -> None:
    """Create the self-signed pair like setup-tls-certs.sh: SANs = service name, localhost, hostname,
    loopback and UP interface addresses (minus its external "what is my IP" lookup: no egress here)."""
    hostname = hostname or socket.gethostname()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dns = dict.fromkeys(["attestation-service", "localhost", hostname])
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns if d]
    ips = dict.fromkeys(["127.0.0.1", "::1", *interface_addresses()])
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = self_signed(key, "attestation-service", datetime.timedelta(days=VALIDITY_DAYS), [
        (x509.SubjectAlternativeName(sans), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
    ])
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("serve.cert_created", path=str(cert_path), subject="CN=attestation-service")


def load_or_create(cert_path: str, key_path: str, *, create: bool = True) -> ServiceCert:
    """Load the pair (creating it first when both files are absent) and hash its SPKI once."""
    cp, kp = Path(cert_path), Path(key_path)
    if create and not cp.exists() and not kp.exists():
        generate(cp, kp)
    try:
        cert = x509.load_pem_x509_certificate(cp.read_bytes())
    except (OSError, ValueError) as exc:
        raise ServiceCertError(f"service certificate {cp}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ServiceCertError(f"service key {kp}: {type(exc).__name__}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise ServiceCertError(f"service key {kp} does not match certificate {cp}")
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return ServiceCert(cert=cert, pem=pem, spki_sha256=spki_sha256(cert))


# -- 1.4.0 boot hand-off ------------------------------------------------------------------------------

#: The name the reference leaf carries in its SAN (setup_vm_tls); the chain check asks for it.
LEAF_DNS_NAME = "attestation-service"


def _present(path: Path) -> bool:
    """True when ``path`` exists; a path we may not even stat counts as present (never fall back)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def handoff_present(handoff_cert: str, handoff_key: str, ca: str) -> list[str]:
    """The hand-off paths that exist: any of them means a 1.4.0+ boot, whose leaf must then be used."""
    paths = [Path(handoff_cert), Path(handoff_key), Path(handoff_cert).parent, Path(ca)]
    return [str(p) for p in dict.fromkeys(paths) if _present(p)]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise HandoffIdentityError(f"{what} {path}: {exc.strerror or type(exc).__name__}") from None


def _check_key_mode(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HandoffIdentityError(f"hand-off key {path}: {exc.strerror or type(exc).__name__}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HandoffIdentityError(f"hand-off key {path}: not a regular file")
    if st.st_mode & 0o027:
        raise HandoffIdentityError(
            f"hand-off key {path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or change it "
            "(at most 0640: owner read/write, group read)")


def _verify_chain(leaf: x509.Certificate, ca: x509.Certificate, ca_path: Path) -> str:
    """The leaf must be issued by the VM root CA and valid now; returns how it was checked.

    A CA with basicConstraints goes through cryptography's X.509 path validation (webpki profile, the leaf
    may lack an authority key identifier as ``openssl x509 -req`` leaves do). The 1.4.0 CA is made with
    ``OPENSSL_CONF=/dev/null`` and may carry no extensions at all, which that profile cannot accept as a
    CA; such a root is checked directly: self-signed, the leaf's issuer and signature, both validity
    windows, a CA whose keyUsage (if any) allows certificate signing, a leaf with another key than the CA's
    that is not a CA, may serve TLS and names ``attestation-service`` (as the path validation asks).
    """
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from cryptography.x509.verification import (
        Criticality,
        ExtensionPolicy,
        PolicyBuilder,
        Store,
    )
    from cryptography.x509.verification import (
        VerificationError as X509VerificationError,
    )

    now = datetime.datetime.now(datetime.UTC)
    try:
        ca.extensions.get_extension_for_class(x509.BasicConstraints)
        has_bc = True
    except x509.ExtensionNotFound:
        has_bc = False
    if has_bc:
        ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
        verifier = (PolicyBuilder().store(Store([ca])).time(now)
                    .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee)
                    .build_server_verifier(x509.DNSName(LEAF_DNS_NAME)))
        try:
            verifier.verify(leaf, [])
        except X509VerificationError as exc:
            raise HandoffIdentityError(f"hand-off leaf does not chain to {ca_path}: {exc}") from None
        return "path validation (webpki profile)"
    for name, cert in (("VM root CA", ca), ("hand-off leaf", leaf)):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise HandoffIdentityError(
                f"{name} not valid now (valid {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    if leaf.public_key() == ca.public_key():
        raise HandoffIdentityError(f"hand-off leaf is the VM root CA itself ({ca_path}): the CA key must not be "
                                   "the served key")
    try:
        if not ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise HandoffIdentityError(f"VM root CA {ca_path}: keyUsage present without keyCertSign, it may not "
                                       "sign certificates")
    except x509.ExtensionNotFound:
        pass
    try:
        ca.verify_directly_issued_by(ca)
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise HandoffIdentityError(f"hand-off leaf is not issued by {ca_path}: {exc or type(exc).__name__}") from None
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is None or LEAF_DNS_NAME not in names.get_values_for_type(x509.DNSName):
        raise HandoffIdentityError(f"hand-off leaf's subjectAltName does not name {LEAF_DNS_NAME}")
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise HandoffIdentityError("hand-off leaf is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
            raise HandoffIdentityError("hand-off leaf's extendedKeyUsage lacks serverAuth")
    except x509.ExtensionNotFound:
        pass
    return "issuer signature + validity (CA without extensions)"


def load_handoff(cert_path: str, key_path: str, ca_path: str) -> ServiceCert:
    """The boot's CA-signed leaf as the service identity, or :class:`HandoffIdentityError` saying why not."""
    cp, kp, cap = Path(cert_path), Path(key_path), Path(ca_path)
    _check_key_mode(kp)
    try:
        cert = x509.load_pem_x509_certificate(_read(cp, "hand-off certificate"))
    except ValueError as exc:
        raise HandoffIdentityError(f"hand-off certificate {cp}: {exc}") from None
    try:
        ca = x509.load_pem_x509_certificate(_read(cap, "VM root CA"))
    except ValueError as exc:
        raise HandoffIdentityError(f"VM root CA {cap}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(_read(kp, "hand-off key"), password=None)
    except (ValueError, TypeError) as exc:
        raise HandoffIdentityError(f"hand-off key {kp}: {type(exc).__name__}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ):
        raise HandoffIdentityError(f"hand-off key {kp} does not match certificate {cp}")
    how = _verify_chain(cert, ca, cap)
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    why = f"boot hand-off leaf {cp} chains to {cap} ({how})"
    return ServiceCert(cert=cert, pem=pem, spki_sha256=spki_sha256(cert), source=HANDOFF, why=why)


def load_identity(serve_cfg: ServeConfig, *, create: bool = True) -> ServiceCert:
    """The identity whose SPKI goes into report_data: the hand-off leaf when the boot left one (1.4.0+),
    else the self-signed pair (created when absent and ``create``)."""
    present = handoff_present(serve_cfg.handoff_cert_path, serve_cfg.handoff_key_path, serve_cfg.vm_root_ca_path)
    if present:
        cert = load_handoff(serve_cfg.handoff_cert_path, serve_cfg.handoff_key_path, serve_cfg.vm_root_ca_path)
        log.info("serve.identity", source=cert.source, why=cert.why)
        return cert
    cert = load_or_create(serve_cfg.cert_path, serve_cfg.key_path, create=create)
    why = (f"no boot hand-off ({serve_cfg.handoff_cert_path}, {serve_cfg.vm_root_ca_path} absent): "
           f"pre-1.4.0 generation, self-signed {serve_cfg.cert_path}")
    log.info("serve.identity", source=SELF_SIGNED, why=why)
    return replace(cert, source=SELF_SIGNED, why=why)
