"""The LUKS2 header policy on real cryptsetup metadata, mutated one field at a time."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from agent.boot.cryptsetup import Cryptsetup
from agent.boot.luks_header import LuksHeaderError, check_binary_header, validate_metadata
from agent.log import Secret
from agent.sim.luks_image import make_luks_image


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    path = tmp_path_factory.mktemp("luks") / "img"
    make_luks_image(str(path), Secret("pw"), label="lbl")
    return Cryptsetup().dump_json(str(path)), Path(path).read_bytes()[: 4 * 1024 * 1024]


def test_real_header_passes(real: tuple[dict[str, Any], bytes]) -> None:
    meta, head = real
    s = validate_metadata(meta, head)
    assert (s.version, s.label, s.cipher, s.key_size, s.keyslots) == (2, "lbl", "aes-xts-plain64", 64, ["0"])
    assert len(s.uuid) == 36


def _set(meta: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = meta
    for p in parents:
        node = node[p]
    node[last] = value


@pytest.mark.parametrize(("path", "value", "message"), [
    ("segments.0.encryption", "cipher_null-ecb", "segments.0.encryption: 'cipher_null-ecb' not approved"),
    ("segments.0.encryption", "aes-cbc-plain", "segments.0.encryption: 'aes-cbc-plain' not approved"),
    ("segments.0.encryption", "aes-ecb", "not approved"),
    ("segments.0.type", "linear", "segments.0.type: 'linear', expected 'crypt'"),
    ("segments.0.integrity", {"type": "hmac(sha256)"}, "segments.0.integrity"),
    ("segments.0.sector_size", 1024, "segments.0.sector_size: 1024"),
    ("segments.0.offset", "0", "overlap the header"),
    ("keyslots.0.area.encryption", "cipher_null-ecb", "keyslots.0.area.encryption: 'cipher_null-ecb'"),
    ("keyslots.0.key_size", 16, "keyslots.0.key_size: 16 bytes not approved"),
    ("keyslots.0.area.key_size", 8, "keyslots.0.area.key_size"),
    ("keyslots.0.kdf.iterations", 10, "keyslots.0.kdf.iterations: below 1000"),
    ("keyslots.0.kdf.hash", "sha1", "keyslots.0.kdf.hash: 'sha1'"),
    ("keyslots.0.kdf.type", "none", "keyslots.0.kdf.type: 'none'"),
    ("keyslots.0.af.stripes", 1, "keyslots.0.af.stripes"),
    ("keyslots.0.type", "reencrypt", "keyslots.0.type"),
    ("digests.0.segments", [], "digests.0.segments"),
    ("digests.0.keyslots", [], "do not match"),
    ("tokens", {"0": {"type": "systemd-tpm2", "keyslots": ["0"]}}, "tokens: 1 token(s) present"),
    ("config.requirements", {"mandatory": ["online-reencrypt-v2"]}, "config.requirements"),
    ("config.flags", ["bogus-flag"], "config.flags: 'bogus-flag'"),
    ("segments", {}, "expected exactly one segment '0', found 0"),
    ("keyslots", {}, "keyslots: none"),
])
def test_each_deviation_is_refused(real: tuple[dict[str, Any], bytes], path: str, value: Any, message: str) -> None:
    meta = copy.deepcopy(real[0])
    _set(meta, path, value)
    with pytest.raises(LuksHeaderError) as exc:
        validate_metadata(meta)
    assert message in str(exc.value)


def test_benign_flags_pass(real: tuple[dict[str, Any], bytes]) -> None:
    meta = copy.deepcopy(real[0])
    meta["config"]["flags"] = ["allow-discards", "no-read-workqueue"]
    validate_metadata(meta)


@pytest.mark.parametrize(("offset", "data", "message"), [
    (0, b"LUKS\x00\x00", "no LUKS magic"),
    (6, b"\x00\x01", "LUKS version 1"),
    (300, b"\xff", "checksum mismatch"),
])
def test_binary_header_checks(real: tuple[dict[str, Any], bytes], offset: int, data: bytes, message: str) -> None:
    head = bytearray(real[1])
    head[offset: offset + len(data)] = data
    with pytest.raises(LuksHeaderError, match=message):
        check_binary_header(bytes(head))


def test_short_header() -> None:
    with pytest.raises(LuksHeaderError, match="only 10 bytes"):
        check_binary_header(b"LUKS\xba\xbe\x00\x02xx")


# --- fuzz: any metadata either passes or is refused with LuksHeaderError, never a crash ---------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.integration

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_metadata_never_crashes(real: tuple[dict[str, Any], bytes], data: st.DataObject) -> None:
    meta = copy.deepcopy(real[0])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(meta)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        node = meta
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = data.draw(_json)
    try:
        validate_metadata(meta)
    except LuksHeaderError:
        pass


@settings(max_examples=100, deadline=None)
@given(meta=_json)
def test_arbitrary_json_never_crashes(meta: Any) -> None:
    try:
        validate_metadata(meta)
    except LuksHeaderError:
        pass


def test_is_luks_distinguishes_not_luks_from_device_errors(tmp_path) -> None:
    """Only "not LUKS" may lead to the first-boot (format) path; a device error must never look blank."""
    import pytest

    from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
    from agent.log import Secret
    from agent.sim.luks_image import make_ext4_image, make_luks_image

    cs = Cryptsetup()
    luks = tmp_path / "luks.img"
    make_luks_image(str(luks), Secret("pass-for-test"), size_mb=20)
    plain = tmp_path / "plain.img"
    make_ext4_image(str(plain), {}, label="containerd-cache")
    assert cs.is_luks(str(luks)) is True
    assert cs.is_luks(str(plain)) is False
    with pytest.raises(CryptsetupError):
        cs.is_luks(str(tmp_path / "missing.img"))


# --- the captured headers (tests/data/luks2-headers/) through this machine's cryptsetup ------------------------

from agent.boot.volumes import validate_header_copy  # noqa: E402
from tests.boot.test_luks_header_captured import ACCEPT, CASES, DECISION_IDS, DECISIONS, captured  # noqa: E402


def _as_header_file(name: str, tmp_path: Path) -> Path:
    """The capture zero-padded to the header + keyslot areas its metadata declares (16 MiB when it has none)."""
    meta = CASES[name]["luksdump"]
    size = 16 * 1024 * 1024
    if meta is not None:
        size = 2 * (int(meta["config"]["json_size"]) + 4096) + int(meta["config"]["keyslots_size"])
    data = captured(name)
    path = tmp_path / f"{name}.hdr"
    path.write_bytes(data + bytes(max(0, size - len(data))))
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_captured_header_dumps_as_recorded(tmp_path: Path, name: str) -> None:
    """This cryptsetup reads each capture as the one that made it did (cases.json), or refuses it as that did."""
    from agent.boot.cryptsetup import CryptsetupError

    path = _as_header_file(name, tmp_path)
    if CASES[name]["luksdump"] is None:
        with pytest.raises(CryptsetupError):
            Cryptsetup().dump_json(str(path))
    else:
        assert Cryptsetup().dump_json(str(path)) == CASES[name]["luksdump"]


@pytest.mark.parametrize(("name", "policy", "decision"), DECISIONS, ids=DECISION_IDS)
def test_captured_header_decision_on_the_real_path(tmp_path: Path, name: str, policy: dict[str, Any],
                                                   decision: str) -> None:
    """The agent's own path (validate_header_copy: binary header + real luksDump) decides as the unit tier says;
    a header this cryptsetup cannot load is refused before the policy (as the unit tier's binary check or, for the
    JSON cryptsetup rejects, the policy alone, would)."""
    path = _as_header_file(name, tmp_path)
    try:
        validate_header_copy(Cryptsetup(), str(path), **policy)
        got = ACCEPT
    except LuksHeaderError as exc:
        got = str(exc)
    if CASES[name]["luksdump"] is None:
        assert got.startswith("luksDump of the header copy failed: ")
    else:
        assert got == decision
