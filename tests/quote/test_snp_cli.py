"""``chutes-attest quote parse`` on SEV-SNP reports: kind detection, JSON, --verify with --vek (subprocess)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.quote.test_snp_parse_samples import EXPECTED, REPORTS, SNP_DIR


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "quote", "parse", *args], input=stdin,
                          capture_output=True, cwd=REPO, timeout=60)


def vek_of(name: str) -> Path:
    stem = name.rsplit("-", 1)[0]
    return next(SNP_DIR.glob(f"{stem}-v?ek.der"))


@pytest.mark.parametrize("name", REPORTS)
def test_json_is_the_report_to_dict(name: str) -> None:
    p = cli(str(SNP_DIR / name), "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["tee"] == "snp" and d["input_encoding"] == "raw" and "verify" not in d
    assert d["version"] == EXPECTED[name][10] and d["product"] == EXPECTED[name][11]
    assert d["measurement"].startswith(EXPECTED[name][8])


@pytest.mark.parametrize("encoding", ["base64", "hex"])
def test_encoded_report_on_stdin(encoding: str) -> None:
    raw = (SNP_DIR / "S9-turin-v5.bin").read_bytes()
    data = base64.b64encode(raw) if encoding == "base64" else raw.hex().encode()
    p = cli("-", "--json", stdin=data + b"\n")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["input_encoding"] == encoding and d["product"] == "Turin"
    assert d["reported_tcb_decoded"] == {"fmc": 0, "bl": 1, "tee": 0, "snp": 2, "ucode": 71}


def test_verify_with_vek_passes_on_genoa_v5() -> None:
    p = cli(str(SNP_DIR / "S6-genoa-v5.bin"), "--verify", "--vek", str(vek_of("S6-genoa-v5.bin")), "--json")
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)["verify"]
    assert v["ok"] is True and v["product"] == "Genoa"
    assert {c["name"] for c in v["checks"]} >= {"report_signature", "policy_debug_off", "vmpl_zero"}


def test_verify_fails_with_exit_3_on_the_debug_report() -> None:
    p = cli(str(SNP_DIR / "S2-milan-v2.bin"), "--verify", "--vek", str(vek_of("S2-milan-v2.bin")))
    assert p.returncode == 3, p.stderr
    out = p.stdout.decode()
    assert "signature self-check: FAIL" in out
    assert any(ln.startswith("policy_debug_off") and " FAIL " in ln for ln in out.splitlines())


def test_verify_without_a_vek_is_not_ok() -> None:
    p = cli(str(SNP_DIR / "S9-turin-v5.bin"), "--verify", "--json")
    assert p.returncode == 3
    assert json.loads(p.stdout)["verify"]["ok"] is False


def test_text_output_names_kind_and_product() -> None:
    p = cli(str(SNP_DIR / "S4-milan-v3.bin"))
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert out.startswith("# SEV-SNP report v3, Milan, VLEK, 1184 bytes, read as raw")
    assert "reported_tcb_decoded" in out and "bl=4 tee=0 snp=24 ucode=217" in out


def test_malformed_report_sized_input_gets_the_snp_error() -> None:
    raw = bytearray((SNP_DIR / "S6-genoa-v5.bin").read_bytes())
    raw[0x34] = 2
    p = cli("-", stdin=bytes(raw))
    assert p.returncode == 4 and p.stdout == b""
    assert "malformed SEV-SNP report: field 'signature_algo' at offset 0x034" in p.stderr.decode()
    raw[0x34], raw[0] = 1, 9  # version 9: neither kind; a 1184-byte input is read as an SNP report
    p = cli("-", stdin=bytes(raw))
    assert p.returncode == 4 and "field 'version' at offset 0x000: unsupported report version 9" in p.stderr.decode()


def test_option_mixups_are_usage_errors(quotes_dir: Path, tmp_path: Path) -> None:
    snp = str(SNP_DIR / "S6-genoa-v5.bin")
    vek = str(vek_of("S6-genoa-v5.bin"))
    p = cli(str(quotes_dir / "dcapqvl_tdx_quote_v4.bin"), "--vek", vek)
    assert p.returncode == 2 and b"--vek applies to SEV-SNP reports" in p.stderr
    p = cli(snp, "--root-ca", vek)
    assert p.returncode == 2 and b"--root-ca applies to TDX quotes" in p.stderr
    bad = tmp_path / "vek.der"
    bad.write_bytes(b"not a certificate")
    p = cli(snp, "--verify", "--vek", str(bad))
    assert p.returncode == 2 and b"bad VEK certificate" in p.stderr
    p = cli(snp, "--verify", "--vek", str(tmp_path / "missing.der"))
    assert p.returncode == 2 and b"cannot read" in p.stderr


def test_vek_defaults_to_quote_snp_vek_file(tmp_path: Path) -> None:
    vek = vek_of("S6-genoa-v5.bin")
    (tmp_path / "empty.toml").write_text("")
    p = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(tmp_path / "empty.toml"),
                        "--set", f"quote.snp_vek_file={vek}", "quote", "parse", str(SNP_DIR / "S6-genoa-v5.bin"),
                        "--verify", "--json"], capture_output=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["verify"]["ok"] is True
