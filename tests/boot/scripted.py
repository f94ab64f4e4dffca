"""A scripted HTTPS server over real sockets and real TLS, for attacks the faithful validator does not stage.

Each route answers with a list of raw byte pieces written one by one (drain + pause between them, so
every piece leaves as its own TLS record), or with a close mid-body. Every request is recorded, and a
plain-http "redirect target" listener records every byte anyone sends it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.sim.validator_nginx import make_test_tls

Answer = list[bytes | float | None]  # bytes = one write; float = pause; None = close the connection now


def response(status: int, body: bytes, *, pieces: int = 1, chunked: bool = False,
             extra_headers: dict[str, str] | None = None, length: int | None = None) -> Answer:
    """An HTTP/1.1 answer whose body is written in ``pieces`` separate TLS records."""
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    elif length is not None or not (extra_headers and "Content-Length" in extra_headers):
        head.append(f"Content-Length: {len(body) if length is None else length}")
    out: Answer = [("\r\n".join(head) + "\r\n\r\n").encode()]
    step = max(1, -(-len(body) // pieces)) if body else 1
    parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    for part in parts:
        out.append(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
        out.append(0.02)
    if chunked:
        out.append(b"0\r\n\r\n")
    return out


def json_answer(status: int, doc: Any, **kw: Any) -> Answer:
    return response(status, json.dumps(doc).encode(), **kw)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedServer:
    state_dir: Path
    routes: dict[tuple[str, str], Callable[[Request], Answer]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    plain_bytes: bytearray = field(default_factory=bytearray)
    port: int = 0
    plain_port: int = 0

    async def start(self) -> ScriptedServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.tls = make_test_tls(self.state_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.tls.cert_pem, self.tls.key_pem)
        ctx.verify_mode = ssl.CERT_NONE  # no client certificate asked for: these tests attack the transport
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        self.port = self._srv.sockets[0].getsockname()[1]
        self._plain = await asyncio.start_server(self._plain_handle, "127.0.0.1", 0)
        self.plain_port = self._plain.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def plain_url(self) -> str:
        return f"http://127.0.0.1:{self.plain_port}"

    async def stop(self) -> None:
        for s in (self._srv, self._plain):
            s.close()
            await s.wait_closed()

    async def _plain_handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await asyncio.wait_for(reader.read(65536), 5):
                self.plain_bytes += data
        except (TimeoutError, ConnectionError):
            pass
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            path = target.split("?", 1)[0]
            req = Request(method, target, headers, body)
            self.requests.append(req)
            route = self.routes.get((method, path))
            answer = route(req) if route else json_answer(404, {"detail": "no such route"})
            for item in answer:
                if item is None:
                    writer.transport.abort()
                    return
                if isinstance(item, float):
                    await asyncio.sleep(item)
                    continue
                writer.write(item)
                await writer.drain()
            await asyncio.sleep(0.05)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()
