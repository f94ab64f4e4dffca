"""Tell a TDX quote from an SEV-SNP report by its bytes, and parse either.

The two formats cannot be confused: an SNP report is exactly 1184 bytes whose first u32 (LE) is the
version 2 to 5, so its bytes 2-3 are zero; a TDX quote starts with a u16 version 4 or 5, then the
u16 attestation key type 2 (ECDSA P-256) at offset 2 and the u32 TEE type 0x81 at offset 4.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from agent.errors import BadInputError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from agent.quote.parser import Quote
    from agent.quote.snp_parser import SnpReport

TDX = "tdx"
SNP = "snp"

_SNP_SIZE = 1184
_SNP_VERSIONS = range(2, 6)
_TDX_VERSIONS = (4, 5)
_TDX_ATT_KEY_ECDSA_P256 = 2
_TDX_TEE_TYPE = 0x81


def evidence_kind(raw: Buffer) -> str:
    """``"snp"`` or ``"tdx"``; raises :class:`~agent.errors.BadInputError` naming both readings otherwise.

    Only the leading bytes (and, for SNP, the length) are looked at: the parsers do the real checks.
    """
    mv = memoryview(raw).cast("B")
    n = len(mv)
    head = bytes(mv[:8])
    if n == _SNP_SIZE and struct.unpack_from("<I", head)[0] in _SNP_VERSIONS:
        return SNP
    if n >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", head)
        if version in _TDX_VERSIONS and key_type == _TDX_ATT_KEY_ECDSA_P256 and tee_type == _TDX_TEE_TYPE:
            return TDX
    snp_version = f"version {struct.unpack_from('<I', head)[0]}" if n >= 4 else "no version word"
    if n >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", head)
        tdx_reading = f"version {version}, attestation key type {key_type}, TEE type 0x{tee_type:x}"
    else:
        tdx_reading = "shorter than the 8-byte header start"
    raise BadInputError(
        f"not TEE evidence ({n} bytes): not an SEV-SNP report (needs exactly {_SNP_SIZE} bytes with a u32 "
        f"version 2 to 5; read {snp_version}) and not a TDX quote (needs u16 version 4 or 5, u16 attestation "
        f"key type 2, u32 TEE type 0x81; read {tdx_reading})", reason="unknown_evidence")


def parse_evidence(raw: Buffer) -> Quote | SnpReport:
    """Parse ``raw`` with the parser its bytes call for (:func:`evidence_kind`).

    Returns a :class:`~agent.quote.parser.Quote` or a :class:`~agent.quote.snp_parser.SnpReport`;
    their errors (``QuoteError``, ``SnpReportError``) and :func:`evidence_kind`'s are all
    :class:`~agent.errors.BadInputError`.
    """
    if evidence_kind(raw) == SNP:
        from agent.quote.snp_parser import parse_snp_report

        return parse_snp_report(raw)
    from agent.quote.parser import parse_quote

    return parse_quote(raw)
