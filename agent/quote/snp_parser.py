"""Python face of the C SEV-SNP report parser: the :class:`SnpReport` type and :func:`parse_snp_report`.

All field extraction and validation happens in ``native/snpreport_core.c`` (exact length, version
2 to 5, SIGNATURE_ALGO, KEY_INFO, POLICY and the must-be-zero ranges of each version); this module
only adds conveniences that need no speed: TCB decoding by product line, firmware strings,
``to_dict`` for JSON and a readable repr. Layout: docs/reference/sev-snp.md section 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.quote import _snpreport

if TYPE_CHECKING:
    from typing_extensions import Buffer

SnpReportError = _snpreport.SnpReportError

#: Exactly this many bytes (0x4A0).
REPORT_SIZE: int = _snpreport.REPORT_SIZE
#: The signature covers bytes [0, SIGNED_SIZE) (0x2A0).
SIGNED_SIZE: int = _snpreport.SIGNED_SIZE
#: Fields that are ``bytes``, in output order; the list lives once, in the X-macro table of
#: native/snpreport_core.h, and the extension exports it.
BYTES_FIELDS: tuple[str, ...] = _snpreport.BYTES_FIELDS
#: Integer fields (CPUID ones None on v2, mitigation vectors None below v5), from the same table.
INT_FIELDS: tuple[str, ...] = _snpreport.INT_FIELDS

#: The product lines :func:`decode_tcb` knows; "Genoa" also covers Bergamo and Siena.
PRODUCTS: tuple[str, ...] = ("Milan", "Genoa", "Turin")
#: KEY_INFO.SIGNING_KEY values the parser accepts.
SIGNING_KEYS: dict[int, str] = {0: "VCEK", 1: "VLEK"}
#: PLATFORM_INFO bits this parser knows (section 1.5); any other set bit is in ``platform_unknown_bits``.
PLATFORM_BITS: dict[int, str] = {0: "SMT_EN", 1: "TSME_EN", 2: "ECC_EN", 3: "RAPL_DIS", 4: "CIPHERTEXT_HIDING_EN",
                                 5: "ALIAS_CHECK_COMPLETE", 7: "TIO_EN"}

# TCB_VERSION byte positions (section 1.7): Milan/Genoa (legacy) and Turin.
_TCB_LEGACY: tuple[tuple[str, int], ...] = (("bl", 0), ("tee", 1), ("snp", 6), ("ucode", 7))
_TCB_TURIN: tuple[tuple[str, int], ...] = (("fmc", 0), ("bl", 1), ("tee", 2), ("snp", 3), ("ucode", 7))
_TCB_FIELDS = ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb")


def decode_tcb(raw8: bytes, product: str) -> dict[str, int]:
    """Decode an 8-byte TCB_VERSION in ``product``'s layout.

    Milan and Genoa: ``{"bl", "tee", "snp", "ucode"}`` from bytes 0, 1, 6, 7; Turin: ``{"fmc", "bl",
    "tee", "snp", "ucode"}`` from bytes 0, 1, 2, 3, 7. Raises ``ValueError`` for another length or an
    unknown product (the layout cannot be guessed: decide the product first).
    """
    raw = bytes(raw8)
    if len(raw) != 8:
        raise ValueError(f"a TCB_VERSION is 8 bytes, got {len(raw)}")
    if product == "Turin":
        layout = _TCB_TURIN
    elif product in ("Milan", "Genoa"):
        layout = _TCB_LEGACY
    else:
        raise ValueError(f"unknown product line {product!r}: the TCB layout needs one of {', '.join(PRODUCTS)}")
    return {name: raw[i] for name, i in layout}


class SnpReport(_snpreport.SnpReport):
    """A parsed AMD SEV-SNP attestation report (v2 to v5). Construct with :func:`parse_snp_report`.

    Byte attributes are ``bytes`` slices of the caller's buffer (taken on access; the buffer itself
    is held, not copied); integer attributes are ints, None where the version lacks the field.
    """

    __slots__ = ()

    @property
    def current_firmware(self) -> str:
        """Firmware running now, "major.minor.build" (e.g. "1.55.49")."""
        return f"{self.current_major}.{self.current_minor}.{self.current_build}"

    @property
    def committed_firmware(self) -> str:
        """Committed firmware, "major.minor.build"."""
        return f"{self.committed_major}.{self.committed_minor}.{self.committed_build}"

    @property
    def signing_key_name(self) -> str:
        """"VCEK" or "VLEK" (KEY_INFO.SIGNING_KEY)."""
        return SIGNING_KEYS[self.signing_key]

    def tcb(self, which: str = "reported_tcb") -> dict[str, int] | None:
        """One of the four TCB_VERSIONs decoded in the product's layout; None when the product is unknown."""
        if which not in _TCB_FIELDS:
            raise ValueError(f"no TCB field {which!r} (one of {', '.join(_TCB_FIELDS)})")
        product = self.product
        return None if product is None else decode_tcb(getattr(self, which), product)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: ints as numbers, bytes as lowercase hex, TCBs also decoded when the product is known."""
        out: dict[str, Any] = {"tee": "snp"}
        for name in INT_FIELDS:
            out[name] = getattr(self, name)
        out["policy_hex"] = f"0x{self.policy:x}"
        out["platform_info_hex"] = f"0x{self.platform_info:x}"
        out["key_info_hex"] = f"0x{self.key_info:x}"
        for name in BYTES_FIELDS:
            out[name] = getattr(self, name).hex()
        out["debug"] = self.debug
        out["signing_key"] = self.signing_key
        out["signing_key_name"] = self.signing_key_name
        out["platform_unknown_bits"] = self.platform_unknown_bits
        out["product"] = self.product
        out["current_firmware"] = self.current_firmware
        out["committed_firmware"] = self.committed_firmware
        for name in _TCB_FIELDS:
            out[name + "_decoded"] = self.tcb(name)
        out["signed_region"] = [0, SIGNED_SIZE]
        return out

    def __repr__(self) -> str:
        return (f"<SnpReport v{self.version} {self.product or 'product?'} {self.signing_key_name}"
                f" fw={self.current_firmware} vmpl={self.vmpl} policy=0x{self.policy:x} debug={self.debug}"
                f" measurement={self.measurement.hex()[:16]}…>")


def parse_snp_report(buf: Buffer) -> SnpReport:
    """Parse an SEV-SNP ATTESTATION_REPORT from any buffer-protocol object (bytes, bytearray, memoryview, mmap).

    The buffer must be exactly 1184 bytes and is held (not copied) for the life of the report.
    Raises :class:`SnpReportError` (``BadInputError`` and ``ValueError``, with ``.field`` and
    ``.offset``) on anything malformed; unknown PLATFORM_INFO bits are reported in
    ``platform_unknown_bits``, never rejected.
    """
    return SnpReport(buf)
