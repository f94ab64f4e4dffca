"""The faithful validator's TLS terminator: a real nginx with ``ssl_verify_client optional_no_ca``.

Production puts nginx in front of the validator; nginx accepts any (self-signed) client certificate
and forwards it URL-escaped as ``X-Client-Cert`` with ``X-Client-Verify`` and ``X-Real-IP``. Python's
ssl module cannot accept arbitrary self-signed client certs, so instead of imitating this we run the
same terminator: nginx on loopback, proxying to the aiohttp app on a unix socket. A status 599 from
the app makes nginx close the client connection without an answer (``return 444``): the "dropped
connection" fault. One nginx serves every front (:class:`Front`: cvm, legacy attestation proxy, public
api), each on its own port, each injecting only its own provenance header.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import UnavailableError

DROP_STATUS = 599
PROXY_AUTH_HEADER = "X-Attestation-Proxy-Auth"
CVM_AUTH_HEADER = "X-Cvm-Proxy-Auth"
FRONT_AUTH_HEADER = "X-Sim-Front-Auth"  # sim only: proves a request crossed one of our fronts


class NginxUnavailable(UnavailableError, RuntimeError):
    """nginx is not installed (``scripts/install-deps.sh`` installs nginx-light)."""


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_test_tls(state_dir: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A test CA and a server certificate for ``host`` (+ localhost) signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("chutes-attest TEST validator CA (untrusted)"))
        .issuer_name(_name("chutes-attest TEST validator CA (untrusted)")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(state_dir / "validator-ca.pem", state_dir / "validator-server.pem",
                     state_dir / "validator-server.key")
    files.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(files.key_pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return files


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Front:
    """One TLS front of the validator (one nginx ``server`` block on its own port).

    ``cvm`` (``cvm.chutes.ai``, mTLS, injects ``X-Cvm-Proxy-Auth``), ``legacy`` (the 1.3.x attestation
    proxy, mTLS, injects ``X-Attestation-Proxy-Auth``), ``api`` (``api.chutes.ai``: no client
    certificate requested, no proxy header). Every front strips what the others inject.
    """

    name: str
    port: int
    client_certs: bool
    inject: tuple[tuple[str, str], ...] = ()


INJECTED_HEADERS = (PROXY_AUTH_HEADER, CVM_AUTH_HEADER, FRONT_AUTH_HEADER, "X-Client-Cert", "X-Client-Verify")


def _server_block(host: str, front: Front, tls: TlsFiles, app_socket: Path) -> str:
    values = dict.fromkeys(INJECTED_HEADERS, '""')
    if front.client_certs:
        values["X-Client-Cert"], values["X-Client-Verify"] = "$ssl_client_escaped_cert", "$ssl_client_verify"
    values.update(front.inject)
    headers = "".join(f"            proxy_set_header {k} {v};\n" for k, v in values.items())
    verify = "optional_no_ca" if front.client_certs else "off"
    return f"""\
    server {{  # front: {front.name}
        listen {host}:{front.port} ssl;
        ssl_certificate {tls.cert_pem};
        ssl_certificate_key {tls.key_pem};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client {verify};
        location / {{
            proxy_pass http://unix:{app_socket}:;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
{headers}            proxy_read_timeout 600s;
            proxy_redirect off;
            proxy_buffering off;
            proxy_intercept_errors on;
            error_page {DROP_STATUS} = @drop;
        }}
        location @drop {{ return 444; }}
    }}
"""


def nginx_conf(state_dir: Path, tls: TlsFiles, host: str, fronts: list[Front], app_socket: Path) -> str:
    tmp = state_dir / "nginx-tmp"
    user = "user root root;\n" if os.geteuid() == 0 else ""
    servers = "".join(_server_block(host, f, tls, app_socket) for f in fronts)
    return f"""\
# generated by agent.sim.validator_nginx: the production TLS terminator shape
{user}worker_processes 1;
daemon off;
pid {state_dir}/nginx.pid;
error_log {state_dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {state_dir}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 1m;
{servers}}}
"""


class NginxProcess:
    """One nginx master (foreground, own prefix/pid/logs under ``state_dir``)."""

    def __init__(self, state_dir: Path, conf_text: str, host: str, port: int | list[int]) -> None:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            raise NginxUnavailable("nginx not found: run scripts/install-deps.sh (Debian package nginx-light)")
        self.binary, self.state_dir, self.host = binary, state_dir, host
        self.ports = [port] if isinstance(port, int) else list(port)
        self.conf = state_dir / "nginx.conf"
        self.conf.write_text(conf_text)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (state_dir / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        err = self.state_dir / "nginx-error.log"
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.state_dir), "-e", str(err), "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        waiting = list(self.ports)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {err.read_text()[-500:]}")
            try:
                with socket.create_connection((self.host, waiting[0]), timeout=0.2):
                    waiting.pop(0)
                    if not waiting:
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nginx did not listen on {self.host}:{waiting} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
