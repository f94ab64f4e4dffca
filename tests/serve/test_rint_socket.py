"""rint verify over the real chute socket: the validator's v4 semantics by default, ``rint.v4_nonce =
"exact"`` as the strict option, and the small-order forgery refused with its reason (issue 14 item 5,
issue 11 item 13)."""

from __future__ import annotations

import os

from agent.serve.server import Service
from tests.serve.helpers import unix_client, v3_commitment, v4_commitment

IDENTITY = (1).to_bytes(32, "little")


async def _nonce(c) -> str:
    r = await c.post("/v1/rint/nonce")
    assert r.status == 200
    return (await r.json())["nonce"]


async def _verify(c, nonce: str, commitment: str) -> dict:
    r = await c.post("/v1/rint/verify", json={"nonce": nonce, "commitment": commitment})
    assert r.status == 200, await r.text()
    return await r.json()


async def test_default_is_validator_semantics(service: Service) -> None:
    assert service.cfg.rint.v4_nonce == "validator"
    async with unix_client(service.cfg.serve.chute_socket) as c:
        n = await _nonce(c)
        res = await _verify(c, n, v4_commitment(n, nonce_override=os.urandom(16)))
        assert (res["valid"], res["reason"], res["nonce_bound"]) == (True, "ok", False)
        n = await _nonce(c)
        res = await _verify(c, n, v4_commitment(n))
        assert (res["valid"], res["nonce_bound"]) == (True, True)
        n = await _nonce(c)  # v3 is unchanged: the derived nonce is required
        res = await _verify(c, n, v3_commitment(n, nonce_override=os.urandom(16)))
        assert (res["valid"], res["reason"], res["nonce_bound"]) == (False, "nonce_mismatch", False)


async def test_exact_mode(service_factory) -> None:
    svc = await service_factory(rint__v4_nonce="exact")
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        n = await _nonce(c)
        res = await _verify(c, n, v4_commitment(n, nonce_override=os.urandom(16)))
        assert (res["valid"], res["reason"], res["nonce_bound"]) == (False, "nonce_mismatch", False)


async def test_identity_key_forgery_refused_over_the_socket(service: Service) -> None:
    async with unix_client(service.cfg.serve.chute_socket) as c:
        n = await _nonce(c)
        forged = b"\x04\x04" + IDENTITY + bytes.fromhex(n) + os.urandom(32) + IDENTITY + bytes(32)
        res = await _verify(c, n, forged.hex())
    assert (res["valid"], res["reason"]) == (False, "small_order_pubkey")
    assert res["commitment"]["pubkey"] == IDENTITY.hex()
