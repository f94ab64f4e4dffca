"""v4-only quotes on the compat socket (issue 14 item 4): a platform that produces v5 quotes gets a 503
naming the version and the setting there (the validator reads v4 offsets only), counted; ``quote.allow_v5``
serves them; ``/v1/evidence`` says which version it carries; ``doctor`` flags it.

The v5 quotes are the real v5 sample (tests/data) with the requested REPORTDATA written into its TD body,
so the service's own start-up self-check (parse + REPORTDATA) runs unmodified."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from agent.quote import parse_quote
from tests.serve.helpers import make_cfg, unix_client

V5_REPORT_DATA_AT = 48 + 6 + 520  # header, body descriptor (type u16, size u32), TD body offset 520


class V5Source:
    name = "v5-sample"

    def __init__(self, sample: bytes) -> None:
        self.sample = sample

    def get_quote(self, report_data: bytes) -> bytes:
        q = bytearray(self.sample)
        q[V5_REPORT_DATA_AT:V5_REPORT_DATA_AT + 64] = report_data
        return bytes(q)


@pytest.fixture
def v5_source(quotes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> V5Source:
    src = V5Source((quotes_dir / "gotdxguest_quote_v5_sample.bin").read_bytes())
    assert int(parse_quote(src.sample).version) == 5
    monkeypatch.setattr("agent.evidence.sources.make_quote_source", lambda cfg: src)
    return src


async def test_v5_refused_on_compat_counted_and_labelled_on_v1(service_factory, v5_source) -> None:
    svc = await service_factory()
    assert svc.ctx.measurements["quote_version"] == 5
    nonce = secrets.token_hex(32)
    async with unix_client(svc.cfg.serve.compat_socket) as c:
        for target in ("/attest", "/tdx/quote", "/quote"):
            r = await c.get(target, params={"nonce": nonce})
            assert r.status == 503, target
            assert r.content_type == "application/json"
            detail = (await r.json())["detail"]
            assert "v5" in detail and "quote.allow_v5 = false" in detail
        assert (await c.get("/nvtrust/evidence", params={"nonce": nonce})).status == 200  # no quote in it
    assert svc.ctx.collector.health.v5_refused == 3
    async with unix_client(svc.cfg.serve.chute_socket) as c:
        r = await c.get("/v1/evidence", params={"nonce": nonce})
        assert r.status == 200
        doc = await r.json()
    assert doc["quote_version"] == 5
    assert int.from_bytes(base64.b64decode(doc["quote"])[:2], "little") == 5


async def test_allow_v5_serves_them(service_factory, v5_source) -> None:
    svc = await service_factory(quote__allow_v5=True)
    nonce = secrets.token_hex(32)
    async with unix_client(svc.cfg.serve.compat_socket) as c:
        body = await (await c.get("/attest", params={"nonce": nonce})).json()
    q = parse_quote(base64.b64decode(body["tdx_quote"]))
    assert int(q.version) == 5 and bytes(q.report_data)[:32] == bytes.fromhex(nonce)
    assert svc.ctx.collector.health.v5_refused == 0


def test_doctor_flags_v5(short_tmp: Path, sim_dir: Path, v5_source) -> None:
    from agent.commands.doctor import check_quote

    cfg = make_cfg(short_tmp, sim_dir)
    c = check_quote(cfg)
    assert c.status == "fail" and "v5" in c.detail and "quote.allow_v5 = false" in c.detail
    cfg.quote.allow_v5 = True
    c = check_quote(cfg)
    assert c.status == "warn" and "v4 offsets only" in c.detail
