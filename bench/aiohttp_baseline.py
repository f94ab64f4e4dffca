"""The smallest aiohttp app answering ``POST /v1/rint/nonce`` on a unix socket: the benchmark's baseline.

    python bench/aiohttp_baseline.py SOCKET_PATH

Same route, same JSON shape (``{"nonce": <32 hex>, "expires_at": <ISO-8601 UTC>}``) as the service, with
what a minimal app does and nothing else: no caller identification, no limits, no logging (access log
off), default event loop. Sends ``READY=1`` to ``$NOTIFY_SOCKET`` once listening; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import time
from datetime import UTC, datetime

from aiohttp import web


async def nonce(_request: web.Request) -> web.Response:
    expires = datetime.fromtimestamp(time.time() + 300, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return web.json_response({"nonce": secrets.token_hex(16), "expires_at": expires})


async def main(path: str) -> None:
    app = web.Application()
    app.router.add_post("/v1/rint/nonce", nonce)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # the service's listen backlog, so both see the same connect storm at the start of a round
    await web.UnixSite(runner, path, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", notify)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
