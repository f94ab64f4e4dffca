"""Unit tests: the one own-evidence policy (agent.evidence.own_quote) on real and simulated bytes, and the
SEV-SNP rootfs compare (agent.evidence.rootfs_measure.verify_rootfs_snp) against an independent model."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from agent.evidence.own_quote import OwnEvidenceError, check_own_evidence, tee_resolution
from agent.evidence.rootfs_measure import (
    SNP_MISMATCH,
    RootfsMeasureError,
    format_manifest,
    predict_entries,
    verify_rootfs_snp,
)
from agent.quote.snp_parser import parse_snp_report

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "sev-snp"


def _sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _refused(raw: bytes, rd: bytes, **kw: object) -> OwnEvidenceError:
    with pytest.raises(OwnEvidenceError) as info:
        check_own_evidence(raw, rd, **kw)  # type: ignore[arg-type]
    return info.value


@pytest.fixture(scope="module")
def snp(tmp_path_factory: pytest.TempPathFactory) -> object:
    from agent.sim.snp_sim import SimulatedSnpSource

    return SimulatedSnpSource(tmp_path_factory.mktemp("sim"))


# ── TDX: the boot's historical messages, byte for byte ───────────────────────

def test_tdx_messages_are_the_boots(tmp_path: Path) -> None:
    from agent.sim.quote_sim import SimulatedQuoteSource

    rd = bytes(range(64))
    q = SimulatedQuoteSource(tmp_path / "sim").get_quote(rd)
    ev = check_own_evidence(q, rd, tee="tdx")
    assert ev.tee == "tdx" and ev.version == 4 and set(ev.measurements) == {"mr_td", "rtmr0", "rtmr1", "rtmr2",
                                                                             "rtmr3"}
    assert _refused(q, bytes(64), tee="tdx").message == (
        "own quote: report_data differs from nonce || SHA-256(client cert SPKI)")
    assert _refused(b"\x04\x00short", rd, tee="tdx").message.startswith("own quote does not parse: ")
    dbg = SimulatedQuoteSource(tmp_path / "sim", debug=True).get_quote(rd)
    e = _refused(dbg, rd, tee="tdx")
    assert e.message == "own quote: TD DEBUG attribute is set; refusing to request keys" and e.check == "debug"


def test_tdx_v5_needs_allow_v5(quotes_dir: Path) -> None:
    raw = (quotes_dir / "gotdxguest_quote_v5_sample.bin").read_bytes()
    from agent.quote import parse_quote

    rd = bytes(parse_quote(raw).report_data)
    e = _refused(raw, rd, tee="tdx")
    assert e.message == ("own quote is version 5: the Chutes validator reads v4 offsets only "
                         "(boot.allow_quote_v5 = true for other verifiers)")
    assert check_own_evidence(raw, rd, tee="tdx", allow_v5=True).version == 5


# ── SEV-SNP: the public samples and the simulated guest ──────────────────────

@pytest.mark.parametrize("name", ["S1-milan-v2.bin", "S3-milan-v2.bin", "S6-genoa-v5.bin", "S7-genoa-v3.bin",
                                  "S8-milan-v3.bin", "S9-turin-v5.bin"])
def test_snp_public_accept_samples_pass(name: str) -> None:
    raw = _sample(name)
    r = parse_snp_report(raw)
    ev = check_own_evidence(raw, bytes(r.report_data), tee="snp")
    assert ev.tee == "snp" and ev.version == r.version and ev.debug is False
    assert ev.measurements["measurement"] == bytes(r.measurement).hex()
    assert ev.measurements["policy"] == f"0x{r.policy:x}" and ev.measurements["signing_key"] == "vcek"


def test_snp_public_debug_sample_is_refused() -> None:
    raw = _sample("S2-milan-v2.bin")
    e = _refused(raw, bytes(parse_snp_report(raw).report_data), tee="snp")
    assert e.message == "own SNP report: POLICY.DEBUG is set; refusing to request keys" and e.check == "debug"


def test_snp_public_vmpl1_sample_is_refused() -> None:
    raw = _sample("S4-milan-v3.bin")
    e = _refused(raw, bytes(parse_snp_report(raw).report_data), tee="snp")
    assert e.check == "vmpl" and "VMPL 1, not 0" in e.message


def test_snp_binding_and_kind(snp: object) -> None:
    rd = bytes(range(64))
    raw = snp.get_quote(rd)  # type: ignore[attr-defined]
    ev = check_own_evidence(raw, rd, tee="snp")
    assert ev.measurements["vmpl"] == "0" and ev.measurements["product"] == "Genoa"
    assert _refused(raw, bytes(64), tee="snp").message == (
        "own SNP report: report_data differs from nonce || SHA-256(client cert SPKI)")
    assert _refused(raw, rd, tee="tdx").check == "parse"  # an SNP report is no TDX quote
    e = _refused(raw[:-1], rd, tee="snp")
    assert e.check == "parse" and e.message.startswith("own SNP report does not parse: ")


def _patched(raw: bytes, *, policy: int | None = None, key_info: int | None = None) -> bytes:
    b = bytearray(raw)
    if policy is not None:
        struct.pack_into("<Q", b, 0x08, policy)
    if key_info is not None:
        struct.pack_into("<I", b, 0x48, key_info)
    return bytes(b)


def test_snp_unsigned_and_reserved_bit(snp: object) -> None:
    rd = bytes(64)
    raw = snp.get_quote(rd)  # type: ignore[attr-defined]
    try:
        unsigned = _patched(raw, key_info=7 << 2)
        parse_snp_report(unsigned)
    except ValueError:
        pass  # the parser refuses SIGNING_KEY 7 itself: refused all the same, as "parse"
    else:
        assert _refused(unsigned, rd, tee="snp").check == "signing_key"
    try:
        no17 = _patched(raw, policy=0x10000)
        parse_snp_report(no17)
    except ValueError:
        assert _refused(no17, rd, tee="snp").check == "parse"
    else:
        assert _refused(no17, rd, tee="snp").check == "policy"


def test_tee_resolution_words() -> None:
    from agent.config import QuoteConfig

    q = QuoteConfig()
    assert tee_resolution(q, "tdx") == "probed: /dev/tdx_guest present"
    assert tee_resolution(q, "snp") == "probed: /dev/tdx_guest absent, /dev/sev-guest present"
    q.tee = "snp"
    assert tee_resolution(q, "snp") == 'pinned by quote.tee = "snp"'
    assert tee_resolution(q, "snp", "simulated") == "from the simulated quote source"


# ── SEV-SNP rootfs: list digest vs manifest ──────────────────────────────────

def _tree(tmp: Path) -> tuple[Path, Path, Path]:
    root = tmp / "root"
    for rel, data in {"etc/a": b"1\n", "etc/sub/b": b"2\n", "usr/c": b"3" * 5000}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    conf = tmp / "conf"
    conf.write_text("/etc\n/usr\n/etc/a\n/etc/absent\n")
    manifest = tmp / "manifest"
    manifest.write_bytes(format_manifest(predict_entries(str(root), [b"/etc", b"/usr", b"/etc/a"], scheme="next")))
    return root, conf, manifest


def _model(root: Path) -> bytes:
    files = sorted(b"/" + bytes(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return hashlib.sha384(b"".join(hashlib.sha384((root / f[1:].decode()).read_bytes()).hexdigest().encode()
                                   + b" " + f + b"\n" for f in files)).digest()


def test_snp_rootfs_match_equals_the_model(tmp_path: Path) -> None:
    root, conf, manifest = _tree(tmp_path)
    check = verify_rootfs_snp(str(root), str(conf), str(manifest))
    assert check.digest == check.manifest_digest == _model(root)
    assert check.result.files == 3 and check.manifest_files == 3 and len(check.result.absent) == 1


@pytest.mark.parametrize(("change", "said"), [
    (lambda r: (r / "etc" / "a").write_bytes(b"changed\n"), "1 changed, first /etc/a"),
    (lambda r: (r / "usr" / "new").write_bytes(b"x"), "1 not in the manifest, first /usr/new"),
    (lambda r: (r / "etc" / "sub" / "b").unlink(), "1 listed but absent, first /etc/sub/b"),
])
def test_snp_rootfs_mismatch_names_the_first_file(tmp_path: Path, change: object, said: str) -> None:
    root, conf, manifest = _tree(tmp_path)
    change(root)  # type: ignore[operator]
    with pytest.raises(RootfsMeasureError) as info:
        verify_rootfs_snp(str(root), str(conf), str(manifest))
    e = info.value
    assert str(e).startswith(f"ROOTFS-MEASURE-FAILED: {SNP_MISMATCH} (list digest ") and said in e.message


def test_snp_rootfs_missing_manifest_is_fatal(tmp_path: Path) -> None:
    root, conf, manifest = _tree(tmp_path)
    manifest.unlink()
    with pytest.raises(RootfsMeasureError, match="cannot read manifest"):
        verify_rootfs_snp(str(root), str(conf), str(manifest))
