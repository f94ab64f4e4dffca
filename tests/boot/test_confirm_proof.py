"""Issue 18 item 9 ("rotation that never strands a disk"): a root or storage confirm kills old key slots only
on the validator's confirmation body, removes the new key only on a refusal the validator states, and keeps
both keys for everything else — over real TLS from a scripted server, on real LUKS2 images, checked with
``cryptsetup --test-passphrase`` for every key.

Before the fix a bare 200 (an HTML page, JSON without the per-volume ``result``) was taken as committed (old
slots killed: a validator that did not commit then holds no key that opens the disk), and a 502 or a cut
connection after the validator committed was taken as a refusal (new key removed: the next boot cannot unlock).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.boot.client_cert import ClientIdentity, ssl_context
from agent.boot.confirm import ConfirmAnswer, ConfirmUnknown, is_stated_refusal, send_confirm
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.rotation import RotationError, rotate_root
from agent.boot.storage import StorageError, StorageSettings, VolumeKeys, setup_storage
from agent.boot.vm_ca import self_signed_rsa
from agent.log import Secret
from agent.sim.luks_image import FAST_KDF, make_luks_image
from agent.validator.client import ValidatorClient, compact_json
from agent.validator.errors import (
    ValidatorHTTPError,
    ValidatorProtocolError,
    ValidatorRedirectError,
    ValidatorTransportError,
)
from agent.validator.schemas import ConfirmResponse
from tests.boot.scripted import Answer, Request, ScriptedServer, json_answer, response

pytestmark = pytest.mark.integration

OLD = "old-build-passphrase-0123456789"
NEW = "a" * 64 + "b" * 64
PATH = "/servers/chutes-vm-07/provision/confirm"
EP = "POST /servers/{vm}/provision/confirm"
CUR = {"storage": "s" * 128, "tdx-cache": "c" * 128}
NXT = {"storage": "S" * 128, "tdx-cache": "C" * 128}


def confirmed(**results: str) -> dict[str, Any]:
    return {"status": "confirmed", "volumes": {n.replace("_", "-"): {"result": r} for n, r in results.items()}}


def html(status: int) -> Answer:
    return response(status, b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                    extra_headers={"Content-Type": "text/html"})


#: (case, answer, keys that open the root afterwards, RotationError step or None)
ROOT_CASES: list[tuple[str, Callable[[Request], Answer], set[str], str | None]] = [
    ("promoted", lambda r: json_answer(200, confirmed(root="promoted")), {"new"}, None),
    # 200 that proves nothing: the validator may not have promoted root_next -> the old key must stay
    ("200 html page", lambda r: html(200), {"old", "new"}, "confirm"),
    ("200 empty object", lambda r: json_answer(200, {}), {"old", "new"}, "confirm"),
    ("200 no status", lambda r: json_answer(200, {"volumes": {"root": {"result": "promoted"}}}), {"old", "new"},
     "confirm"),
    ("200 status not confirmed", lambda r: json_answer(200, {**confirmed(root="promoted"), "status": "pending"}),
     {"old", "new"}, "confirm"),
    ("200 no volumes", lambda r: json_answer(200, {"status": "confirmed"}), {"old", "new"}, "confirm"),
    ("200 no per-volume result", lambda r: json_answer(200, {"status": "confirmed", "volumes": {"root": {}}}),
     {"old", "new"}, "confirm"),
    ("200 other volume only", lambda r: json_answer(200, confirmed(storage="promoted")), {"old", "new"}, "confirm"),
    ("200 discarded", lambda r: json_answer(200, confirmed(root="discarded")), {"old", "new"}, "confirm"),
    ("200 no_pending", lambda r: json_answer(200, confirmed(root="no_pending")), {"old", "new"}, "confirm"),
    ("200 unknown result", lambda r: json_answer(200, confirmed(root="PROMOTED")), {"old", "new"}, "confirm"),
    ("200 trailing data", lambda r: response(200, compact_json(confirmed(root="promoted")) + b"<html>"),
     {"old", "new"}, "confirm"),
    # answers lost or not the validator's: it may have committed -> the new key must stay
    ("502 json", lambda r: json_answer(502, {"detail": "Bad gateway"}), {"old", "new"}, "confirm"),
    ("502 html", lambda r: html(502), {"old", "new"}, "confirm"),
    ("500 json detail", lambda r: json_answer(500, {"detail": "Internal Server Error"}), {"old", "new"}, "confirm"),
    ("503 json detail", lambda r: json_answer(503, {"detail": "try later"}), {"old", "new"}, "confirm"),
    ("403 html (a proxy's page)", lambda r: html(403), {"old", "new"}, "confirm"),
    ("422 detail list", lambda r: json_answer(422, {"detail": [{"loc": ["body"], "msg": "x"}]}), {"old", "new"},
     "confirm"),
    ("307 redirect", lambda r: json_answer(307, {"detail": "moved"}, extra_headers={"Location": "http://x/"}),
     {"old", "new"}, "confirm"),
    ("cut after the headers", lambda r: [b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"status\"", None],
     {"old", "new"}, "confirm"),
    ("connection closed, no answer", lambda r: [None], {"old", "new"}, "confirm"),
    ("timeout", lambda r: [3.0, *json_answer(200, confirmed(root="promoted"))], {"old", "new"}, "confirm"),
    # refusals the validator states (4xx + its JSON detail): it kept the old key -> root_next is removed again
    ("401 bad nonce", lambda r: json_answer(401, {"detail": "Invalid or expired confirm nonce"}), {"old"}, None),
    ("400 unsupported", lambda r: json_answer(400, {"detail": "Unsupported volume: 'root'"}), {"old"}, None),
    ("403 bad proof", lambda r: json_answer(403, {"detail": "Invalid signature"}), {"old"}, None),
]


@pytest.fixture(scope="module")
def identity() -> ClientIdentity:
    return self_signed_rsa(2048)


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[ScriptedServer]:
    s = await ScriptedServer(tmp_path / "srv").start()
    try:
        yield s
    finally:
        await s.stop()


def _client(srv: ScriptedServer, identity: ClientIdentity) -> ValidatorClient:
    return ValidatorClient(srv.url, ssl_context(identity, str(srv.tls.ca_pem)), 1.5)


def _keys(dev: str, candidates: dict[str, str]) -> set[str]:
    cs = Cryptsetup()
    return {name for name, key in candidates.items() if cs.test_key(dev, Secret(key))}


@pytest.mark.parametrize(("case", "answer", "keys", "step"), ROOT_CASES, ids=[c[0] for c in ROOT_CASES])
async def test_root_confirm_answer_decides_the_slots(
        tmp_path: Path, srv: ScriptedServer, identity: ClientIdentity, case: str,
        answer: Callable[[Request], Answer], keys: set[str], step: str | None) -> None:
    dev = str(tmp_path / "root.img")
    make_luks_image(dev, Secret(OLD), label="root")
    srv.routes[("POST", PATH)] = answer
    body = compact_json({"volumes": {"root": {"rotated": True}}})
    async with _client(srv, identity) as client:
        async def confirm() -> ConfirmAnswer:
            return await send_confirm(client, EP, PATH, {"X-Confirm-Nonce": "ab" * 32}, body, ("root",))

        try:
            out = await rotate_root(Cryptsetup(), dev, Secret(OLD), Secret(NEW), confirm,
                                    on_confirm_failure="continue", kdf=FAST_KDF)
            got_step, kept = None, out.active_key
        except RotationError as exc:
            got_step, kept = exc.step, exc.keys
    assert [r.body for r in srv.requests] == [body]  # one confirm, exactly the bytes sent
    now = _keys(dev, {"old": OLD, "new": NEW})
    assert now == keys, f"{case}: disk opens with {now}"
    assert got_step == step
    assert kept == {frozenset({"new"}): "new", frozenset({"old"}): "old"}.get(frozenset(keys), "old+new")
    # the next boot opens with whichever key the validator then releases
    assert now & {"old", "new"}


async def test_refused_with_poweroff_policy_still_reverts(tmp_path: Path, srv: ScriptedServer,
                                                          identity: ClientIdentity) -> None:
    dev = str(tmp_path / "root.img")
    make_luks_image(dev, Secret(OLD), label="root")
    srv.routes[("POST", PATH)] = lambda r: json_answer(401, {"detail": "Invalid or expired confirm nonce"})
    async with _client(srv, identity) as client:
        async def confirm() -> ConfirmAnswer:
            return await send_confirm(client, EP, PATH, {}, b"{}", ("root",))

        with pytest.raises(RotationError) as ei:
            await rotate_root(Cryptsetup(), dev, Secret(OLD), Secret(NEW), confirm, kdf=FAST_KDF)
    assert (ei.value.step, ei.value.keys) == ("confirm", "old")
    assert "HTTP 401 (Invalid or expired confirm nonce)" in str(ei.value)
    assert _keys(dev, {"old": OLD, "new": NEW}) == {"old"}
    assert Cryptsetup().keyslots(dev) == [0]


# -- storage: per volume ---------------------------------------------------------------------------

@pytest.fixture
def vols(tmp_path: Path) -> dict[str, str]:
    out = {}
    for label in ("storage", "tdx-cache"):
        path = str(tmp_path / f"{label}.img")
        make_luks_image(path, Secret(CUR[label]), label=label)
        out[label] = path
    return out


#: (case, answer, keys on storage, keys on tdx-cache, StorageError fragment or None)
STORAGE_CASES: list[tuple[str, Callable[[Request], Answer], set[str], set[str], str | None]] = [
    ("both promoted", lambda r: json_answer(200, confirmed(storage="promoted", tdx_cache="promoted")),
     {"next"}, {"next"}, None),
    ("cache result missing", lambda r: json_answer(200, confirmed(storage="promoted")),
     {"next"}, {"current", "next"}, "tdx-cache (result unproven)"),
    ("cache discarded", lambda r: json_answer(200, confirmed(storage="promoted", tdx_cache="discarded")),
     {"next"}, {"current", "next"}, "tdx-cache (result discarded)"),
    ("200 html page", lambda r: html(200), {"current", "next"}, {"current", "next"}, "no answer"),
    ("200 without results", lambda r: json_answer(200, {"status": "confirmed", "volumes": {}}),
     {"current", "next"}, {"current", "next"}, "storage (result unproven), tdx-cache (result unproven)"),
    ("502 json", lambda r: json_answer(502, {"detail": "Bad gateway"}), {"current", "next"}, {"current", "next"},
     "no answer"),
    ("cut connection", lambda r: [None], {"current", "next"}, {"current", "next"}, "no answer"),
    ("401 stated refusal", lambda r: json_answer(401, {"detail": "Invalid or expired confirm nonce"}),
     {"current"}, {"current"}, None),
]


@pytest.mark.parametrize(("case", "answer", "k_storage", "k_cache", "error"), STORAGE_CASES,
                         ids=[c[0] for c in STORAGE_CASES])
async def test_storage_confirm_answer_decides_the_slots_per_volume(
        tmp_path: Path, srv: ScriptedServer, identity: ClientIdentity, vols: dict[str, str], case: str,
        answer: Callable[[Request], Answer], k_storage: set[str], k_cache: set[str], error: str | None) -> None:
    srv.routes[("POST", PATH)] = answer
    settings = StorageSettings(devices=vols, action="test-passphrase", header_dir=str(tmp_path / "hdr"),
                               wait_s=0.0, kdf=FAST_KDF, generation="1.4")
    keys = {lbl: VolumeKeys(Secret(CUR[lbl]), Secret(NXT[lbl])) for lbl in vols}
    async with _client(srv, identity) as client:
        async def confirm(doc: dict[str, object]) -> ConfirmAnswer:
            return await send_confirm(client, EP, PATH, {}, compact_json(doc), ("storage", "tdx-cache"))

        if error is None:
            await setup_storage(Cryptsetup(), keys, settings, confirm=confirm)
        else:
            with pytest.raises(StorageError, match=error.replace("(", r"\(").replace(")", r"\)")):
                await setup_storage(Cryptsetup(), keys, settings, confirm=confirm)
    assert json.loads(srv.requests[0].body) == {"volumes": {"storage": {"rotated": True},
                                                            "tdx-cache": {"rotated": True}}}
    got = {lbl: _keys(vols[lbl], {"current": CUR[lbl], "next": NXT[lbl]}) for lbl in vols}
    assert got == {"storage": k_storage, "tdx-cache": k_cache}, case


async def test_13_unproven_confirm_keeps_both_and_carries_on(tmp_path: Path, vols: dict[str, str]) -> None:
    """1.3.x failures are non-fatal: an unproven answer keeps both keys and the boot goes on."""
    settings = StorageSettings(devices=vols, action="test-passphrase", header_dir=str(tmp_path / "hdr"),
                               wait_s=0.0, kdf=FAST_KDF, generation="1.3")
    keys = {lbl: VolumeKeys(Secret(CUR[lbl]), Secret(NXT[lbl])) for lbl in vols}

    async def confirm(doc: dict[str, object]) -> ConfirmAnswer:
        return ConfirmAnswer(results={"storage": "promoted"})

    res = await setup_storage(Cryptsetup(), keys, settings, confirm=confirm)
    assert res.confirmed is None
    assert [v.outcome for v in res.volumes] == ["rotated", "kept-both"]
    assert _keys(vols["storage"], {"c": CUR["storage"], "n": NXT["storage"]}) == {"n"}
    assert _keys(vols["tdx-cache"], {"c": CUR["tdx-cache"], "n": NXT["tdx-cache"]}) == {"c", "n"}


async def test_fresh_volume_not_promoted_fails_closed(tmp_path: Path) -> None:
    """A raw volume formatted with ``next`` (current null) needs the validator to keep ``next``: a
    confirmation that says otherwise stops a 1.4.0 boot (nothing is killed: the volume has one key)."""
    dev = str(tmp_path / "storage.img")
    with open(dev, "wb") as fh:
        fh.truncate(24 << 20)
    settings = StorageSettings(devices={"storage": dev}, labels=("storage",), action="test-passphrase",
                               header_dir=str(tmp_path / "hdr"), wait_s=0.0, kdf=FAST_KDF, generation="1.4")

    async def confirm(doc: dict[str, object]) -> ConfirmAnswer:
        return ConfirmAnswer(results={"storage": "discarded"})

    with pytest.raises(StorageError, match=r"storage \(sent rotated=true, result discarded\)"):
        await setup_storage(Cryptsetup(), {"storage": VolumeKeys(None, Secret(NXT["storage"]))}, settings,
                            confirm=confirm)
    assert Cryptsetup().test_key(dev, Secret(NXT["storage"]))


# -- the pieces ------------------------------------------------------------------------------------

def test_confirm_response_parse() -> None:
    vols = ("storage", "tdx-cache")
    body = json.dumps(confirmed(storage="promoted", tdx_cache="no_pending")).encode()
    assert ConfirmResponse.parse(EP, body, vols).results == {"storage": "promoted", "tdx-cache": "no_pending"}
    partial = json.dumps({"status": "confirmed", "volumes": {"storage": {"result": 1}, "tdx-cache": "x"}}).encode()
    assert ConfirmResponse.parse(EP, partial, vols).results == {}
    for bad, why in ((b"<html></html>", "not JSON"), (b"{}", "'status' is missing"),
                     (b'{"status":"ok","volumes":{}}', "'status' is 'ok'"),
                     (b'{"status":"confirmed"}', "'volumes' missing"), (b"[]", "expected an object")):
        with pytest.raises(ValidatorProtocolError, match=why):
            ConfirmResponse.parse(EP, bad, vols)


def test_stated_refusal_rule() -> None:
    assert is_stated_refusal(ValidatorHTTPError(EP, 401, "Invalid or expired confirm nonce"))
    assert is_stated_refusal(ValidatorHTTPError(EP, 400, "Unsupported volume"))
    assert not is_stated_refusal(ValidatorHTTPError(EP, 403, ""))  # no JSON detail: not the validator's answer
    assert not is_stated_refusal(ValidatorHTTPError(EP, 502, "Bad gateway"))
    assert not is_stated_refusal(ValidatorHTTPError(EP, 500, "Internal Server Error"))
    assert not is_stated_refusal(ValidatorRedirectError(EP, 307, "http://x"))
    answer = ConfirmAnswer(refused=True, detail="x")
    assert not answer.promoted("root") and answer.result("root") == "refused"
    assert ConfirmAnswer(results={"root": "promoted"}).promoted("root")
    assert ConfirmAnswer().result("root") == "unproven"


async def test_send_confirm_raises_for_what_proves_nothing(srv: ScriptedServer, identity: ClientIdentity) -> None:
    srv.routes[("POST", PATH)] = lambda r: json_answer(502, {"detail": "Bad gateway"})
    async with _client(srv, identity) as client:
        with pytest.raises(ConfirmUnknown, match=r"HTTP 502 \(Bad gateway\): not a refusal the validator stated"):
            await send_confirm(client, EP, PATH, {}, b"{}", ("root",))
        srv.routes[("POST", PATH)] = lambda r: [None]
        with pytest.raises(ValidatorTransportError):
            await send_confirm(client, EP, PATH, {}, b"{}", ("root",))
        srv.routes[("POST", PATH)] = lambda r: html(200)
        with pytest.raises(ValidatorProtocolError, match="not JSON"):
            await send_confirm(client, EP, PATH, {}, b"{}", ("root",))
