"""Parse an NVIDIA GPU attestation report: SPDM 1.1 GET_MEASUREMENTS request + signed MEASUREMENTS response.

The report NVML returns is the 37-byte request (carrying the caller's nonce) followed by the
response (measurement blocks, responder nonce, NVIDIA opaque data, 96-byte ECDSA P-384 signature).
Layout reference: docs/reference/gpu-evidence.md §2.6. Every multi-byte field is little-endian.

Strict by design: every length must add up exactly, and a malformed report raises
:class:`SpdmParseError` naming the field, so a verifier never reasons about half-parsed bytes.
Unknown opaque-data types are *kept* (raw, under their number) rather than rejected: newer firmware
adds types, and nothing security-relevant depends on a type this parser does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.errors import BadInputError

REQUEST_LEN = 37
NONCE_LEN = 32
SIGNATURE_LEN = 96  # ECDSA P-384 raw r || s
SPDM_REQUEST_CODE = 0xE0  # GET_MEASUREMENTS
SPDM_RESPONSE_CODE = 0x60  # MEASUREMENTS
DMTF_MEASUREMENT_SPEC = 0x01
_RESPONSE_FIXED = 42  # header(4) + count(1) + L1(3) + responder nonce(32) + L2(2)

#: NVIDIA opaque-data type numbers (gpu-evidence.md §2.6).
OPAQUE_TYPES: dict[int, str] = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
    255: "invalid",
}
OPAQUE_CODES: dict[str, int] = {v: k for k, v in OPAQUE_TYPES.items()}
FEATURE_FLAGS = {0: "SPT", 1: "MPT", 2: "PPCIE"}


class SpdmParseError(BadInputError, ValueError):
    """The report is truncated or malformed; ``field`` names the offending field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"SPDM report: {field_name}: {problem}")
        self.field = field_name


@dataclass(frozen=True)
class MeasurementBlock:
    index: int
    spec: int
    value_type: int
    value: bytes


@dataclass(frozen=True)
class OpaqueData:
    """NVIDIA's type/length/value entries, in report order (a type may repeat)."""

    entries: tuple[tuple[int, bytes], ...]

    def get(self, name_or_code: str | int) -> bytes | None:
        code = OPAQUE_CODES[name_or_code] if isinstance(name_or_code, str) else name_or_code
        for t, v in self.entries:
            if t == code:
                return v
        return None

    def _text(self, name: str) -> str | None:
        raw = self.get(name)
        return None if raw is None else raw.split(b"\x00", 1)[0].decode("ascii", "replace")

    @property
    def driver_version(self) -> str | None:
        return self._text("driver_version")

    @property
    def vbios_version(self) -> str | None:
        """NVIDIA's re-ordering: ``00 9f 00 96 01 ..`` -> ``96.00.9f.00.01`` (lower case)."""
        raw = self.get("vbios_version")
        if raw is None or len(raw) < 5:
            return None
        lo = f"{int.from_bytes(raw[0:4], 'little'):08x}"
        return ".".join([lo[0:2], lo[2:4], lo[4:6], lo[6:8], f"{raw[4]:02x}"])

    @property
    def project(self) -> str | None:
        return self._text("project")

    @property
    def project_sku(self) -> str | None:
        return self._text("project_sku")

    @property
    def chip_sku(self) -> str | None:
        return self._text("chip_sku")

    @property
    def fwid(self) -> bytes | None:
        return self.get("fwid")

    @property
    def feature_flag(self) -> str | None:
        raw = self.get("feature_flag")
        if raw is None:
            return None
        val = int.from_bytes(raw, "little")
        return FEATURE_FLAGS.get(val, f"unknown({val})")

    @property
    def version(self) -> int | None:
        raw = self.get("opaque_data_version")
        return None if raw is None else int.from_bytes(raw, "little")


@dataclass(frozen=True)
class SpdmReport:
    """A parsed report; ``signed_bytes`` is exactly what the GPU's leaf key signed."""

    raw: bytes
    spdm_version: int
    request_code: int
    request_param1: int
    request_param2: int
    nonce: bytes
    slot_id: int
    response_version: int
    response_code: int
    response_param1: int
    response_param2: int
    blocks: tuple[MeasurementBlock, ...]
    measurement_record_len: int
    responder_nonce: bytes
    opaque: OpaqueData
    signature: bytes = field(repr=False)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: len(self.raw) - SIGNATURE_LEN]

    @property
    def request(self) -> bytes:
        return self.raw[:REQUEST_LEN]


def _need(data: bytes, off: int, n: int, field_name: str) -> bytes:
    if off + n > len(data):
        raise SpdmParseError(field_name, f"truncated: need {n} bytes at offset {off}, report has {len(data)}")
    return data[off : off + n]


def parse_measurement_record(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    """Split the measurement record into exactly ``count`` DMTF blocks covering it without slack."""
    blocks: list[MeasurementBlock] = []
    off = 0
    for i in range(count):
        name = f"measurement_block[{i}]"
        hdr = _need(record, off, 4, name)
        index, spec, size = hdr[0], hdr[1], int.from_bytes(hdr[2:4], "little")
        if spec != DMTF_MEASUREMENT_SPEC:
            raise SpdmParseError(f"{name}.spec", f"expected 1 (DMTF), got {spec}")
        body = _need(record, off + 4, size, f"{name}.size")
        if size < 3:
            raise SpdmParseError(f"{name}.size", f"too small for a DMTF measurement header: {size}")
        value_type, value_size = body[0], int.from_bytes(body[1:3], "little")
        if value_size != size - 3:
            raise SpdmParseError(f"{name}.value_size", f"{value_size} does not match block size {size} - 3")
        blocks.append(MeasurementBlock(index, spec, value_type, bytes(body[3:])))
        off += 4 + size
    if off != len(record):
        raise SpdmParseError("measurement_record", f"{len(record) - off} bytes left after {count} blocks")
    return tuple(blocks)


def parse_opaque(data: bytes) -> OpaqueData:
    entries: list[tuple[int, bytes]] = []
    off = 0
    while off < len(data):
        hdr = _need(data, off, 4, f"opaque_data[{len(entries)}].header")
        typ, size = int.from_bytes(hdr[0:2], "little"), int.from_bytes(hdr[2:4], "little")
        name = OPAQUE_TYPES.get(typ, f"type_{typ}")
        value = _need(data, off + 4, size, f"opaque_data.{name}")
        entries.append((typ, bytes(value)))
        off += 4 + size
    return OpaqueData(tuple(entries))


def parse_report(data: bytes) -> SpdmReport:
    """Parse a raw GPU attestation report (request ‖ response), checking every length exactly."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SpdmParseError("report", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    req = _need(data, 0, REQUEST_LEN, "request")
    if req[1] != SPDM_REQUEST_CODE:
        raise SpdmParseError("request.code",
                             f"expected 0x{SPDM_REQUEST_CODE:02x} (GET_MEASUREMENTS), got 0x{req[1]:02x}")
    if req[0] >> 4 != 1:
        raise SpdmParseError("request.version", f"expected SPDM 1.x, got 0x{req[0]:02x}")
    off = REQUEST_LEN
    hdr = _need(data, off, 8, "response.header")
    if hdr[1] != SPDM_RESPONSE_CODE:
        raise SpdmParseError("response.code", f"expected 0x{SPDM_RESPONSE_CODE:02x} (MEASUREMENTS), got 0x{hdr[1]:02x}")
    if hdr[0] != req[0]:
        raise SpdmParseError("response.version", f"0x{hdr[0]:02x} differs from request version 0x{req[0]:02x}")
    count = hdr[4]
    l1 = int.from_bytes(hdr[5:8], "little")
    record = _need(data, off + 8, l1, "response.measurement_record")
    blocks = parse_measurement_record(record, count)
    off += 8 + l1
    responder_nonce = _need(data, off, NONCE_LEN, "response.nonce")
    l2 = int.from_bytes(_need(data, off + NONCE_LEN, 2, "response.opaque_length"), "little")
    opaque_raw = _need(data, off + NONCE_LEN + 2, l2, "response.opaque_data")
    opaque = parse_opaque(opaque_raw)
    off += NONCE_LEN + 2 + l2
    signature = _need(data, off, SIGNATURE_LEN, "response.signature")
    off += SIGNATURE_LEN
    if off != len(data):
        raise SpdmParseError("report", f"{len(data) - off} trailing bytes after the signature")
    return SpdmReport(
        raw=data,
        spdm_version=req[0],
        request_code=req[1],
        request_param1=req[2],
        request_param2=req[3],
        nonce=bytes(req[4:36]),
        slot_id=req[36],
        response_version=hdr[0],
        response_code=hdr[1],
        response_param1=hdr[2],
        response_param2=hdr[3],
        blocks=blocks,
        measurement_record_len=l1,
        responder_nonce=bytes(responder_nonce),
        opaque=opaque,
        signature=bytes(signature),
    )
