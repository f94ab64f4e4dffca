"""Python face of the C quote parser: the :class:`Quote` type and :func:`parse_quote`.

All field extraction and bounds checking happens in ``native/tdxquote_core.c``; this module only
adds conveniences that need no speed (PEM splitting, ``to_dict`` for JSON, a readable repr).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from agent.quote import _tdxquote

if TYPE_CHECKING:
    from typing_extensions import Buffer

QuoteError = _tdxquote.QuoteError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)

#: Fields that are ``bytes`` (or None when the body type lacks them), in output order; the list lives
#: once, in the X-macro table of native/tdxquote_core.h, and the extension exports it.
BYTES_FIELDS: tuple[str, ...] = _tdxquote.BYTES_FIELDS
#: Integer fields (``vmid`` is None unless body type 4), in output order, from the same table.
INT_FIELDS: tuple[str, ...] = _tdxquote.INT_FIELDS


class Quote(_tdxquote.Quote):
    """A parsed TDX quote (v4 or v5). Construct with :func:`parse_quote`.

    Attributes are ``bytes`` slices of the caller's buffer (taken on access; the buffer itself is
    held, not copied) or ints; TDX 1.5 / 1.5-Ex fields are None on bodies that lack them.
    """

    __slots__ = ()

    @property
    def pck_certs(self) -> list[bytes]:
        """The PEM certificates of the nested type-5 chain, leaf first (empty for other types)."""
        if self.pck_cert_chain_type != 5:
            return []
        return _PEM_CERT.findall(self.pck_cert_chain)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: ints as numbers, bytes as lowercase hex, the PEM chain as text."""
        out: dict[str, Any] = {}
        for name in INT_FIELDS:
            out[name] = getattr(self, name)
        out["tee_type_hex"] = f"0x{self.tee_type:08x}"
        for name in BYTES_FIELDS:
            value = getattr(self, name)
            out[name] = None if value is None else value.hex()
        start, end = self.signed_region
        out["signed_region"] = [start, end]
        out["debug"] = self.debug
        if self.pck_cert_chain_type == 5:
            out["pck_cert_chain"] = self.pck_cert_chain.decode("ascii", "replace")
            out["pck_certs"] = [c.decode("ascii", "replace") for c in self.pck_certs]
        else:
            out["pck_cert_chain"] = self.pck_cert_chain.hex()
            out["pck_certs"] = []
        return out

    def __repr__(self) -> str:
        return (f"<Quote v{self.version} body_type={self.body_type} len={self.quote_len}"
                f" trailing={self.trailing_len} mr_td={self.mr_td.hex()[:16]}… debug={self.debug}>")


def parse_quote(buf: Buffer) -> Quote:
    """Parse a TDX quote from any buffer-protocol object (bytes, bytearray, memoryview, mmap).

    The buffer is held (not copied) for the life of the Quote. Raises :class:`QuoteError`, a
    ``ValueError`` with ``.field`` and ``.offset``, on anything malformed; bytes after the quote
    are reported in ``trailing_len``, never rejected.
    """
    return Quote(buf)
