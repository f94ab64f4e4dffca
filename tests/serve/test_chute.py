"""Chute socket /v1/*: evidence, status, devices, rint nonces/verify, symkey, error shapes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.quote import parse_quote
from agent.serve.server import Service
from agent.serve.status import node_status
from tests.serve.helpers import flip, report_data_of, spki_sha256_of, unix_client, v3_commitment, v4_commitment
from tests.waiting import async_wait_until


def sock(svc: Service) -> str:
    return svc.cfg.serve.chute_socket


async def error_of(r, status: int) -> dict:
    assert r.status == status, await r.text()
    body = await r.json()
    assert set(body) == {"error", "detail"}
    return body


# -- health / status / devices / evidence ------------------------------------------------------------

async def test_health(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        r = await c.get("/v1/health")
        assert r.status == 200
        assert (await r.json())["status"] == "ok"


async def test_status_reports_boot_measurements_queue_counters(service: Service) -> None:
    Path(service.cfg.serve.boot_status_path).write_text(json.dumps({"result": "unlocked", "stage": "done"}))
    async with unix_client(sock(service)) as c:
        await c.post("/v1/rint/nonce")
        q = await (await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})).json()
        st = await (await c.get("/v1/status")).json()
    assert st["boot"] == {"result": "unlocked", "stage": "done"}
    quote = parse_quote(base64.b64decode(q["quote"]))
    assert st["measurements"]["mr_td"] == bytes(quote.mr_td).hex()
    assert st["measurements"]["rtmr3"] == bytes(quote.rtmr3).hex()
    assert st["measurements"]["service_cert_spki_sha256"] == spki_sha256_of(service.cfg.serve.cert_path).hex()
    assert st["quote_source"] == "simulated"
    assert st["queue"]["depth"] == 0
    assert st["counters"]["requests"]["chute /v1/rint/nonce 200"] == 1
    assert st["counters"]["requests"]["chute /v1/evidence 200"] == 1  # this caller's own counters only
    assert st["rint"] == {"live_nonces": 1}
    assert st["versions"]["agent"]


async def test_status_without_boot_file(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        st = await (await c.get("/v1/status")).json()
    assert st["boot"] is None


async def test_evidence_binding_and_shape(service: Service) -> None:
    nonce = secrets.token_hex(32)
    async with unix_client(sock(service)) as c:
        r = await c.get("/v1/evidence", params={"nonce": nonce})
        assert r.status == 200
        doc = await r.json()
    assert set(doc) == {"nonce", "report_data", "quote_version", "quote", "gpu_evidence", "certificate", "tpm",
                        "tee"}
    assert doc["tee"] == "tdx"
    assert doc["quote_version"] == 4
    assert doc["nonce"] == nonce
    spki = spki_sha256_of(service.cfg.serve.cert_path)
    assert doc["report_data"] == nonce + spki.hex()
    assert report_data_of(base64.b64decode(doc["quote"])) == bytes.fromhex(nonce) + spki
    assert doc["certificate"] == Path(service.cfg.serve.cert_path).read_text()
    assert isinstance(doc["gpu_evidence"], list) and len(doc["gpu_evidence"]) == 2
    assert doc["tpm"] is None


async def test_evidence_gpu_filter_and_devices(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        devs = (await (await c.get("/v1/devices")).json())["devices"]
        assert len(devs) == 2
        one = await (await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32),
                                                         "gpu_ids": "GPU-" + devs[0]["uuid"]})).json()
        assert len(one["gpu_evidence"]) == 1
        only = (await (await c.get("/v1/devices", params={"gpu_ids": devs[1]["uuid"]})).json())["devices"]
        assert [d["uuid"] for d in only] == [devs[1]["uuid"]]


@pytest.mark.parametrize(
    ("params", "code"),
    [({}, "missing_nonce"), ({"nonce": "12"}, "bad_nonce"), ({"nonce": "g" * 64}, "bad_nonce"),
     ({"nonce": "a" * 64, "gpu_ids": "xyz"}, "bad_gpu_ids"), ({"nonce": "a" * 64, "gpu_ids": "f" * 32}, "bad_gpu_ids")],
)
async def test_evidence_bad_input(service: Service, params: dict, code: str) -> None:
    async with unix_client(sock(service)) as c:
        body = await error_of(await c.get("/v1/evidence", params=params), 400)
    assert body["error"] == code


async def test_not_found_and_method(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        assert (await error_of(await c.get("/v1/nope"), 404))["error"] == "not_found"
        assert (await error_of(await c.get("/v1/rint/nonce"), 405))["error"] == "method_not_allowed"


# -- rint nonces and commitments -----------------------------------------------------------------------

async def new_nonce(c) -> str:
    r = await c.post("/v1/rint/nonce")
    assert r.status == 200
    body = await r.json()
    assert set(body) == {"nonce", "expires_at"}
    assert re.fullmatch(r"[0-9a-f]{32}", body["nonce"])
    exp = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert exp >= datetime.now(UTC).replace(microsecond=0)
    return body["nonce"]


async def verify(c, nonce: str, commitment: str) -> dict:
    r = await c.post("/v1/rint/verify", json={"nonce": nonce, "commitment": commitment})
    assert r.status == 200, await r.text()
    return await r.json()


@pytest.mark.parametrize("builder", [v3_commitment, v4_commitment])
async def test_rint_valid_then_replayed(service: Service, builder) -> None:
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        commitment = builder(n)
        ok = await verify(c, n, commitment)
        assert ok["valid"] is True and ok["reason"] == "ok"
        fields = ok["commitment"]
        raw = bytes.fromhex(commitment)
        assert fields["version"] == raw[1]
        assert fields["pubkey"] == (raw[2:66] if raw[1] == 3 else raw[2:34]).hex()
        again = await verify(c, n, commitment)
        assert again == {"valid": False, "reason": "replayed"}


async def test_rint_v3_fields(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        lib_fp = bytes(range(16))
        res = await verify(c, n, v3_commitment(n, lib_fp=lib_fp))
    assert res["valid"] is True
    assert res["commitment"]["lib_fp"] == lib_fp.hex()


@pytest.mark.parametrize("builder", [v3_commitment, v4_commitment])
async def test_rint_forged_signature(service: Service, builder) -> None:
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        forged = flip(builder(n), -1)  # last signature byte
        assert (await verify(c, n, forged))["reason"] == "bad_signature"
        n2 = await new_nonce(c)
        c2 = builder(n2)
        tampered = flip(c2, 3)  # a pubkey byte: signature no longer matches (or key invalid)
        res = await verify(c, n2, tampered)
        assert res["valid"] is False and res["reason"] == "bad_signature"


@pytest.mark.parametrize("builder", [v3_commitment, v4_commitment])
async def test_rint_wrong_nonce(service_factory, builder) -> None:
    service = await service_factory(rint__v4_nonce="exact")  # v3 always; v4 only in exact mode
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        other = secrets.token_hex(16)
        res = await verify(c, n, builder(other))  # correctly signed, but for another nonce
        assert res["valid"] is False and res["reason"] == "nonce_mismatch"


async def test_rint_v4_embedded_nonce_must_equal_issued(service_factory) -> None:
    service = await service_factory(rint__v4_nonce="exact")  # default "validator": tests/serve/test_rint_socket.py
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        # v3-style derived nonce inside a v4 commitment is refused: v4 embeds the issued bytes themselves
        derived = bytes.fromhex(n)[::-1]
        res = await verify(c, n, v4_commitment(n, nonce_override=derived))
        assert res["reason"] == "nonce_mismatch"


async def test_rint_unknown_nonce(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        n = secrets.token_hex(16)
        assert await verify(c, n, v4_commitment(n)) == {"valid": False, "reason": "unknown_nonce"}


async def test_rint_expired(service: Service) -> None:
    now = [1000.0]
    service.ctx.nonces._clock = lambda: now[0]  # an injected clock: no sleeping past the TTL, no purge race
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        now[0] += service.ctx.nonces.ttl_s + 1
        assert await verify(c, n, v4_commitment(n)) == {"valid": False, "reason": "expired"}


async def test_rint_structural_problems_are_valid_false(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        assert (await verify(c, n, "0303" + "00" * 10))["reason"] == "bad_length"
        n = await new_nonce(c)
        assert (await verify(c, n, "0505" + "00" * 144))["reason"] == "unsupported_version"
        n = await new_nonce(c)
        assert (await verify(c, n, "0304" + "00" * 144))["reason"] == "unsupported_version"


async def test_rint_concurrent_verifies_one_success(service: Service) -> None:
    async with unix_client(sock(service), limit=32) as c:  # serve.max_connections_per_caller
        n = await new_nonce(c)
        commitment = v4_commitment(n)
        results = await asyncio.gather(*(verify(c, n, commitment) for _ in range(1000)))
    assert sum(r["valid"] for r in results) == 1
    assert sum(r.get("reason") == "replayed" for r in results) == 999


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "bad_json"),
        (b"", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (json.dumps({"commitment": "00"}).encode(), 400, "missing_nonce"),
        (json.dumps({"nonce": 5, "commitment": "00"}).encode(), 400, "bad_nonce"),
        (json.dumps({"nonce": "ab" * 8, "commitment": "00"}).encode(), 400, "bad_nonce"),
        (json.dumps({"nonce": "ab" * 16}).encode(), 400, "missing_commitment"),
        (json.dumps({"nonce": "ab" * 16, "commitment": "xyz"}).encode(), 400, "bad_commitment"),
        (json.dumps({"nonce": "ab" * 16, "commitment": ["00"]}).encode(), 400, "bad_commitment"),
        (b"[" * 60000, 400, "bad_json"),
    ],
)
async def test_rint_verify_malformed(service: Service, body: bytes, status: int, code: str) -> None:
    async with unix_client(sock(service)) as c:
        r = await c.post("/v1/rint/verify", data=body, headers={"Content-Type": "application/json"})
        assert (await error_of(r, status))["error"] == code


async def test_rint_malformed_request_does_not_consume(service: Service) -> None:
    async with unix_client(sock(service)) as c:
        n = await new_nonce(c)
        r = await c.post("/v1/rint/verify", json={"nonce": n, "commitment": "zz"})
        assert r.status == 400
        assert (await verify(c, n, v4_commitment(n)))["valid"] is True


# -- symmetric key ------------------------------------------------------------------------------------

def encrypt_independently(key: bytes, plaintext: bytes, iv: bytes) -> str:
    p = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(p.update(plaintext) + p.finalize()) + enc.finalize()
    return f"{iv.hex()}|{base64.b64encode(ct).decode()}"


def decrypt_independently(key: bytes, wire: str) -> bytes:
    iv_hex, b64 = wire.split("|", 1)
    dec = Cipher(algorithms.AES(key), modes.CBC(bytes.fromhex(iv_hex))).decryptor()
    padded = dec.update(base64.b64decode(b64)) + dec.finalize()
    u = padding.PKCS7(128).unpadder()
    return u.update(padded) + u.finalize()


async def test_symkey_verify_vectors(service: Service) -> None:
    key = secrets.token_bytes(16)
    iv = secrets.token_bytes(16)
    good = encrypt_independently(key, b"response from tcp 8080", iv)
    async with unix_client(sock(service)) as c:
        async def check(resp: str, proto="tcp", port=8080, k=key) -> dict:
            r = await c.post("/v1/symkey/verify", json={"symmetric_key": k.hex(), "response": resp,
                                                        "proto": proto, "port": port})
            assert r.status == 200, await r.text()
            return await r.json()

        assert await check(good) == {"valid": True, "reason": "ok"}
        assert await check(good, proto="TCP") == {"valid": True, "reason": "ok"}
        assert (await check(good, port=8081))["reason"] == "mismatch"
        assert (await check(good, proto="udp"))["reason"] == "mismatch"
        wrong_key = await check(good, k=secrets.token_bytes(16))
        assert wrong_key["valid"] is False and wrong_key["reason"] in ("bad_padding", "mismatch")
        assert (await check(good.replace("|", "")))["reason"] == "missing_separator"
        assert (await check("zz|" + good.split("|")[1]))["reason"] == "bad_iv"
        assert (await check(good.split("|")[0] + "|!!!"))["reason"] == "bad_base64"
        udp = encrypt_independently(key, b"response from udp 53", iv)
        assert await check(udp, proto="udp", port=53) == {"valid": True, "reason": "ok"}


async def test_symkey_respond_decrypts_independently(service: Service) -> None:
    key = secrets.token_bytes(16)
    async with unix_client(sock(service)) as c:
        r = await c.post("/v1/symkey/respond", json={"symmetric_key": key.hex(), "proto": "udp", "port": 9001})
        assert r.status == 200
        wire = (await r.json())["response"]
        r2 = await c.post("/v1/symkey/respond", json={"symmetric_key": key.hex(), "proto": "udp", "port": 9001})
        wire2 = (await r2.json())["response"]
    assert re.fullmatch(r"[0-9a-f]{32}\|[A-Za-z0-9+/]+=*", wire)
    assert decrypt_independently(key, wire) == b"response from udp 9001"
    assert wire.split("|")[0] != wire2.split("|")[0]  # fresh IV each time


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"proto": "tcp", "port": 1, "response": "x"}, "missing_symmetric_key"),
        ({"symmetric_key": "ab" * 15, "proto": "tcp", "port": 1, "response": "x"}, "bad_symmetric_key"),
        ({"symmetric_key": "ab" * 16, "proto": "sctp", "port": 1, "response": "x"}, "bad_proto"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": 0, "response": "x"}, "bad_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": True, "response": "x"}, "bad_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": 70000, "response": "x"}, "bad_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": "\u00b2", "response": "x"}, "bad_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": "9" * 5000, "response": "x"}, "bad_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "response": "x"}, "missing_port"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": 1}, "missing_response"),
        ({"symmetric_key": "ab" * 16, "proto": "tcp", "port": 1, "response": 7}, "bad_response"),
    ],
)
async def test_symkey_malformed(service: Service, body: dict, code: str) -> None:
    async with unix_client(sock(service)) as c:
        r = await c.post("/v1/symkey/verify", json=body)
        err = await error_of(r, 400)
    assert err["error"] == code
    assert "ab" * 15 not in err["detail"]  # never echo key material


# -- rate limits, size caps, malformed HTTP -------------------------------------------------------------

async def test_rate_limits_evidence_and_nonce_separately(service_factory) -> None:
    svc = await service_factory(evidence_rate_per_s=0.001, evidence_burst=2, nonce_rate_per_s=0.001, nonce_burst=3)
    async with unix_client(sock(svc)) as c:
        for _ in range(2):
            assert (await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})).status == 200
        r = await c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)})
        assert (await error_of(r, 429))["error"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        for _ in range(3):  # the nonce bucket is separate and still full
            assert (await c.post("/v1/rint/nonce")).status == 200
        r = await c.post("/v1/rint/nonce")
        assert (await error_of(r, 429))["error"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
    async with unix_client(svc.cfg.serve.compat_socket) as c:  # same caller, same evidence bucket
        r = await c.get("/tdx/quote", params={"nonce": secrets.token_hex(32)})
        assert r.status == 429 and "detail" in await r.json()


async def test_oversized_body_is_413(service: Service) -> None:
    big = json.dumps({"nonce": "ab" * 16, "commitment": "00" * 40000}).encode()
    assert len(big) > service.cfg.serve.max_body_bytes
    async with unix_client(sock(service)) as c:
        r = await c.post("/v1/rint/verify", data=big)
        assert (await error_of(r, 413))["error"] == "body_too_large"

        async def chunks():  # no Content-Length: the cap applies while reading
            for _ in range(20):
                yield b"x" * 8192

        r = await c.post("/v1/symkey/verify", data=chunks())
        assert (await error_of(r, 413))["error"] == "body_too_large"


async def raw_exchange(path: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


@pytest.mark.parametrize("payload", [b"BLAH\r\n\r\n", b"GET /v1/health HTTP/1.1\r\nHost\r\n\r\n",
                                     b"GET /v1/health HTTP/9.9\r\n\r\n"])
async def test_malformed_http_is_400(service: Service, payload: bytes) -> None:
    data = await raw_exchange(sock(service), payload)
    assert data.startswith(b"HTTP/1.") and data.split(b" ")[1][:1] == b"4", data[:80]
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_http"
    assert payload.split(b"\r\n")[0] not in body  # the raw request line is never echoed


def open_chute_connections(svc: Service) -> int:
    """Connections the chute socket holds, as the node status reports them."""
    return node_status(svc.ctx)["counters"]["connections"]["chute"]["open"]


async def hold_two_then_try_third(svc: Service) -> tuple[list, bytes]:
    """Open two idle connections, then send a request on a third; returns (held, what the third got)."""
    held = [await asyncio.open_unix_connection(sock(svc)) for _ in range(2)]
    await async_wait_until(lambda: open_chute_connections(svc) == 2, "the two held connections accepted")
    reader, writer = await asyncio.open_unix_connection(sock(svc))
    try:  # refused at accept: closed before or after the request is written (EPIPE / reset / EOF)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(100), 10)
    except ConnectionError:
        answer = b""
    writer.close()
    return held, answer


async def test_connection_cap(service_factory) -> None:
    svc = await service_factory(max_connections=2)
    held, answer = await hold_two_then_try_third(svc)
    assert answer == b""  # closed without an answer
    for _, w in held:
        w.close()
    await async_wait_until(lambda: open_chute_connections(svc) == 0, "the held connections closed")
    async with unix_client(sock(svc)) as c:
        assert (await c.get("/v1/health")).status == 200
    assert svc.ctx.trackers["chute"].refused == 1


async def test_header_timeout_closes_slow_request_head(service_factory) -> None:
    svc = await service_factory(header_timeout_s=0.3, idle_timeout_s=30)
    reader, writer = await asyncio.open_unix_connection(sock(svc))
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # head never completed
    assert await asyncio.wait_for(reader.read(100), 10) == b""
    writer.close()
    assert svc.ctx.trackers["chute"].timed_out == 1


async def test_idle_timeout_closes_silent_connection(service_factory) -> None:
    svc = await service_factory(header_timeout_s=5, idle_timeout_s=0.3)
    reader, writer = await asyncio.open_unix_connection(sock(svc))
    assert await asyncio.wait_for(reader.read(100), 10) == b""
    writer.close()


async def test_queue_full_is_429_with_retry_after(service_factory, monkeypatch) -> None:
    import threading

    from agent.sim.quote_sim import SimulatedQuoteSource

    # one waiting slot; the held source below keeps the running one busy until the refusals are in
    svc = await service_factory(evidence_rate_per_s=1000.0, evidence_burst=1000, quote__queue_max=1)
    real = SimulatedQuoteSource.get_quote
    release = threading.Event()

    def held(self, report_data: bytes) -> bytes:  # emulated slow QGS: answers when the test says so
        release.wait(60)
        return real(self, report_data)

    monkeypatch.setattr(SimulatedQuoteSource, "get_quote", held)
    async with unix_client(sock(svc), limit=10) as c:
        tasks = [asyncio.ensure_future(c.get("/v1/evidence", params={"nonce": secrets.token_hex(32)}))
                 for _ in range(4)]
        try:  # the source is held: at most two (running + waiting) can be in the queue, the others refused
            await async_wait_until(lambda: sum(t.done() for t in tasks) >= 2, "two requests refused")
        finally:
            release.set()
        rs = await asyncio.gather(*tasks)
        statuses = sorted(r.status for r in rs)
        refused = [r for r in rs if r.status == 429]
        assert statuses.count(200) >= 1 and refused
        body = await refused[0].json()
        assert body["error"] == "queue_full" and int(refused[0].headers["Retry-After"]) >= 1


async def test_relay_non_ascii_authorization_is_400(service: Service) -> None:
    payload = b"GET /v1/rint/validator-nonce HTTP/1.1\r\nHost: x\r\nAuthorization: \xff\xfe\r\n\r\n"
    data = await raw_exchange(sock(service), payload)
    assert data.startswith(b"HTTP/1.1 400"), data[:80]
    assert b'"bad_token"' in data


@pytest.mark.integration  # relies on the caller being uid 0 with socket_mode 0o666
async def test_per_caller_connection_cap_leaves_room_for_others(service_factory) -> None:
    svc = await service_factory(max_connections=10, max_connections_per_caller=2, socket_mode=0o666)
    held, answer = await hold_two_then_try_third(svc)
    assert answer == b""  # this caller (uid 0) is at its cap
    # Another caller (uid 65534, a real process) still gets in while uid 0 holds its two slots.
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]);"
            "s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n');"
            "print(s.recv(100)[:12].decode())")
    for d in (Path(sock(svc)).parent, Path(sock(svc)).parent.parent):
        d.chmod(0o755)  # let uid 65534 reach the socket
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    proc = await asyncio.create_subprocess_exec(
        python, "-c", code, sock(svc), user=65534, stdout=asyncio.subprocess.PIPE, cwd="/")
    out, _ = await proc.communicate()
    assert out.decode().strip() == "HTTP/1.1 200"
    for _, w in held:
        w.close()
    assert svc.ctx.trackers["chute"].refused == 1
