"""`chutes-attest measure`: RTMR2/RTMR1 for a direct-boot kernel + initrd + cmdline (unit tier).

Expected values are computed here independently from the documented event layout (register starts at
zero, MR = SHA384(MR || digest); LoadOptions UTF-16LE + NUL with OVMF's "initrd=initrd " prefix; raw
initrd bytes), on a synthetic PE32+ image whose Authenticode ranges the test spells out by hand.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from agent.cli import main
from agent.commands.measure import authenticode_digest


def _pe(tmp_path: Path, cert: bytes = b"") -> tuple[Path, bytes, bytes]:
    """A minimal PE32+ file: DOS header, PE header, optional header, 2 sections (file order reversed in
    the table), optional trailing certificate table. Returns path, file bytes, expected Authenticode."""
    opt_size = 240  # PE32+ optional header with 16 data directories
    pe_off = 0x80
    opt = pe_off + 24
    table = opt + opt_size
    headers = 0x200
    sec_a, sec_b = b"A" * 0x200, b"B" * 0x100
    data = bytearray(headers)
    data[0:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, pe_off)
    data[pe_off : pe_off + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", data, pe_off + 4, 0x8664, 2, 0, 0, 0, opt_size, 0x22)
    struct.pack_into("<H", data, opt, 0x20B)
    struct.pack_into("<I", data, opt + 60, headers)  # SizeOfHeaders
    struct.pack_into("<I", data, opt + 64, 0xDEADBEEF)  # CheckSum: excluded
    # section table: B (at 0x400) listed before A (at 0x200): hashing goes by file offset
    struct.pack_into("<8sIIII", data, table, b".b", len(sec_b), 0x2000, len(sec_b), 0x400)
    struct.pack_into("<8sIIII", data, table + 40, b".a", len(sec_a), 0x1000, len(sec_a), 0x200)
    body = bytes(data) + sec_a + sec_b
    trailer = b"T" * 8
    full = bytearray(body + trailer + cert)
    cert_entry = opt + 112 + 32
    if cert:
        struct.pack_into("<II", full, cert_entry, len(body + trailer), len(cert))
    exp = hashlib.sha384()
    exp.update(full[: opt + 64])
    exp.update(full[opt + 68 : cert_entry])
    exp.update(full[cert_entry + 8 : headers])
    exp.update(sec_a + sec_b)
    if cert:
        exp.update(trailer)
    if len(full) % 8:
        exp.update(bytes(8 - len(full) % 8))
    path = tmp_path / "vmlinuz"
    path.write_bytes(bytes(full))
    return path, bytes(full), exp.digest()


def _fold(*digests: bytes) -> bytes:
    mr = bytes(48)
    for d in digests:
        mr = hashlib.sha384(mr + d).digest()
    return mr


def test_authenticode_ranges(tmp_path: Path) -> None:
    _, data, expected = _pe(tmp_path, cert=b"C" * 24)
    assert authenticode_digest(data) == expected
    # CheckSum and the certificate table (entry and contents) are outside the digest; section bytes are in
    changed = bytearray(data)
    changed[0x80 + 24 + 64] ^= 0xFF
    changed[-1] ^= 0xFF
    assert authenticode_digest(bytes(changed)) == expected
    changed[0x200] ^= 0xFF
    assert authenticode_digest(bytes(changed)) != expected


def test_rtmr2_matches_documented_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kernel, _, kernel_digest = _pe(tmp_path)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(bytes(range(256)) * 1000)
    cmdline = "console=ttyS0 root=/dev/mapper/root ro quiet"
    assert main(["measure", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    options = "initrd=initrd " + cmdline
    cmd_digest = hashlib.sha384(options.encode("utf-16-le") + b"\0\0").digest()
    initrd_digest = hashlib.sha384(initrd.read_bytes()).digest()
    assert out["load_options"] == options
    assert [e["sha384"] for e in out["rtmr2_events"]] == [cmd_digest.hex(), initrd_digest.hex()]
    assert out["rtmr2"] == _fold(cmd_digest, initrd_digest).hex()
    fixed = [b"Calling EFI Application from Boot Option", b"\0\0\0\0", b"Exit Boot Services Invocation",
             b"Exit Boot Services Returned with Success"]
    assert out["kernel_authenticode_sha384"] == kernel_digest.hex()
    assert out["rtmr1"] == _fold(kernel_digest, *(hashlib.sha384(f).digest() for f in fixed)).hex()

    # older edk2 appended the initrd argument: a different, equally documented value
    assert main(["measure", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline", cmdline,
                 "--initrd-arg", "append", "--json"]) == 0
    old = json.loads(capsys.readouterr().out)
    assert old["load_options"] == cmdline + " initrd=initrd" and old["rtmr2"] != out["rtmr2"]

    # the cmdline file form drops exactly one trailing newline; text output carries the same RTMR2
    f = tmp_path / "cmdline.txt"
    f.write_text(cmdline + "\n")
    assert main(["measure", "--kernel", str(kernel), "--initrd", str(initrd), "--cmdline-file", str(f)]) == 0
    text = capsys.readouterr().out
    assert f"RTMR2        : {out['rtmr2']}" in text


@pytest.mark.parametrize(
    ("kernel_bytes", "message"),
    [
        (b"\x7fELF" + bytes(100), "not a PE/COFF image"),
        (b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"XX\0\0", "no PE signature"),
        (b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\0", "past the end of the file"),
    ],
    ids=["elf", "no-pe-signature", "truncated-headers"],
)
def test_bad_input_is_exit_4_with_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kernel_bytes: bytes, message: str
) -> None:
    k = tmp_path / "k"
    k.write_bytes(kernel_bytes)
    initrd = tmp_path / "i"
    initrd.write_bytes(b"x")
    assert main(["measure", "--kernel", str(k), "--initrd", str(initrd), "--cmdline", "x"]) == 4
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert main(["measure", "--kernel", str(k), "--initrd", str(tmp_path / "missing"), "--cmdline", "x"]) == 4
    assert "No such file or directory" in capsys.readouterr().err
