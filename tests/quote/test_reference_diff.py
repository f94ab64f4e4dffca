"""Differential test: C parser vs the pure-Python reference (tests/quote/reference_parser.py) on
random mutations, every truncation and hostile length fields. They must agree on accept/reject,
on the failing field and offset, and on every field."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.quote.builders import SAMPLES, V4_SAMPLE, V5_SAMPLE, as_v5, sample
from tests.quote.diff_util import outcome

CORPUS = [sample(n) for n in SAMPLES] + [as_v5(sample(V4_SAMPLE), t) for t in (2, 4)]


def _length_fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every length/type field in a well-formed quote."""
    version = struct.unpack_from("<H", raw, 0)[0]
    fields = [(0, 2), (2, 2), (4, 4)]
    body_off, bsize = 48, 584
    if version == 5:
        fields += [(48, 2), (50, 4)]
        bsize = struct.unpack_from("<I", raw, 50)[0]
        body_off = 54
    slo = body_off + bsize
    sd = slo + 4
    cd = sd + 134
    adl = struct.unpack_from("<H", raw, cd + 448)[0]
    p = cd + 450 + adl
    return [*fields, (slo, 4), (sd + 128, 2), (sd + 130, 4), (cd + 448, 2), (p, 2), (p + 2, 4)]


def test_every_sample_agrees() -> None:
    for raw in CORPUS:
        assert outcome(raw) == "ok"


@pytest.mark.parametrize("name", [V4_SAMPLE, V5_SAMPLE, "agentmanifest_gcp_configfs_v4_8000B.bin"])
def test_truncation_at_every_offset(name: str) -> None:
    raw = sample(name)
    results = [outcome(raw[:n]) for n in range(len(raw) + 1)]
    quote_len = results.index("ok")
    assert all(r == "ok" for r in results[quote_len:])  # trailing bytes never matter
    assert quote_len == {V4_SAMPLE: 4936, V5_SAMPLE: 5006}.get(name, 4935)


HOSTILE = [0, 1, 2, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@pytest.mark.parametrize("raw", CORPUS[:2] + CORPUS[-2:], ids=["gcp8000", "v5outdated", "v5t2", "v5t4"])
def test_hostile_length_fields(raw: bytes) -> None:
    seen = set()
    for off, width in _length_fields(raw):
        orig = int.from_bytes(raw[off:off + width], "little")
        for v in {*HOSTILE, orig - 1, orig + 1, orig + len(raw)}:
            v &= (1 << (8 * width)) - 1
            buf = raw[:off] + v.to_bytes(width, "little") + raw[off + width:]
            seen.add(outcome(buf))
    assert seen == {"ok", "err"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, len(CORPUS) - 1),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10_000)))
def test_random_mutations(idx: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    buf = bytearray(CORPUS[idx])
    for pos, val in edits:
        buf[pos % len(buf)] = val
    outcome(bytes(buf if cut is None else buf[:cut]))


@settings(max_examples=300, deadline=None)
@given(idx=st.integers(0, len(CORPUS) - 1), which=st.integers(0, 100), value=st.integers(0, 0xFFFFFFFF),
       extra=st.binary(max_size=64))
def test_random_length_field_values(idx: int, which: int, value: int, extra: bytes) -> None:
    raw = CORPUS[idx]
    fields = _length_fields(raw)
    off, width = fields[which % len(fields)]
    v = value & ((1 << (8 * width)) - 1)
    outcome(raw[:off] + v.to_bytes(width, "little") + raw[off + width:] + extra)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    outcome(data)
    outcome(b"\x04\x00\x02\x00\x81\x00\x00\x00" + data)
    outcome(b"\x05\x00\x02\x00\x81\x00\x00\x00" + data[:40] + b"\x03\x00\x88\x02\x00\x00" + data[40:])
