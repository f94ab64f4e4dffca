"""``chutes-attest quote parse``: run as a real subprocess on the real samples."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.quote.builders import SAMPLES, V4_SAMPLE, V5_SAMPLE, make_pki, resign, sample


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "quote", "parse", *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("name", SAMPLES)
def test_verify_json_on_every_sample(quotes_dir: Path, name: str) -> None:
    p = cli(str(quotes_dir / name), "--verify", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    q = sample(name)
    assert d["input_encoding"] == "raw" and d["quote_len"] + d["trailing_len"] == len(q)
    assert d["mr_td"] == q[184:232].hex() or d["version"] == 5
    assert d["verify"]["ok"] is True
    assert [c["name"] for c in d["verify"]["checks"]] == [
        "quote_signature", "qe_report_signature", "qe_report_data_binding", "pck_chain"]


@pytest.mark.parametrize("encoding", ["raw", "base64", "hex", "hex-wrapped"])
def test_stdin_encodings_autodetected(encoding: str) -> None:
    raw = sample(V5_SAMPLE)
    data = {"raw": raw, "base64": base64.b64encode(raw) + b"\n", "hex": raw.hex().encode(),
            "hex-wrapped": b"\n".join(raw.hex().encode()[i:i + 64] for i in range(0, 2 * len(raw), 64))}[encoding]
    p = cli("-", "--json", stdin=data)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["input_encoding"] == encoding.split("-")[0]
    assert d["mr_td"] == ("7348651a34b2d2d3462822e3a750ec6110125f36757c78480bbfc69cc0d21fb0"
                          "01a1ced3ee19747dda8f750c3bc8f876")
    assert d["tee_tcb_svn2"] == "0d010400000000000000000000000000" and d["body_type"] == 3


def test_text_output_lists_fields_and_checks(quotes_dir: Path) -> None:
    p = cli(str(quotes_dir / "trustee_tdx_quote_4_v4_exact.bin"), "--verify")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "td_attributes" in out and "0100001000000000" in out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("debug ")] == ["True"]
    for check in ("quote_signature", "qe_report_signature", "qe_report_data_binding", "pck_chain"):
        assert any(ln.startswith(check) and " pass " in ln for ln in out.splitlines()), check
    assert "signature self-check: PASS" in out and "signed_region" in out and "0..632" in out


def test_failed_check_exits_3(tmp_path: Path) -> None:
    raw = bytearray(sample(V4_SAMPLE))
    raw[568] ^= 1  # report_data: signed, so the quote signature breaks
    f = tmp_path / "q.bin"
    f.write_bytes(bytes(raw))
    p = cli(str(f), "--verify", "--json")
    assert p.returncode == 3
    checks = {c["name"]: c["passed"] for c in json.loads(p.stdout)["verify"]["checks"]}
    assert checks == {"quote_signature": False, "qe_report_signature": True, "qe_report_data_binding": True,
                      "pck_chain": True}
    assert cli(str(f)).returncode == 0  # without --verify it only parses


def test_root_ca_option(tmp_path: Path) -> None:
    pki = make_pki()
    (tmp_path / "q.bin").write_bytes(resign(sample(V4_SAMPLE), pki))
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    assert cli(str(tmp_path / "q.bin"), "--verify").returncode == 3
    assert cli(str(tmp_path / "q.bin"), "--verify", "--root-ca", str(tmp_path / "root.pem")).returncode == 0


@pytest.mark.parametrize(("data", "words"), [
    (b"", "field 'version' at offset 0"),
    (sample(V4_SAMPLE)[:700], "field 'sig_data_len' at offset 632"),
    (b"\xd8\x3d" + bytes(100), "CBOR/COSE"),
    (b"zz not a quote at all", "malformed"),
])
def test_malformed_input_exits_4(data: bytes, words: str) -> None:
    p = cli("-", "--verify", stdin=data)
    assert p.returncode == 4
    assert words in p.stderr.decode() and p.stdout == b""


def test_missing_file_is_usage_error(tmp_path: Path) -> None:
    p = cli(str(tmp_path / "nope.bin"))
    assert p.returncode == 2 and b"cannot read" in p.stderr
