"""HTTPS plumbing shared by every validator call: TLS from configuration only, SPKI pins, complete reads.

Why a module of its own: the boot client and the rint relay must agree on three promises that
aiohttp does not give by default —

* **TLS from configuration only.** ``ssl.create_default_context`` consults ``SSL_CERT_FILE``,
  ``SSL_CERT_DIR`` and ``SSLKEYLOGFILE``; in an initramfs those come from the host-controlled kernel
  command line. :func:`client_context` loads exactly the configured bundle and nothing else.
* **Pins checked before anything is sent.** :class:`PinningConnector` looks at the verified chain
  of every new connection right after the handshake and closes it unless one certificate's SPKI
  SHA-256 is in the configured pin list.
* **Complete reads.** :func:`read_body` reads the body to its framed end (Content-Length or chunked)
  within a size cap; a cut body is "truncated", an unframed one is refused.
"""

from __future__ import annotations

import _ssl  # ENCODING_DER for the chain's Certificate objects
import hashlib
import os
import ssl
from collections.abc import Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import AgentError, UsageError, VerificationError

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.tracing import Trace

#: Where Debian/Ubuntu (and the initramfs hook) keep the public CA bundle.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

#: Environment variables that steer OpenSSL, Python's ssl module or HTTP clients. Cleared by ``boot``.
TLS_ENV_VARS = (
    "SSL_CERT_FILE", "SSL_CERT_DIR", "SSLKEYLOGFILE", "OPENSSL_CONF", "OPENSSL_CONF_INCLUDE", "OPENSSL_MODULES",
    "OPENSSL_ENGINES", "OPENSSL_ia32cap", "OPENSSL_TRUST", "CTLOG_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT",
)


class TlsConfigError(UsageError, ValueError):
    """The TLS configuration cannot be used (bundle unreadable, malformed pin)."""


class TlsPinError(aiohttp.ClientConnectionError, VerificationError):
    """The server's verified chain holds none of the pinned SPKIs; the connection was closed unused."""


class BodyError(AgentError):
    """The answer body is unusable: too large, cut short, or without framing."""


def scrub_tls_environment(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove every variable of :data:`TLS_ENV_VARS` (and any ``OPENSSL_*``/``SSL_*``); returns the names removed."""
    env = os.environ if environ is None else environ
    names = [k for k in list(env) if k in TLS_ENV_VARS or k.startswith(("OPENSSL_", "SSL_"))]
    for k in names:
        del env[k]
    return names


def parse_pins(pins: Iterable[str]) -> frozenset[bytes]:
    """``boot.tls_pin_spki`` entries (64 hex, SHA-256 of a DER SubjectPublicKeyInfo) as raw digests."""
    out = set()
    for p in pins:
        text = p.strip().lower()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise TlsConfigError(f"tls_pin_spki: {p!r} is not 64 hex characters (SHA-256 of an SPKI)")
        out.add(bytes.fromhex(text))
    return frozenset(out)


def client_context(ca_bundle: str, cert_chain: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting exactly ``ca_bundle`` (default: the system bundle file).

    Never calls ``load_default_certs``/``set_default_verify_paths`` (which read ``SSL_CERT_FILE``/
    ``SSL_CERT_DIR``) and never ``create_default_context`` (which honours ``SSLKEYLOGFILE``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    bundle = ca_bundle or SYSTEM_CA_BUNDLE
    try:
        ctx.load_verify_locations(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"CA bundle {bundle}: {getattr(exc, 'strerror', None) or exc}") from None
    if cert_chain is not None:
        ctx.load_cert_chain(*cert_chain)
    return ctx


def spki_sha256_der(der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()


def verified_chain_der(ssl_object: Any) -> list[bytes]:
    """The chain OpenSSL verified (leaf first), as DER.

    ``SSLObject.get_verified_chain`` is public from Python 3.13; on 3.10–3.12 the same method exists on
    the private ``_sslobj`` (CPython internal, same semantics).
    """
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_verified_chain
    return [c.public_bytes(_ssl.ENCODING_DER) for c in getter() or []]


def check_pins(chain_der: Sequence[bytes], pins: frozenset[bytes], host: str) -> None:
    """Raise :class:`TlsPinError` unless a certificate of the verified chain has a pinned SPKI."""
    if not pins:
        return
    if not any(spki_sha256_der(der) in pins for der in chain_der):
        raise TlsPinError(f"TLS pin: no certificate in {host}'s verified chain matches boot.tls_pin_spki "
                          f"({len(chain_der)} certificate(s) checked)")


class PinningConnector(aiohttp.TCPConnector):
    """TCPConnector that checks SPKI pins on each new TLS connection before the request is written.

    Hooks ``TCPConnector._create_connection`` (aiohttp internal, stable through 3.x; the pyproject
    upper bound on aiohttp names it).
    """

    def __init__(self, *, pins: frozenset[bytes] = frozenset(), **kw: Any) -> None:
        super().__init__(**kw)
        self._pins = pins

    async def _create_connection(self, req: aiohttp.ClientRequest, traces: list[Trace],
                                 timeout: aiohttp.ClientTimeout) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        if self._pins:
            transport = proto.transport
            sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
            try:
                if sslobj is None:
                    raise TlsPinError(f"TLS pin: connection to {req.url.host} is not TLS")
                check_pins(verified_chain_der(sslobj), self._pins, str(req.url.host))
            except BaseException:
                proto.close()
                raise
        return proto


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, read to its framed end; :class:`BodyError` when too large, cut or unframed.

    ``StreamReader.read(n)`` returns whatever is buffered, so a body flushed in two TLS records was
    cut in half; this reads until aiohttp's parser reports the end of the framed payload, and a
    connection closed before it raises ``ClientPayloadError`` (reported as truncated).
    """
    length = resp.content_length
    chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
    if length is None and not chunked:
        raise BodyError("answer has neither Content-Length nor chunked framing (a cut could not be detected)")
    if length is not None and length > limit:
        raise BodyError(f"answer larger than {limit} bytes (Content-Length {length})")
    buf = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise BodyError(f"answer larger than {limit} bytes")
    except aiohttp.ClientPayloadError:
        raise BodyError(f"truncated answer (connection closed after {len(buf)} body bytes)") from None
    if length is not None and len(buf) != length:
        raise BodyError(f"truncated answer ({len(buf)} of {length} body bytes)")
    return bytes(buf)
