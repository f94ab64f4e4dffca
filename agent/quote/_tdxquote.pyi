"""Type stub for the C extension (native/tdxquote.c); field names come from native/tdxquote_core.h."""

from typing_extensions import Buffer, disjoint_base

from agent.errors import BadInputError

BYTES_FIELDS: tuple[str, ...]
INT_FIELDS: tuple[str, ...]

class QuoteError(BadInputError, ValueError):
    field: str
    offset: int

@disjoint_base  # a C struct layout (QuoteObject): cannot be combined with another such base
class Quote:
    def __new__(cls, buffer: Buffer, /) -> Quote: ...
    # header
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body_size: int
    # TD report body (TDX 1.0)
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    # TDX 1.5 / 1.5 Ex (None on bodies that lack them)
    tee_tcb_svn2: bytes | None
    mr_service_td: bytes | None
    vmid: int | None
    td_id: bytes | None
    dev_info: bytes | None
    init_servtd_hash: bytes | None
    init_servtd_attributes: bytes | None
    init_cpu_svn: bytes | None
    init_tee_tcb_svn: bytes | None
    init_tee_fmspc: bytes | None
    cur_servtd_hash: bytes | None
    cur_servtd_attributes: bytes | None
    # signature data
    sig_data_len: int
    signature: bytes
    attestation_key: bytes
    cert_data_type: int
    cert_data_size: int
    qe_report: bytes
    qe_cpu_svn: bytes
    qe_misc_select: int
    qe_attributes: bytes
    qe_mr_enclave: bytes
    qe_mr_signer: bytes
    qe_isv_prod_id: int
    qe_isv_svn: int
    qe_report_data: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_cert_chain_type: int
    pck_cert_chain: bytes
    # derived
    signed_region: tuple[int, int]
    signed_data: bytes
    raw: bytes
    quote_len: int
    trailing_len: int
    debug: bool
