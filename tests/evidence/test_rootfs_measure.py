"""RTMR3 rootfs chain, unit tier: which files, in which order, the manifest check, predict and its CLI.

Expected values are computed here with hashlib over an explicitly written-out order, never with the
module's own helpers, so a change in order, coverage or hashing shows up as a different value.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.evidence import rootfs_measure as rm
from agent.evidence.rootfs_measure import RootfsMeasureError


def sha(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def expected_chain(root: Path, rels: list[str]) -> bytes:
    value = bytes(48)
    for rel in rels:
        value = hashlib.sha384(value + sha((root / rel.lstrip("/")).read_bytes())).digest()
    return value


def write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Names chosen so byte order, os.walk order and locale order all differ."""
    root = tmp_path / "root"
    for rel, data in {
        "/etc/a/x": b"in a dir",
        "/etc/a-b": b"dash sorts before slash",
        "/etc/a.b": b"dot sorts after dash, before slash",
        "/etc/B": b"upper case sorts first",
        "/etc/Z": b"also upper case",
        "/etc/été": b"non-ascii sorts last",
        "/etc/a/y/z": b"deeper",
        "/opt/app/main.py": b"print('hi')\n",
        "/opt/app/empty": b"",
    }.items():
        write(root, rel, data)
    write(root, "/etc/unmeasured-sibling-dir-is-fine", b"measured too: /etc is a directory entry")
    return root


# byte-wise order of the root-relative names ('-' 0x2d < '.' 0x2e < '/' 0x2f; 'B' < 'Z' < 'a' < 0xc3)
ETC_ORDER = ["/etc/B", "/etc/Z", "/etc/a-b", "/etc/a.b", "/etc/a/x", "/etc/a/y/z",
             "/etc/unmeasured-sibling-dir-is-fine", "/etc/été"]
OPT_ORDER = ["/opt/app/empty", "/opt/app/main.py"]


def test_predict_is_the_byte_sorted_chain(tree: Path) -> None:
    result = rm.predict_entries(str(tree), ["/opt/app", "/etc"])  # config order does not matter
    assert [os.fsdecode(r) for r, _ in result.entries] == ETC_ORDER + OPT_ORDER
    assert result.rtmr3 == expected_chain(tree, ETC_ORDER + OPT_ORDER)
    assert rm.predict(str(tree), ["/etc", "/opt/app"]) == result.rtmr3
    assert result.files == 10
    assert result.total_bytes == sum(len((tree / r.lstrip("/")).read_bytes()) for r in ETC_ORDER + OPT_ORDER)
    # walk order (directory by directory) would give another value: the order is really byte-wise
    walked = sorted(ETC_ORDER, key=lambda r: r.split("/"))
    assert walked != ETC_ORDER and expected_chain(tree, walked + OPT_ORDER) != result.rtmr3


def test_overlapping_entries_measure_a_file_once(tree: Path) -> None:
    once = rm.predict(str(tree), ["/etc"])
    assert once == expected_chain(tree, ETC_ORDER)
    assert rm.predict(str(tree), ["/etc", "/etc/a/x", "/etc/a", "/etc//a/"]) == once


def test_single_file_entry_and_content_change(tree: Path) -> None:
    before = rm.predict(str(tree), ["/opt/app/main.py"])
    assert before == expected_chain(tree, ["/opt/app/main.py"])
    write(tree, "/opt/app/main.py", b"print('tampered')\n")
    assert rm.predict(str(tree), ["/opt/app/main.py"]) != before


def test_symlinks_and_special_files_are_not_measured(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not part of the image")
    os.symlink(str(outside), tree / "etc" / "link-to-dir")
    os.symlink("a/x", tree / "etc" / "link-to-file")
    os.mkfifo(tree / "etc" / "fifo")
    result = rm.predict_entries(str(tree), ["/etc"])
    assert [os.fsdecode(r) for r, _ in result.entries] == ETC_ORDER
    assert result.rtmr3 == expected_chain(tree, ETC_ORDER)


def test_symlinked_entry_missing_entry_and_special_entry_fail_closed(tree: Path) -> None:
    os.symlink("etc", tree / "etc-link")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /etc-link: .*symlink"):
        rm.plan(str(tree), ["/etc-link"])
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /etc/nope: .*does not exist"):
        rm.plan(str(tree), ["/etc", "/etc/nope"])
    os.mkfifo(tree / "fifo")
    with pytest.raises(RootfsMeasureError, match="neither a regular file nor a directory"):
        rm.plan(str(tree), ["/fifo"])
    (tree / "emptydir").mkdir()
    with pytest.raises(RootfsMeasureError, match="no regular files"):
        rm.plan(str(tree), ["/emptydir"])


def test_leading_symlinks_resolve_inside_the_root(tree: Path) -> None:
    # merged /usr: /lib -> /usr/lib as an ABSOLUTE link must resolve in the image, not on this machine
    write(tree, "/usr/lib/modules/k.ko", b"module")
    os.symlink("/usr/lib", tree / "lib")
    os.symlink("../usr/lib", tree / "opt" / "rel-lib")
    result = rm.predict_entries(str(tree), ["/lib/modules", "/opt/rel-lib/modules"])
    assert [r for r, _ in result.entries] == [b"/lib/modules/k.ko", b"/opt/rel-lib/modules/k.ko"]
    assert result.entries[0][1] == sha(b"module")


def test_newline_in_a_file_name_is_refused(tree: Path) -> None:
    write(tree, "/etc/evil\nname", b"x")
    with pytest.raises(RootfsMeasureError, match=r"/etc/evil\\x0aname: .*newline"):
        rm.plan(str(tree), ["/etc"])


def test_many_files_and_large_files_keep_their_order(tmp_path: Path) -> None:
    root = tmp_path / "r"
    rels = []
    for i in range(700):  # several pool batches
        rel = f"/d/{(i * 7919) % 1000:04d}"
        write(root, rel, os.urandom(i % 97))
        rels.append(rel)
    write(root, "/d/big1", os.urandom(rm.CHUNK * 3 + 17))  # read in 1 MiB chunks
    write(root, "/d/big0", os.urandom(rm.CHUNK))
    ordered = sorted([*rels, "/d/big0", "/d/big1"])
    for workers in (1, 4):
        assert rm.predict_entries(str(root), ["/d"], workers=workers).rtmr3 == expected_chain(root, ordered)


def test_hash_file_refuses_a_file_swapped_for_a_symlink(tree: Path) -> None:
    (f,) = rm.plan(str(tree), ["/etc/a/x"])
    os.unlink(tree / "etc" / "a" / "x")
    os.symlink("/etc/B", tree / "etc" / "a" / "x")
    with pytest.raises(RootfsMeasureError, match=r"/etc/a/x: cannot open"):
        rm.hash_file(f)


# -- path list ------------------------------------------------------------------------------------


def test_measure_conf_parsing() -> None:
    text = b"# RTMR3 measured paths\r\n/etc/opa  # policies\r\n\n  /opt/sek8s/src\t\n/usr//lib/\n#/skipped\n"
    assert rm.parse_measure_conf(text) == [b"/etc/opa", b"/opt/sek8s/src", b"/usr/lib"]


@pytest.mark.parametrize("text,needle", [
    (b"# only comments\n\n", "no paths configured"),
    (b"etc/relative\n", "absolute path"),
    (b"/etc/../root\n", "'..'"),
    (b"/etc/./x\n", "'.'"),
])
def test_measure_conf_errors(text: bytes, needle: str) -> None:
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: ") as ei:
        rm.parse_measure_conf(text, "conf")
    assert needle in str(ei.value)


# -- manifest -------------------------------------------------------------------------------------


def test_manifest_line_forms() -> None:
    d1, d2, d3, d4 = (sha(bytes([i])) for i in range(4))
    text = (d1.hex().encode() + b"  /etc/two spaces\n"
            + d2.hex().upper().encode() + b" */etc/binary-mode\n"
            + d3.hex().encode() + b" /etc/tee-measure-single-space\n"
            + b"\\" + d4.hex().encode() + b"  /etc/systemd/x\\\\x2d.service\n"
            + b"# comment\n\n")
    assert rm.parse_manifest(text) == {
        b"/etc/two spaces": d1, b"/etc/binary-mode": d2, b"/etc/tee-measure-single-space": d3,
        b"/etc/systemd/x\\x2d.service": d4,
    }


@pytest.mark.parametrize("line,needle", [
    (b"abc  /etc/x", "96 hex"),
    (b"z" * 96 + b"  /etc/x", "96 hex"),
    (b"a" * 96 + b"/etc/x", "96 hex"),
    (b"a" * 96 + b"  etc/x", "starting with '/'"),
    (b"\\" + b"a" * 96 + b"  /etc/\\q", "bad escape"),
])
def test_manifest_malformed_lines(line: bytes, needle: str) -> None:
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: m:1: ") as ei:
        rm.parse_manifest(line + b"\n", "m")
    assert needle in str(ei.value)


def test_manifest_duplicate_and_empty() -> None:
    line = b"a" * 96 + b"  /etc/x\n"
    with pytest.raises(RootfsMeasureError, match=r"/etc/x: m:2: listed twice"):
        rm.parse_manifest(line + line, "m")
    with pytest.raises(RootfsMeasureError, match="no entries"):
        rm.parse_manifest(b"\n# nothing\n", "m")


def test_format_manifest_round_trips_odd_names(tree: Path) -> None:
    write(tree, "/etc/systemd/sys-\\x2d.mount", b"backslash in the name")
    entries = rm.predict_entries(str(tree), ["/etc"]).entries
    text = rm.format_manifest(entries)
    assert b"\\" + sha(b"backslash in the name").hex().encode() + b"  /etc/systemd/sys-\\\\x2d.mount\n" in text
    assert rm.parse_manifest(text) == dict(entries)


def manifest_for(tree: Path, paths: list[str]) -> dict[bytes, bytes]:
    return rm.parse_manifest(rm.format_manifest(rm.predict_entries(str(tree), paths).entries))


def test_manifest_check_passes_and_names_the_tampered_file(tree: Path) -> None:
    manifest = manifest_for(tree, ["/etc", "/opt/app"])
    ok = rm.predict_entries(str(tree), ["/etc", "/opt/app"], manifest=manifest)
    assert ok.rtmr3 == expected_chain(tree, ETC_ORDER + OPT_ORDER)
    write(tree, "/etc/a/x", b"in a dir, changed")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /etc/a/x: SHA-384 .* does not match"):
        rm.predict_entries(str(tree), ["/etc", "/opt/app"], manifest=manifest)


def test_manifest_coverage_both_ways(tree: Path) -> None:
    manifest = manifest_for(tree, ["/etc", "/opt/app"])
    write(tree, "/etc/new-file", b"planted")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /etc/new-file: .*not in the"):
        rm.predict_entries(str(tree), ["/etc", "/opt/app"], manifest=manifest)
    os.unlink(tree / "etc" / "new-file")
    os.unlink(tree / "opt" / "app" / "empty")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /opt/app/empty: .*but not present"):
        rm.predict_entries(str(tree), ["/etc", "/opt/app"], manifest=manifest)
    os.symlink("main.py", tree / "opt" / "app" / "empty")  # a symlink is not the regular file listed
    with pytest.raises(RootfsMeasureError, match=r"/opt/app/empty: .*but not present"):
        rm.predict_entries(str(tree), ["/etc", "/opt/app"], manifest=manifest)


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_predict_text_json_and_manifest(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    want = expected_chain(tree, ETC_ORDER + OPT_ORDER)
    assert cli_main(["rtmr3", "predict", "--root", str(tree), "--paths", "/etc", "/opt/app"]) == 0
    assert capsys.readouterr().out.strip() == want.hex()

    conf = tmp_path / "measure.conf"
    conf.write_text("/etc\n/opt/app # the app\n")
    mf = tmp_path / "manifest"
    assert cli_main(["rtmr3", "predict", "--root", str(tree), "--measure-conf", str(conf), "--json",
                     "--write-manifest", str(mf)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rtmr3"] == want.hex() and out["files"] == 10 and out["manifest_checked"] is False
    assert [e["path"] for e in out["entries"]] == ETC_ORDER + OPT_ORDER
    assert out["entries"][0]["sha384"] == sha(b"upper case sorts first").hex()

    assert cli_main(["rtmr3", "predict", "--root", str(tree), "--measure-conf", str(conf),
                     "--manifest", str(mf)]) == 0
    assert capsys.readouterr().out.strip() == want.hex()
    write(tree, "/opt/app/main.py", b"changed")
    assert cli_main(["rtmr3", "predict", "--root", str(tree), "--measure-conf", str(conf),
                     "--manifest", str(mf)]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "RTMR3-MEASURE-FAILED: /opt/app/main.py: SHA-384" in captured.err

    # the image's own <root>/etc/tdx-measure.conf is the default list
    write(tree, "/etc/tdx-measure.conf", b"/opt/app\n")
    assert cli_main(["rtmr3", "predict", "--root", str(tree)]) == 0
    assert capsys.readouterr().out.strip() == expected_chain(tree, OPT_ORDER).hex()


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["rtmr3", "predict", "--root", str(tmp_path / "none"), "--paths", "/etc"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli_main(["rtmr3", "predict", "--root", str(tmp_path)]) == 3  # no etc/tdx-measure.conf in it
    assert "cannot read measure conf" in capsys.readouterr().err
