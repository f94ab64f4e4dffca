"""Golden bytes per compat route (issue 14 item 3): status, ``Content-Type`` and the exact body as the newest
reference service sends it, read off a real unix socket as raw HTTP/1.1 (no client-side JSON parsing that
could hide key order, separators or escaping). What the placeholders stand for: golden/README.md."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from agent.serve.server import Service

GOLDEN = Path(__file__).with_name("golden")
NONCE = "ab" * 32
B64 = rb"[A-Za-z0-9+/]{64,}={0,2}"  # real values are KBs; "pong" is not one
#: (pattern, placeholder): only these fields are random by nature; see golden/README.md.
NORMALISE = [
    (re.compile(rb'^"' + B64 + rb'"$'), b'"<QUOTE_B64>"'),
    (re.compile(rb'("tdx_quote":")' + B64 + rb'(")'), rb"\1<QUOTE_B64>\2"),
    (re.compile(rb'(\\"certificate\\": \\")' + B64 + rb'(\\")'), rb"\1<CERT_B64>\2"),
    (re.compile(rb'(\\"evidence\\": \\")' + B64 + rb'(\\")'), rb"\1<EVIDENCE_B64>\2"),
]

ROUTES = {
    "health": "/health",
    "attest": f"/attest?nonce={NONCE}",
    "attest_unknown_gpu_ids": f"/attest?nonce={NONCE}&gpu_ids=GPU-a",
    "tdx_quote": f"/tdx/quote?nonce={NONCE}",
    "quote": f"/quote?nonce={NONCE}",
    "nvtrust_evidence": f"/nvtrust/evidence?name=vm1&nonce={NONCE}",
    "devices": "/devices",
    "bad_nonce": f"/attest?nonce={NONCE[:62]}",
}


async def raw_get(path: str, target: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


def normalise(body: bytes) -> bytes:
    for pattern, placeholder in NORMALISE:
        body = pattern.sub(placeholder, body)
    return body


def golden(name: str) -> tuple[int, str, bytes]:
    head, _, body = (GOLDEN / f"{name}.http").read_bytes().partition(b"\n\n")
    status_line, ctype = head.decode().split("\n")
    return int(status_line.split()[1]), ctype.split(": ", 1)[1], body


@pytest.mark.parametrize("name", sorted(ROUTES))
async def test_compat_route_matches_golden(service: Service, name: str) -> None:
    status, headers, body = await raw_get(service.cfg.serve.compat_socket, ROUTES[name])
    want_status, want_type, want_body = golden(name)
    assert status == want_status, body
    assert headers["content-type"] == want_type
    assert normalise(body) == want_body


#: Every route the newest reference serves (sek8s attestation.py @56fbaee3).
REFERENCE_ROUTES = {"/health", "/attest", "/devices", "/tdx/quote", "/quote", "/nvtrust/evidence"}


def test_every_reference_route_has_a_golden_file(service: Service) -> None:
    compat = next(lst for lst in service.listeners if lst.name == "compat")
    routes = {r.resource.canonical for r in compat.runner.app.router.routes() if r.method == "GET"}
    pinned = {target.split("?")[0] for target in ROUTES.values()}
    assert pinned == REFERENCE_ROUTES <= routes
    assert {p.stem for p in GOLDEN.glob("*.http")} == set(ROUTES)
