"""Relay of the one-time launch-config rint nonce for chute containers without egress.

The caller hands over its launch JWT; the relay reads the token's ``url`` claim (it does not need to
verify the ES256 signature: the validator does that when it sees the token) and fetches
``GET {url}/nonce`` with the token in ``Authorization`` (chutes-protocol.md §5.1 step 2). Only https
URLs of the form ``/instances/launch_config/<id>`` on an allow-listed host are contacted (no SSRF), no
redirects are followed, the whole exchange is time-bounded, and the token is never logged or echoed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from agent.errors import AgentError
from agent.log import Secret, get_logger
from agent.validator.transport import BodyError, client_context, read_body

log = get_logger(__name__)

_PATH = re.compile(r"/instances/launch_config/[A-Za-z0-9_-]{1,128}")
_NONCE = re.compile(r"[0-9a-f]{32}")
MAX_TOKEN_BYTES = 8192
#: A rint nonce answer is 32 hex (quoted, maybe a newline); anything near this cap is not one.
MAX_ANSWER_BYTES = 1024


class RelayError(AgentError):
    """The relay refused or failed; ``status``/``code`` map straight to the HTTP answer."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def token_url(token: str) -> str:
    """The ``url`` claim of a compact JWS, without verifying it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise RelayError(400, "bad_token", "authorization: expected a launch JWT (three dot-separated parts)")
    try:
        claims = json.loads(_b64url(parts[1]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RelayError(400, "bad_token", "authorization: JWT payload is not base64url JSON") from None
    url = claims.get("url") if isinstance(claims, dict) else None
    if not isinstance(url, str) or not url:
        raise RelayError(400, "bad_token", "authorization: JWT has no 'url' claim")
    return url


def _allowed(host: str, port: int, allow: list[str]) -> bool:
    """Entries are ``host`` (any port) or ``host:port``; comparison is exact, case-insensitive."""
    for entry in allow:
        text = entry.strip().lower()
        name, sep, p = text.rpartition(":")
        if not sep or not p.isdigit():
            name, p = text, ""
        if name == host and (not p or int(p) == port):
            return True
    return False


def check_target(url: str, allowed_hosts: list[str]) -> Target:
    """Validate the launch-config URL against the allow-list and shape rules."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:  # bad IPv6 literal, NFKC-normalising netloc, invalid port
        raise RelayError(400, "bad_token", "authorization: 'url' claim is not a valid URL") from None
    if parts.scheme != "https":
        raise RelayError(400, "bad_token", "authorization: 'url' claim must be an https URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise RelayError(400, "bad_token", "authorization: 'url' claim has userinfo, query or fragment")
    host = (parts.hostname or "").lower()
    if not _PATH.fullmatch(parts.path.rstrip("/")):
        raise RelayError(400, "bad_token", "authorization: 'url' claim is not /instances/launch_config/<id>")
    if not _allowed(host, port, allowed_hosts):
        raise RelayError(403, "host_not_allowed", f"validator host {host!r} is not in serve.validator_hosts")
    base = f"https://{parts.netloc}{parts.path.rstrip('/')}"
    return Target(url=f"{base}/nonce", host=host, port=port)


class RelayClient:
    """One ClientSession (one connection pool) for the service's lifetime: no TLS handshake per relay call.

    Bound to the event loop it was made on; :func:`shared_client` hands out one per (loop, CA bundle).
    """

    def __init__(self, ca_bundle: str = "", *, limit_per_host: int = 4, keepalive_s: float = 30.0) -> None:
        connector = aiohttp.TCPConnector(
            ssl=client_context(ca_bundle), limit=16, limit_per_host=limit_per_host, keepalive_timeout=keepalive_s,
        )
        self.session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self.loop = asyncio.get_running_loop()

    async def get(self, target: Target, token_text: str, timeout_s: float) -> tuple[int, bytes]:
        """``GET target.url``; never follows a redirect; the body read to its framed end (1 KiB cap)."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        for attempt in (1, 2):
            try:
                async with self.session.get(
                    target.url, headers={"Authorization": token_text}, allow_redirects=False, timeout=timeout,
                ) as resp:
                    if 300 <= resp.status < 400:
                        return resp.status, b""
                    try:
                        return resp.status, await read_body(resp, MAX_ANSWER_BYTES)
                    except BodyError as exc:
                        raise RelayError(502, "validator_error", f"validator {target.host}: {exc}") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A pooled keep-alive connection the validator already closed: once more on a fresh one
                # (GET, no side effect until the validator answers).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.session.close()


_SHARED: dict[tuple[int, str], RelayClient] = {}


def shared_client(ca_bundle: str) -> RelayClient:
    """The pooled client for this event loop and CA bundle (made on first use, kept until :func:`close_shared`)."""
    loop = asyncio.get_running_loop()
    key = (id(loop), ca_bundle)
    client = _SHARED.get(key)
    if client is None or client.loop is not loop or client.session.closed:
        client = _SHARED[key] = RelayClient(ca_bundle)
    return client


async def close_shared() -> None:
    """Close the pooled clients of the running loop (service shutdown)."""
    loop = asyncio.get_running_loop()
    for key, client in list(_SHARED.items()):
        if client.loop is loop:
            del _SHARED[key]
            await client.close()


async def fetch_validator_nonce(
    token: Secret, *, allowed_hosts: list[str], timeout_s: float, ca_bundle: str = "",
    client: RelayClient | None = None,
) -> str:
    """The 32-hex rint nonce for the token's launch config; :class:`RelayError` on any refusal."""
    text = bytes(token.reveal()).decode("ascii", "replace").strip()
    if len(text) > MAX_TOKEN_BYTES:
        raise RelayError(400, "bad_token", f"authorization: token longer than {MAX_TOKEN_BYTES} bytes")
    target = check_target(token_url(text), allowed_hosts)
    client = client or shared_client(ca_bundle)
    try:
        status, body = await client.get(target, text, timeout_s)
    except TimeoutError:
        raise RelayError(504, "validator_timeout", f"validator did not answer within {timeout_s:g}s") from None
    except aiohttp.ClientError as exc:
        raise RelayError(502, "validator_unreachable", f"validator {target.host}: {type(exc).__name__}") from None
    finally:
        del text
    log.info("rint.relay", host=target.host, status=status)
    if status == 404:
        raise RelayError(404, "nonce_unavailable", "validator has no rint nonce for this launch config "
                         "(already fetched, expired or unknown)")
    if status in (401, 403):
        raise RelayError(403, "validator_refused", f"validator refused the launch token (HTTP {status})")
    if 300 <= status < 400:
        raise RelayError(502, "validator_error", f"validator answered HTTP {status} (redirect refused, never followed)")
    if status != 200:
        raise RelayError(502, "validator_error", f"validator answered HTTP {status}")
    nonce = body.decode("ascii", "replace").strip().strip('"').lower()
    if not _NONCE.fullmatch(nonce):
        raise RelayError(502, "validator_error", "validator answer is not a 32-hex nonce")
    return nonce
