"""Pure-Python reference TDX quote parser, written independently of the C one from the layout tables
in docs/reference/tdx-quote.md §1, for differential testing.

``parse(buf)`` returns a dict with the same names as ``agent.quote.Quote`` attributes, or raises
``RefError(field, offset)`` naming the first failing field in the same check order as the C parser.
"""

from __future__ import annotations

import struct
from typing import Any

TD10_FIELDS = [  # (name, offset within body, size)
    ("tee_tcb_svn", 0, 16), ("mr_seam", 16, 48), ("mr_signer_seam", 64, 48), ("seam_attributes", 112, 8),
    ("td_attributes", 120, 8), ("xfam", 128, 8), ("mr_td", 136, 48), ("mr_config_id", 184, 48),
    ("mr_owner", 232, 48), ("mr_owner_config", 280, 48), ("rtmr0", 328, 48), ("rtmr1", 376, 48),
    ("rtmr2", 424, 48), ("rtmr3", 472, 48), ("report_data", 520, 64),
]
TD15_FIELDS = [("tee_tcb_svn2", 584, 16), ("mr_service_td", 600, 48)]
TD15EX_FIELDS = [
    ("td_id", 649, 32), ("dev_info", 681, 48), ("init_servtd_hash", 729, 48),
    ("init_servtd_attributes", 777, 8), ("init_cpu_svn", 785, 16), ("init_tee_tcb_svn", 801, 16),
    ("init_tee_fmspc", 817, 12), ("cur_servtd_hash", 829, 48), ("cur_servtd_attributes", 877, 8),
]
BODY_SIZES = {2: 584, 3: 648, 4: 885}


class RefError(ValueError):
    def __init__(self, field: str, offset: int, why: str) -> None:
        super().__init__(f"field '{field}' at offset {offset}: {why}")
        self.field = field
        self.offset = offset


def _need(field: str, pos: int, size: int, end: int) -> None:
    if pos + size > end:
        raise RefError(field, pos, "truncated")


def parse(buf: bytes) -> dict[str, Any]:
    b = bytes(buf)
    n = len(b)
    out: dict[str, Any] = {}
    _need("version", 0, 2, n)
    if b[:2] in (b"\xd8\x3d", b"\xd2\x84"):
        raise RefError("version", 0, "CBOR/COSE")
    _need("header", 0, 48, n)
    version, akt, tee, qe_svn, pce_svn = struct.unpack_from("<HHIHH", b, 0)
    out.update(version=version, att_key_type=akt, tee_type=tee, qe_svn=qe_svn, pce_svn=pce_svn,
               qe_vendor_id=b[12:28], user_data=b[28:48])
    if version not in (4, 5):
        raise RefError("version", 0, "version")
    if akt != 2:
        raise RefError("att_key_type", 2, "key type")
    if tee != 0x81:
        raise RefError("tee_type", 4, "tee type")
    if version == 4:
        body, btype, bsize = 48, 2, 584
    else:
        _need("body_type", 48, 2, n)
        _need("body_size", 50, 4, n)
        btype, bsize = struct.unpack_from("<HI", b, 48)
        if btype not in BODY_SIZES:
            raise RefError("body_type", 48, "body type")
        if bsize != BODY_SIZES[btype]:
            raise RefError("body_size", 50, "body size")
        body = 54
    out.update(body_type=btype, body_size=bsize)
    _need("td_report_body", body, bsize, n)
    fields = list(TD10_FIELDS)
    if btype >= 3:
        fields += TD15_FIELDS
    if btype == 4:
        fields += TD15EX_FIELDS
    for name in ("tee_tcb_svn2", "mr_service_td", *(f[0] for f in TD15EX_FIELDS)):
        out[name] = None
    for name, off, size in fields:
        out[name] = b[body + off: body + off + size]
    out["vmid"] = b[body + 648] if btype == 4 else None

    slo = body + bsize
    _need("sig_data_len", slo, 4, n)
    (sdl,) = struct.unpack_from("<I", b, slo)
    sd = slo + 4
    if sdl > n - sd:
        raise RefError("sig_data_len", slo, "too long")
    sd_end = sd + sdl
    out.update(sig_data_len=sdl, signed_region=(0, slo), signed_data=b[:slo])

    _need("signature", sd, 64, sd_end)
    _need("attestation_key", sd + 64, 64, sd_end)
    out.update(signature=b[sd:sd + 64], attestation_key=b[sd + 64:sd + 128])
    _need("cert_data_type", sd + 128, 2, sd_end)
    (cdt,) = struct.unpack_from("<H", b, sd + 128)
    if cdt != 6:
        raise RefError("cert_data_type", sd + 128, "type")
    _need("cert_data_size", sd + 130, 4, sd_end)
    (cds,) = struct.unpack_from("<I", b, sd + 130)
    cd = sd + 134
    if cds > sd_end - cd:
        raise RefError("cert_data_size", sd + 130, "too long")
    cd_end = cd + cds
    out.update(cert_data_type=cdt, cert_data_size=cds)

    _need("qe_report", cd, 384, cd_end)
    r = b[cd:cd + 384]
    out.update(qe_report=r, qe_cpu_svn=r[0:16], qe_misc_select=struct.unpack_from("<I", r, 16)[0],
               qe_attributes=r[48:64], qe_mr_enclave=r[64:96], qe_mr_signer=r[128:160],
               qe_isv_prod_id=struct.unpack_from("<H", r, 256)[0], qe_isv_svn=struct.unpack_from("<H", r, 258)[0],
               qe_report_data=r[320:384])
    p = cd + 384
    _need("qe_report_signature", p, 64, cd_end)
    out["qe_report_signature"] = b[p:p + 64]
    p += 64
    _need("qe_auth_data_size", p, 2, cd_end)
    (adl,) = struct.unpack_from("<H", b, p)
    if adl > cd_end - (p + 2):
        raise RefError("qe_auth_data_size", p, "too long")
    out["qe_auth_data"] = b[p + 2:p + 2 + adl]
    p += 2 + adl
    _need("pck_cert_chain_type", p, 2, cd_end)
    (pct,) = struct.unpack_from("<H", b, p)
    if not 1 <= pct <= 5:
        raise RefError("pck_cert_chain_type", p, "type")
    p += 2
    _need("pck_cert_chain_size", p, 4, cd_end)
    (pcs,) = struct.unpack_from("<I", b, p)
    if pcs > cd_end - (p + 4):
        raise RefError("pck_cert_chain_size", p, "too long")
    p += 4
    chain = b[p:p + pcs]
    if pct == 5 and chain.endswith(b"\x00"):
        chain = chain[:-1]
    out.update(pck_cert_chain_type=pct, pck_cert_chain=chain, quote_len=sd_end, trailing_len=n - sd_end,
               raw=b[:sd_end], debug=bool(out["td_attributes"][0] & 1))
    return out
