"""Type stub for the C extension (native/snpreport.c); field names come from native/snpreport_core.h."""

from typing_extensions import Buffer, disjoint_base

from agent.errors import BadInputError

BYTES_FIELDS: tuple[str, ...]
INT_FIELDS: tuple[str, ...]
REPORT_SIZE: int
SIGNED_SIZE: int

class SnpReportError(BadInputError, ValueError):
    field: str
    offset: int

@disjoint_base  # a C struct layout (ReportObject): cannot be combined with another such base
class SnpReport:
    def __new__(cls, buffer: Buffer, /) -> SnpReport: ...
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: bytes
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: bytes
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: bytes
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: bytes
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes
    signature_s: bytes
    # derived
    signed_data: bytes
    raw: bytes
    debug: bool
    signing_key: int
    platform_unknown_bits: int
    product: str | None
