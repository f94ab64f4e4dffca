"""aiohttp client for the validator's boot endpoints (chutes-protocol.md §2.3, §2.5, §2.7).

Transport only: one method per endpoint, each returning a typed response from
:mod:`agent.validator.schemas` or raising one of :mod:`agent.validator.errors`. Retrying is the
caller's business (:mod:`agent.validator.retry`). TLS (including the mTLS client certificate) comes
in as a ready :class:`ssl.SSLContext`.
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from agent.log import Secret
from agent.validator.errors import ValidatorHTTPError, ValidatorRedirectError, ValidatorTransportError
from agent.validator.retry import parse_retry_after
from agent.validator.schemas import BootAttestationResponse, NonceResponse, VolumeKeyResponse
from agent.validator.transport import BodyError, PinningConnector, TlsPinError, read_body

#: The initramfs client's User-Agent (chutes-protocol.md §2.5); kept for log/filter compatibility.
USER_AGENT = "TDX-LUKS-Client/1.0"
MAX_BODY = 256 * 1024


def compact_json(obj: dict[str, Any]) -> bytes:
    """The exact bytes sent (and, for signed calls, hashed): compact separators, key order as given."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _location_host(location: str | None) -> str:
    """The host a redirect points at (printable, bounded), for the error text only."""
    if not location:
        return "(no Location)"
    try:
        parts = urlsplit(location)
        text = f"{parts.scheme}://{parts.hostname}" if parts.hostname else "(relative Location)"
    except ValueError:
        text = "(unparseable Location)"
    return "".join(c for c in text if c.isprintable())[:120]


def _detail(body: bytes) -> str:
    """The validator's short error text (FastAPI ``{"detail": ...}``), printable and bounded."""
    text = ""
    try:
        data = json.loads(body.decode("utf-8"))
        if isinstance(data, dict):
            # FastAPI "detail"; >= 1.4.0 scripts also log "message"/"error" (reference §3.6).
            for name in ("detail", "message", "error"):
                if isinstance(data.get(name), str):
                    text = data[name]
                    break
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        text = ""
    return "".join(c for c in text if c.isprintable())[:300]


class ValidatorClient:
    """One HTTPS session to one validator host; use as ``async with ValidatorClient(...) as c``.

    No call ever follows a redirect (a 3xx is :class:`ValidatorRedirectError`, naming the status and
    the Location host), proxies and ``.netrc`` from the environment are ignored (``trust_env=False``),
    pinned SPKIs are checked on every connection before the request is written, and every body is
    read to its framed end within :data:`MAX_BODY`.
    """

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None, timeout_s: float = 30.0,
                 pins: frozenset[bytes] = frozenset()) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith("https://"):
            raise ValueError(f"validator base URL must be https://, got {base_url!r}")
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._pins = pins
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ValidatorClient:
        # force_close: one fresh TCP/TLS connection per request, as curl does; a retry never rides a
        # connection the validator already dropped.
        connector = PinningConnector(ssl=self._ssl, force_close=True, pins=self._pins)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers={"User-Agent": USER_AGENT}, trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, endpoint: str, method: str, path: str, *, params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None, body: bytes | None = None, ok: tuple[int, ...] = (200,),
    ) -> bytes:
        """Send exactly ``body`` (already serialised: signed calls hash these bytes); the answer body."""
        assert self._session is not None, "use ValidatorClient as an async context manager"
        url = self.base_url + path
        hdrs = dict(headers or {})
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            async with self._session.request(
                method, url, params=params, headers=hdrs, data=body, allow_redirects=False,
            ) as resp:
                if 300 <= resp.status < 400:
                    raise ValidatorRedirectError(endpoint, resp.status, _location_host(resp.headers.get("Location")))
                try:
                    data = await read_body(resp, MAX_BODY)
                except BodyError as exc:
                    raise ValidatorTransportError(endpoint, str(exc)) from None
                if resp.status not in ok:
                    raise ValidatorHTTPError(
                        endpoint, resp.status, _detail(data), parse_retry_after(resp.headers.get("Retry-After")),
                    )
                return data
        except TimeoutError:
            raise ValidatorTransportError(endpoint, f"timed out after {self._timeout.total:g}s") from None
        except TlsPinError as exc:
            raise ValidatorTransportError(endpoint, str(exc)) from None
        except aiohttp.ClientPayloadError as exc:
            raise ValidatorTransportError(endpoint, f"truncated answer ({type(exc).__name__})") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ValidatorTransportError(endpoint, f"TLS certificate rejected: {exc.certificate_error}") from None
        except aiohttp.ClientSSLError as exc:
            raise ValidatorTransportError(endpoint, f"TLS failure: {type(exc).__name__}") from None
        except aiohttp.ClientConnectorError as exc:
            raise ValidatorTransportError(
                endpoint, f"cannot connect to {exc.host}:{exc.port} ({exc.os_error})") from None
        except aiohttp.ServerDisconnectedError:
            raise ValidatorTransportError(endpoint, "connection closed by the validator without an answer") from None
        except aiohttp.ClientError as exc:
            raise ValidatorTransportError(endpoint, f"{type(exc).__name__}: {exc}") from None

    async def _request(
        self, endpoint: str, method: str, path: str, *, params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None, json_body: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> bytes:
        data = compact_json(json_body) if json_body is not None else None
        return await self.request(endpoint, method, path, params=params, headers=headers, body=data, ok=ok)

    async def get_nonce(self, miner_hotkey: str) -> NonceResponse:
        """``GET /servers/nonce?miner_hotkey=…`` (mTLS): a single-use boot nonce."""
        body = await self._request(
            "GET /servers/nonce", "GET", "/servers/nonce", params={"miner_hotkey": miner_hotkey},
        )
        return NonceResponse.parse(body)

    async def boot_attestation(
        self, nonce: str, quote_b64: str, vm_name: str, miner_hotkey: str,
    ) -> BootAttestationResponse:
        """``POST /servers/boot/attestation`` with ``X-Chutes-Nonce``: quote in, root key and boot token out."""
        body = await self._request(
            "POST /servers/boot/attestation", "POST", "/servers/boot/attestation",
            headers={"X-Chutes-Nonce": nonce},
            json_body={"quote": quote_b64, "vm_name": vm_name, "miner_hotkey": miner_hotkey},
        )
        return BootAttestationResponse.parse(body)

    async def volume_key(self, method: str, vm_name: str, miner_hotkey: str, boot_token: Secret) -> VolumeKeyResponse:
        """``GET`` (existing volume) or ``PUT`` (first boot: new passphrase) ``/servers/{vm_name}/luks?hotkey=``."""
        if method not in ("GET", "PUT"):
            raise ValueError(f"method must be GET or PUT, got {method!r}")
        endpoint = f"{method} /servers/{{vm_name}}/luks"
        body = await self._request(
            endpoint, method, f"/servers/{quote(vm_name, safe='')}/luks", params={"hotkey": miner_hotkey},
            headers={"X-Boot-Token": boot_token.reveal().decode()}, ok=(200, 201),
        )
        return VolumeKeyResponse.parse(endpoint, body)
