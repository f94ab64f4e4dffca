"""The service certificate whose SPKI hash is bound into every runtime quote (chutes-protocol.md §4.3).

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
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.certs import self_signed
from agent.evidence.report_data import spki_sha256
from agent.fsutil import write_atomic
from agent.log import get_logger

log = get_logger(__name__)
VALIDITY_DAYS = 36500


class ServiceCertError(RuntimeError):
    """The certificate/key pair is missing, unreadable or does not match."""


@dataclass(frozen=True)
class ServiceCert:
    cert: x509.Certificate
    pem: str
    spki_sha256: bytes

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
