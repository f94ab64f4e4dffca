"""The C extension follows CPython's conventions: heap type, module state, GC, field tables defined once."""

from __future__ import annotations

import gc
import importlib.util
import sys
import weakref

import pytest

from agent.quote import QuoteError, parse_quote
from agent.quote import _tdxquote as ext
from agent.quote.parser import BYTES_FIELDS, INT_FIELDS
from tests.quote.builders import sample


def test_field_tables_come_from_the_extension_and_match_the_getters() -> None:
    assert BYTES_FIELDS is ext.BYTES_FIELDS and INT_FIELDS is ext.INT_FIELDS
    assert len(BYTES_FIELDS) == 38 and len(INT_FIELDS) == 17
    assert BYTES_FIELDS[:2] == ("qe_vendor_id", "user_data") and BYTES_FIELDS[-1] == "qe_auth_data"
    q = parse_quote(sample("dcapqvl_tdx_quote_v4.bin"))
    for name in BYTES_FIELDS:
        value = getattr(q, name)
        assert value is None or isinstance(value, bytes), name
    for name in INT_FIELDS:
        value = getattr(q, name)
        assert value is None or isinstance(value, int), name
    assert q.vmid is None and q.tee_type == 0x81
    getters = {n for n, v in vars(ext.Quote).items() if type(v).__name__ == "getset_descriptor"}
    assert set(BYTES_FIELDS) | set(INT_FIELDS) | {"pck_cert_chain", "signed_region", "signed_data", "raw",
                                                   "debug"} == getters


def test_quote_is_an_immutable_heap_type_with_gc() -> None:
    t = ext.Quote
    assert t.__flags__ & (1 << 9)  # Py_TPFLAGS_HEAPTYPE
    assert t.__flags__ & (1 << 14)  # Py_TPFLAGS_HAVE_GC
    with pytest.raises(TypeError):
        t.version = 1  # type: ignore[misc]


def test_exception_lives_in_module_state_and_names_the_field() -> None:
    with pytest.raises(QuoteError) as exc:
        parse_quote(b"\x04\x00" + bytes(10))
    assert exc.value.field == "header" and exc.value.offset == 0
    assert isinstance(exc.value, ValueError)
    assert str(exc.value).startswith("field 'header' at offset 0: truncated")


def test_a_second_module_instance_has_its_own_type_and_exception() -> None:
    """Multi-phase init: loading the extension again gives independent state (no process globals)."""
    spec = importlib.util.find_spec("agent.quote._tdxquote")
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other.Quote is not ext.Quote and other.QuoteError is not ext.QuoteError
    with pytest.raises(other.QuoteError):
        other.Quote(b"")
    assert other.Quote(sample("dcapqvl_tdx_quote_v4.bin")).version == 4
    assert sys.modules["agent.quote._tdxquote"] is ext


def test_buffer_cycle_is_collected_and_releases_the_export() -> None:
    """A quote held by an object it also (indirectly) references is freed by the GC, export released."""

    class Holder(bytearray):
        pass

    buf = Holder(sample("dcapqvl_tdx_quote_v4.bin"))
    q = parse_quote(buf)
    with pytest.raises(BufferError):
        buf.extend(b"x")  # the export pins the buffer while the quote lives
    buf.quote = q  # cycle: buffer -> quote -> (export) buffer
    ref = weakref.ref(buf)
    del buf, q
    gc.collect()
    assert ref() is None


def test_subclass_reaches_module_state() -> None:
    """parser.Quote subclasses the heap type; errors still come from the module's own exception."""
    with pytest.raises(QuoteError):
        parse_quote(b"\x05\x00\x02\x00\x81\x00\x00\x00" + bytes(40))
