"""The rint nonce store is bounded so its worst case fits the unit's MemoryMax with room to spare.

Filling the old store to its global cap (1,000,000) cost ~284 MiB against MemoryMax=500M, and at the cap
it silently evicted other callers' nonces. Now the cap is 65,536 by default, and a full store answers
503 JSON with Retry-After.
"""

from __future__ import annotations

import gc
import re
import tracemalloc

from agent.config import ServeConfig
from agent.serve.rint import NonceStore, NonceStoreFull
from tests.serve.helpers import REPO, unix_client


def _memory_max_bytes() -> int:
    text = (REPO / "systemd" / "chutes-attest.service").read_text()
    m = re.search(r"^MemoryMax=(\d+)([KMG]?)\s*$", text, re.M)
    assert m, "MemoryMax= not found in the unit"
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)]


def _bytes_per_entry(scopes: int, n: int = 20000) -> tuple[float, float]:
    """(live, spent) bytes per nonce measured with tracemalloc; ``scopes`` distinct callers."""
    names = [f"container:{i:064x}" for i in range(scopes)]
    store = NonceStore(300, n, max_total=2 * n, replay_memory=n)  # room for n container nonces
    gc.collect()
    tracemalloc.start()
    try:
        b0 = tracemalloc.get_traced_memory()[0]
        issued = [(store.issue(names[i % scopes])[0], names[i % scopes]) for i in range(n)]
        b1 = tracemalloc.get_traced_memory()[0]
        live = (b1 - b0 - 8 * n - 56 * n) / n  # minus this test's own list of (nonce, scope) tuples
        for nonce, scope in issued:
            assert store.consume(nonce, scope) == "ok"
        del issued
        gc.collect()
        b2 = tracemalloc.get_traced_memory()[0]
        spent = (b2 - b0) / n
    finally:
        tracemalloc.stop()
    return live, spent


def test_entry_sizes_and_default_cap_fit_memory_max() -> None:
    live_one_scope, spent = _bytes_per_entry(scopes=10)
    live_many_scopes, _ = _bytes_per_entry(scopes=10000)
    assert live_one_scope <= NonceStore.LIVE_ENTRY_BYTES
    assert live_many_scopes <= NonceStore.LIVE_ENTRY_BYTES
    assert spent <= NonceStore.SPENT_ENTRY_BYTES
    cfg = ServeConfig()
    worst = cfg.rint_nonces_max * NonceStore.LIVE_ENTRY_BYTES + 65536 * NonceStore.SPENT_ENTRY_BYTES
    assert worst < _memory_max_bytes() / 8, (worst, _memory_max_bytes())


def test_global_cap_refuses_instead_of_evicting_neighbours() -> None:
    store = NonceStore(300, per_scope=3, max_total=5)
    victim, _ = store.issue("container:victim")
    for _ in range(3):
        store.issue("container:a")
    store.issue("container:b")
    assert len(store) == 5
    try:
        store.issue("container:c")
    except NonceStoreFull as exc:
        assert exc.status == 503 and exc.code == "nonce_store_full" and int(exc.headers["Retry-After"]) >= 1
    else:
        raise AssertionError("issue beyond the global cap must be refused")
    # a caller at its own per-caller cap still rotates its own nonces; the victim's stays valid
    store.issue("container:a")
    assert len(store) == 5 and store.refused_full == 1
    assert store.consume(victim, "container:victim") == "ok"


async def test_full_store_answers_503_json_over_the_socket(service_factory) -> None:
    svc = await service_factory(rint_nonces_max=8, rint_nonces_per_caller=100)
    room = svc.ctx.nonces.budget.free("host")  # this test is a host process: the pool less the guarantees
    assert room == 6  # 8 less the containers' guarantee (2); host processes' (8 // 16) and the lane are 0
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        first = [await c.post("/v1/rint/nonce") for _ in range(room)]
        assert [r.status for r in first] == [200] * room
        kept = (await first[0].json())["nonce"]
        r = await c.post("/v1/rint/nonce")
        assert r.status == 503 and r.content_type == "application/json"
        assert (await r.json())["error"] == "nonce_store_full"
        assert int(r.headers["Retry-After"]) >= 1
    assert len(svc.ctx.nonces) == room and svc.ctx.nonces.live_for(next(iter(svc.ctx.nonces._by_scope))) == room
    assert kept in svc.ctx.nonces._live  # nobody's nonce was evicted to make room
