"""Compute the RTMR values the TDX firmware produces for a direct-boot kernel, initrd and command line.

For the image builder: given the exact kernel, initramfs and kernel command line a TD is launched with
(QEMU ``-kernel/-initrd/-append`` on TDVF = OVMF built for TDX), print the SHA-384 event digests and the
resulting RTMR2 (and the RTMR1 the same model predicts), so the value can be registered with the
validator before the first boot.

The model, and where each step comes from (public sources; no official Intel test vector exists for
RTMR2 of a direct boot, see "Exactness" below):

* Registers start at 48 zero bytes; extending with a digest is ``RTMR = SHA384(RTMR || digest)``
  (Intel TDX module ABI, TDG.MR.RTMR.EXTEND; ``measure_log`` in Dstack-TEE/dstack ``dstack-mr`` and
  virtee/tdx-measure ``src/util.rs``).
* UEFI PCR 8/9 map to RTMR2 (CC MR index 3) in TDVF (edk2 ``MapPcrToMrIndex``, TDVF design guide,
  ``EFI_CC_MEASUREMENT_PROTOCOL``).
* Event 1 of RTMR2: the Linux EFI stub measures its ``LoadOptions`` (tagged event
  ``EFI_LOAD_OPTIONS_EVENT``, PCR 9) over the CC measurement protocol. OVMF's QEMU loader builds those
  LoadOptions from fw_cfg's command line, UTF-16LE, NUL-terminated, with ``initrd=initrd `` *prepended*
  when an initrd is given (edk2 ``OvmfPkg/Library/X86QemuLoadImageLib/X86QemuLoadImageLib.c``,
  ``UnicodeSPrintAsciiFormat(..., "%a%a%a", shim ? "kernel " : "", initrd ? "initrd=initrd " : "",
  CommandLine)``; LoadOptionsSize counts the UTF-16 NUL). Older edk2 releases *appended*
  `` initrd=initrd`` instead (virtee/tdx-measure ``measure_rtmr2_direct``): ``--initrd-arg append``.
* Event 2 of RTMR2: the EFI stub loads the initrd through the ``LINUX_EFI_INITRD_MEDIA_GUID`` LoadFile2
  device path that OVMF's ``QemuKernelLoaderFsDxe`` installs and measures its bytes as they are (tagged
  event ``INITRD_EVENT_TAG_ID``, PCR 9): SHA-384 of the initrd file (dstack-mr ``machine.rs``: RTMR2 log =
  [cmdline digest, sha384(initrd)]).
* RTMR1 (``--json`` field ``rtmr1``): the PE/COFF Authenticode SHA-384 of the kernel image
  (EV_EFI_BOOT_SERVICES_APPLICATION), then the fixed events "Calling EFI Application from Boot Option",
  the separator ``00000000``, "Exit Boot Services Invocation", "Exit Boot Services Returned with Success"
  (dstack-mr / tdx-measure ``rtmr1_log``). Firmware that measures the kernel after QEMU patched its setup
  header (older OVMF, see tdx-measure's ``patch_kernel``) gives a different kernel digest: RTMR1 is
  printed as what this model predicts, not as a guarantee.

Exactness: the digests follow the sources above byte for byte, and the tests check them against
independent computations (and ``pesign`` for the Authenticode hash); no published (kernel, initrd,
cmdline) -> RTMR2 vector was found to test against, so confirm once against a real TD's RTMR2 (or its
CCEL event log) before relying on a new firmware build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from agent.cli import EXIT_BAD_INPUT, EXIT_OK, add_json_flag
from agent.config import AgentConfig
from agent.errors import BadInputError

ZERO_MR = bytes(48)
INITRD_ARG = {"prepend": "initrd=initrd {}", "append": "{} initrd=initrd", "none": "{}"}
RTMR1_FIXED_EVENTS = (
    ("EV_EFI_ACTION", b"Calling EFI Application from Boot Option"),
    ("EV_SEPARATOR", b"\x00\x00\x00\x00"),
    ("EV_EFI_ACTION", b"Exit Boot Services Invocation"),
    ("EV_EFI_ACTION", b"Exit Boot Services Returned with Success"),
)
_CHUNK = 1 << 20


class MeasureError(BadInputError, ValueError):
    """An input that cannot be measured (unreadable file, not a PE image, bad command line): exit 4."""

    reason = "measure_input"


@dataclass(frozen=True)
class Event:
    what: str
    digest: bytes


def extend(events: list[Event]) -> bytes:
    """Fold digests into a register that starts at zero: MR = SHA384(MR || digest)."""
    mr = ZERO_MR
    for ev in events:
        mr = hashlib.sha384(mr + ev.digest).digest()
    return mr


def load_options(cmdline: str, initrd_arg: str = "prepend") -> str:
    """The LoadOptions string OVMF hands the kernel for this QEMU ``-append`` text."""
    return INITRD_ARG[initrd_arg].format(cmdline)


def cmdline_digest(options: str) -> bytes:
    """SHA-384 of LoadOptions as measured: UTF-16LE with the terminating UTF-16 NUL."""
    return hashlib.sha384(options.encode("utf-16-le") + b"\x00\x00").digest()


def file_sha384(path: Path) -> bytes:
    h = hashlib.sha384()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def authenticode_digest(data: bytes, algorithm: str = "sha384") -> bytes:
    """PE/COFF Authenticode digest, SHA-384 for TDX (Microsoft "Windows Authenticode Portable Executable Signature
    Format"; edk2 ``DxeTpm2MeasureBootLib`` / ``Tcg2MeasurePeImage``): headers without CheckSum and the
    certificate-table entry, sections in file order, then trailing data outside the certificate table.
    Same ranges as dstack-mr / tdx-measure ``authenticode_sha384_hash`` (incl. their 8-byte padding)."""

    def u16(off: int) -> int:
        return _unpack("<H", data, off)

    def u32(off: int) -> int:
        return _unpack("<I", data, off)

    if data[:2] != b"MZ":
        raise MeasureError("kernel: not a PE/COFF image (no MZ header; use the EFI-stub bzImage)")
    pe = u32(0x3C)
    if data[pe : pe + 4] != b"PE\x00\x00":
        raise MeasureError("kernel: no PE signature (kernel built without CONFIG_EFI_STUB?)")
    coff = pe + 4
    nsect, opt_size = u16(coff + 2), u16(coff + 16)
    opt = coff + 20
    magic = u16(opt)
    if magic not in (0x10B, 0x20B):
        raise MeasureError(f"kernel: unknown PE optional header magic {magic:#x}")
    checksum = opt + 64
    cert_entry = opt + (112 if magic == 0x20B else 96) + 4 * 8  # DataDirectory[4]: the certificate table
    size_of_headers = u32(opt + 60)
    if not cert_entry + 8 <= size_of_headers <= len(data):
        raise MeasureError("kernel: PE headers truncated")
    h = hashlib.new(algorithm)
    h.update(data[:checksum])
    h.update(data[checksum + 4 : cert_entry])
    h.update(data[cert_entry + 8 : size_of_headers])
    hashed = size_of_headers
    sections = []
    table = opt + opt_size
    for i in range(nsect):
        s = table + 40 * i
        raw_size, raw_ptr = u32(s + 16), u32(s + 20)
        if raw_size:
            sections.append((raw_ptr, raw_size))
    for ptr, size in sorted(sections):
        h.update(data[ptr : ptr + size])
        hashed += size
    cert_addr, cert_size = u32(cert_entry), u32(cert_entry + 4)
    if cert_addr and cert_size and len(data) > hashed and len(data) - hashed > cert_size:
        h.update(data[hashed : len(data) - cert_size])
    if len(data) % 8:
        h.update(bytes(8 - len(data) % 8))
    return h.digest()


def _unpack(fmt: str, data: bytes, off: int) -> int:
    try:
        return int(struct.unpack_from(fmt, data, off)[0])
    except struct.error:
        raise MeasureError(f"kernel: PE header field at {off:#x} lies past the end of the file") from None


class Measurement(TypedDict):
    """What :func:`measure` predicts (hex strings), the same keys ``--json`` prints."""

    load_options: str
    initrd_sha384: str
    rtmr2: str
    rtmr2_events: list[dict[str, str]]
    kernel_authenticode_sha384: str
    rtmr1: str
    rtmr1_events: list[dict[str, str]]


def measure(kernel: Path, initrd: Path, cmdline: str, initrd_arg: str = "prepend") -> Measurement:
    """Every event digest and the two registers, as plain data (hex strings)."""
    if "\x00" in cmdline:
        raise MeasureError("cmdline: contains a NUL character (QEMU would cut it there)")
    try:
        kdata = kernel.read_bytes()
        initrd_digest = file_sha384(initrd)
    except OSError as exc:
        raise MeasureError(f"{exc.filename}: {exc.strerror}") from None
    options = load_options(cmdline, initrd_arg)
    rtmr2_events = [
        Event("kernel command line: LoadOptions, UTF-16LE + NUL (EFI stub, PCR 9)", cmdline_digest(options)),
        Event("initrd: LINUX_EFI_INITRD_MEDIA_GUID LoadFile2 contents (EFI stub, PCR 9)", initrd_digest),
    ]
    rtmr1_events = [Event("kernel: PE/COFF Authenticode SHA-384", authenticode_digest(kdata))]
    rtmr1_events += [Event(f"{kind} {data.hex() if kind == 'EV_SEPARATOR' else data.decode()}",
                           hashlib.sha384(data).digest()) for kind, data in RTMR1_FIXED_EVENTS]

    def dump(events: list[Event]) -> list[dict[str, str]]:
        return [{"event": e.what, "sha384": e.digest.hex()} for e in events]

    return {
        "load_options": options,
        "initrd_sha384": initrd_digest.hex(),
        "rtmr2": extend(rtmr2_events).hex(),
        "rtmr2_events": dump(rtmr2_events),
        "kernel_authenticode_sha384": rtmr1_events[0].digest.hex(),
        "rtmr1": extend(rtmr1_events).hex(),
        "rtmr1_events": dump(rtmr1_events),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", required=True, type=Path, help="the kernel image QEMU gets as -kernel")
    parser.add_argument("--initrd", required=True, type=Path, help="the initramfs QEMU gets as -initrd")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--cmdline", help="the text QEMU gets as -append (exactly; quote it)")
    src.add_argument("--cmdline-file", type=Path, help="read that text from a file (one trailing newline dropped)")
    parser.add_argument(
        "--initrd-arg", choices=sorted(INITRD_ARG), default="prepend",
        help="how the firmware adds initrd=initrd to the command line: prepend (edk2 since 2024, default), "
             "append (older edk2), none",
    )
    add_json_flag(parser)


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    try:
        if args.cmdline_file is not None:
            try:
                text = args.cmdline_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise MeasureError(f"{args.cmdline_file}: {getattr(exc, 'strerror', None) or exc}") from None
            cmdline = text[:-1] if text.endswith("\n") else text
        else:
            cmdline = args.cmdline
        result = measure(args.kernel, args.initrd, cmdline, args.initrd_arg)
    except MeasureError as exc:
        print(f"chutes-attest measure: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"load options : {result['load_options']!r}")
    for ev in result["rtmr2_events"]:
        print(f"  rtmr2 event: {ev['sha384']}  {ev['event']}")
    print(f"RTMR2        : {result['rtmr2']}")
    print(f"kernel (Authenticode SHA-384): {result['kernel_authenticode_sha384']}")
    print(f"RTMR1 (model, see --help)    : {result['rtmr1']}")
    return EXIT_OK
