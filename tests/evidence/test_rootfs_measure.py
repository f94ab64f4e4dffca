"""Rootfs measurement, unit tier: the value Chutes' walker computes, per scheme, byte for byte.

The expected values come from an independent model of chutes-vm-generations.md §12.1–12.3 written
here as a POSIX shell pipeline over the real tools Chutes' scripts use (``find``, ``LC_ALL=C sort``,
``sha384sum``), never from the module's own helpers; hashlib only folds the digests the shell printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.evidence import rootfs_measure as rm
from agent.evidence.rootfs_measure import RootfsMeasureError

# §12.1/12.2 as Chutes' shell does it. $1 root, $2 conf, $3 scheme. Prints one "<hex> <path>" line per
# extension (1.4: every collected file, duplicates kept; next: sort -u), i.e. next's exact list text.
WALKER = r'''
set -eu
root=$1; conf=$2; scheme=$3
collect() {
  while IFS= read -r line || [ -n "$line" ]; do
    path=${line%%#*}
    if [ "$scheme" = next ]; then path=$(printf '%s' "$path" | tr -d '\r' | sed 's/^[ \t]*//; s/[ \t]*$//')
    else path=$(printf '%s' "$path" | sed 's/^ *//; s/ *$//'); fi
    [ -z "$path" ] && continue
    if [ "$scheme" = next ] && [ -L "$root$path" ]; then echo "symlink entry $path" >&2; exit 9; fi
    if [ -d "$root$path" ]; then find "$root$path" -type f | cut -c$((${#root} + 1))-
    elif [ -f "$root$path" ]; then printf '%s\n' "$path"
    fi
  done < "$conf"
}
if [ "$scheme" = next ]; then sorter="sort -u"; else sorter="sort"; fi
collect | LC_ALL=C $sorter | while IFS= read -r f; do
  printf '%s %s\n' "$(sha384sum < "$root$f" | cut -c1-96)" "$f"
done
'''

# §12.3, 1.4.0's generator: walks the conf line by line, path first, a file reached twice listed twice.
MANIFEST_GENERATOR = r'''
set -eu
root=$1; conf=$2
echo "# expected hashes, generated over the final image"
while IFS= read -r line || [ -n "$line" ]; do
  path=$(printf '%s' "${line%%#*}" | sed 's/^ *//; s/ *$//')
  [ -z "$path" ] && continue
  if [ -d "$root$path" ]; then find "$root$path" -type f | cut -c$((${#root} + 1))-
  elif [ -f "$root$path" ]; then printf '%s\n' "$path"
  fi | while IFS= read -r f; do printf '%s %s\n' "$f" "$(sha384sum < "$root$f" | cut -c1-96)"; done
done < "$conf"
'''


def chutes_list(root: Path, conf: Path, scheme: str) -> bytes:
    return subprocess.run(["sh", "-c", WALKER, "walker", str(root), str(conf), scheme],
                          check=True, capture_output=True).stdout


def chutes_rtmr3(root: Path, conf: Path, scheme: str) -> bytes:
    text = chutes_list(root, conf, scheme)
    if scheme == "next":
        return hashlib.sha384(bytes(48) + hashlib.sha384(text).digest()).digest()
    value = bytes(48)
    for line in text.splitlines():
        value = hashlib.sha384(value + bytes.fromhex(line[:96].decode())).digest()
    return value


def chutes_manifest(root: Path, conf: Path) -> bytes:
    return subprocess.run(["sh", "-c", MANIFEST_GENERATOR, "gen", str(root), str(conf)],
                          check=True, capture_output=True).stdout


def sha(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


#: Shaped like Chutes' miner list: absent paths on purpose, overlapping entries, a symlinked file entry.
CONF_14 = b"""# RTMR3 measured paths (1.4.0)
/etc/opa
/etc/opa/policies     # again, inside the entry above
/etc/opa/policies/admission.rego
/etc/default/rtmr3-verify
/etc/chutes/agent.conf
/opt/sek8s/src/
/usr/lib/chutes
/etc/kube-link
/etc/resolv.conf
/etc/ld.so.preload
"""


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """Names chosen so byte order, walk order and locale order differ; absent-by-design paths absent."""
    root = tmp_path / "root"
    for rel, data in {
        "/etc/opa/policies/admission.rego": b"package admission\n",
        "/etc/opa/policies-extra": b"'-' sorts before '/'",
        "/etc/opa/policies.d/x": b"'.' sorts between '-' and '/'",
        "/etc/opa/B": b"upper case first",
        "/etc/opa/\xc3\xa9t\xc3\xa9".encode("latin-1").decode("utf-8"): b"non-ascii last",
        "/etc/opa/with space": b"a name with a space",
        "/etc/chutes/agent.conf": b"[agent]\n",
        "/opt/sek8s/src/app/main.py": b"print('hi')\n",
        "/opt/sek8s/src/empty": b"",
        "/usr/lib/chutes/lib.so": os.urandom(3 << 20),
        "/usr/lib/chutes/deep/er/mod.py": b"x = 1\n",
        "/usr/lib/kubernetes/kubeconfig": b"apiVersion: v1\n",
    }.items():
        write(root, rel, data)
    os.symlink("../usr/lib/kubernetes", root / "etc" / "kube-link")  # a symlinked dir entry: nothing on 1.4
    os.symlink("../run/resolv.conf", root / "etc" / "resolv.conf")  # dangling file entry: nothing
    os.symlink("admission.rego", root / "etc" / "opa" / "policies" / "link")  # inside a dir: not measured
    os.mkfifo(root / "etc" / "opa" / "fifo")
    return root


@pytest.fixture
def conf14(tmp_path: Path) -> Path:
    p = tmp_path / "tdx-measure.conf"
    p.write_bytes(CONF_14)
    return p


def test_14_value_and_order_match_chutes_walker(image: Path, conf14: Path) -> None:
    result = rm.predict_entries(image, rm.read_measure_conf(str(conf14)), scheme="1.4")
    assert rm.list_text(result.entries) == chutes_list(image, conf14, "1.4")
    assert result.rtmr3 == chutes_rtmr3(image, conf14, "1.4")
    rels = [r for r, _ in result.entries]
    # overlapping entries: a file reached twice is extended twice, thrice when named a third time
    assert rels.count(b"/etc/opa/policies/admission.rego") == 3
    assert rels == sorted(rels) and b"/opt/sek8s/src/app/main.py" in rels  # trailing "/" entry: find's spelling
    assert result.absent == [b"/etc/default/rtmr3-verify", b"/etc/resolv.conf", b"/etc/ld.so.preload"]
    assert not any(r.startswith(b"/etc/kube-link") for r in rels)
    assert result.extensions() == [d for _, d in result.entries]


def test_next_value_and_list_text_match_chutes_walker(image: Path, tmp_path: Path) -> None:
    conf = tmp_path / "tee-measure.conf"
    conf.write_bytes(CONF_14.replace(b"/etc/kube-link\n", b"").replace(b"/etc/resolv.conf\n", b"")
                     .replace(b"/etc/opa/policies ", b"\t/etc/opa/policies\r "))
    result = rm.predict_entries(image, rm.read_measure_conf(str(conf), "next"), scheme="next")
    text = chutes_list(image, conf, "next")
    assert rm.list_text(result.entries) == text
    assert result.rtmr3 == chutes_rtmr3(image, conf, "next")
    assert result.extensions() == [sha(text)]
    assert [r for r, _ in result.entries].count(b"/etc/opa/policies/admission.rego") == 1
    # the same tree under 1.4 gives another value: the scheme really changes what is registered
    assert result.rtmr3 != rm.predict_entries(image, rm.read_measure_conf(str(conf), "next"), scheme="1.4").rtmr3


def test_next_refuses_a_symlinked_entry(image: Path) -> None:
    with pytest.raises(RootfsMeasureError, match=r"^ROOTFS-MEASURE-FAILED: /etc/kube-link: .*symlink"):
        rm.predict_entries(image, [b"/etc/kube-link"], scheme="next")


def test_14_symlinked_file_entry_uses_the_target_content(image: Path) -> None:
    os.symlink("chutes/agent.conf", image / "etc" / "agent-link")
    result = rm.predict_entries(image, [b"/etc/agent-link"], scheme="1.4")
    assert result.entries == [(b"/etc/agent-link", sha(b"[agent]\n"))]


def test_reappearing_absent_path_changes_the_value(image: Path, conf14: Path) -> None:
    registered = rm.predict_entries(image, rm.read_measure_conf(str(conf14))).rtmr3
    write(image, "/etc/ld.so.preload", b"/tmp/evil.so\n")
    again = rm.predict_entries(image, rm.read_measure_conf(str(conf14)))
    assert again.rtmr3 != registered and again.rtmr3 == chutes_rtmr3(image, conf14, "1.4")
    assert b"/etc/ld.so.preload" not in again.absent


def test_special_file_at_a_listed_path_fails_closed(image: Path) -> None:
    os.mkfifo(image / "etc" / "ld.so.preload")  # [ -f ] would let it pass unseen
    with pytest.raises(RootfsMeasureError, match=r"/etc/ld.so.preload: .*neither a regular file"):
        rm.predict_entries(image, [b"/etc/ld.so.preload"])


def test_content_only_hash(image: Path) -> None:
    a = rm.predict_entries(image, [b"/etc/chutes/agent.conf"]).entries[0][1]
    assert a == sha(b"[agent]\n")


def test_leading_symlinks_resolve_inside_the_root(image: Path) -> None:
    os.symlink("/usr/lib", image / "lib")  # absolute: must resolve in the image, not on this machine
    result = rm.predict_entries(image, [b"/lib/chutes/deep"])
    assert result.entries == [(b"/lib/chutes/deep/er/mod.py", sha(b"x = 1\n"))]


def test_a_deep_tree_does_not_recurse(tmp_path: Path) -> None:
    root = tmp_path / "r"
    d = root / "deep"
    d.mkdir(parents=True)
    fd = os.open(d, os.O_RDONLY)
    for _ in range(1100):  # deeper than Python's recursion limit
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"bottom")
    os.close(leaf)
    os.close(fd)
    conf = tmp_path / "c"
    conf.write_bytes(b"/deep\n")
    assert sys.getrecursionlimit() < 1100
    try:
        result = rm.predict_entries(root, [b"/deep"])
        assert result.files == 1 and result.entries[0][0] == b"/deep" + b"/d" * 1100 + b"/leaf"
        assert result.rtmr3 == chutes_rtmr3(root, conf, "1.4")
    finally:  # shutil.rmtree (pytest's tmp_path cleanup) recurses per level; rm(1) does not
        subprocess.run(["rm", "-rf", str(root)], check=True)


def test_newline_in_a_file_name_is_refused(image: Path) -> None:
    write(image, "/etc/opa/evil\nname", b"x")
    with pytest.raises(RootfsMeasureError, match=r"/etc/opa/evil\\x0aname: .*newline"):
        rm.predict_entries(image, [b"/etc/opa"])


def test_many_and_large_files_keep_their_order(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for i in range(700):
        write(root, f"/d/{(i * 7919) % 1000:04d}", os.urandom(i % 97))
    write(root, "/d/big1", os.urandom((3 << 20) + 17))
    write(root, "/d/big0", os.urandom(1 << 20))
    conf = tmp_path / "c"
    conf.write_bytes(b"/d\n")
    for workers in (1, 4):
        assert rm.predict_entries(root, [b"/d"], workers=workers).rtmr3 == chutes_rtmr3(root, conf, "1.4")


# -- path list ------------------------------------------------------------------------------------


def test_conf_trimming_per_scheme() -> None:
    text = b"# measured\n/etc/opa  # policies\n\n  /opt/sek8s/src \n/usr/lib/\n#/skipped\n\t/x\r\n"
    assert rm.parse_measure_conf(text, scheme="next") == [b"/etc/opa", b"/opt/sek8s/src", b"/usr/lib/", b"/x"]
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: c:7: expected an absolute path"):
        rm.parse_measure_conf(text, "c", scheme="1.4")  # 1.4 trims spaces only: "\t/x\r" stays as is


@pytest.mark.parametrize("text,needle", [
    (b"# only comments\n\n", "no paths configured"),
    (b"etc/relative\n", "absolute path"),
    (b"/etc/../root\n", "'..'"),
    (b"/etc/./x\n", "'.'"),
])
def test_conf_errors(text: bytes, needle: str) -> None:
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: ") as ei:
        rm.parse_measure_conf(text, "conf")
    assert needle in str(ei.value)


# -- manifest -------------------------------------------------------------------------------------


def test_chutes_manifest_is_accepted_and_checked(image: Path, conf14: Path, tmp_path: Path) -> None:
    text = chutes_manifest(image, conf14)
    assert text.count(b"/etc/opa/policies/admission.rego ") == 3  # listed as often as reached
    manifest = rm.parse_manifest(text)
    assert manifest[b"/etc/opa/with space"] == sha(b"a name with a space")
    ok = rm.predict_entries(image, rm.read_measure_conf(str(conf14)), manifest=manifest)
    assert ok.rtmr3 == chutes_rtmr3(image, conf14, "1.4") and ok.unchecked == 0
    write(image, "/opt/sek8s/src/app/main.py", b"print('tampered')\n")
    with pytest.raises(RootfsMeasureError,
                       match=r"^RTMR3-MEASURE-FAILED: /opt/sek8s/src/app/main.py: SHA-384 .* does not match"):
        rm.predict_entries(image, rm.read_measure_conf(str(conf14)), manifest=manifest)


def test_only_named_files_are_compared(image: Path, conf14: Path) -> None:
    manifest = rm.parse_manifest(chutes_manifest(image, conf14))
    write(image, "/etc/opa/new-file", b"planted")  # not named: measured without a check, value changes
    del manifest[b"/etc/chutes/agent.conf"]
    manifest[b"/etc/opa/gone"] = sha(b"listed, not present")
    result = rm.predict_entries(image, rm.read_measure_conf(str(conf14)), manifest=manifest)
    assert (result.unchecked, result.not_measured) == (2, 1)
    assert result.rtmr3 == chutes_rtmr3(image, conf14, "1.4")


def test_manifest_line_forms() -> None:
    d1, d2 = sha(b"1"), sha(b"2")
    text = (b"# comment\n\n/etc/a b c " + d1.hex().encode() + b"\n"
            + b"  /etc/x " + d2.hex().upper().encode() + b" \r\n"
            + b"/etc/x " + d2.hex().encode() + b"\n")
    assert rm.parse_manifest(text) == {b"/etc/a b c": d1, b"/etc/x": d2}


@pytest.mark.parametrize("line,needle", [
    (b"/etc/x abc", "96 hex"),
    (b"/etc/x " + b"z" * 96, "96 hex"),
    (b"/etc/x" + b"a" * 96, "96 hex"),
    (b"a" * 96 + b"  /etc/x", "96 hex"),  # sha384sum order (hash first) is not Chutes' format
    (b"etc/x " + b"a" * 96, "absolute path"),
])
def test_manifest_malformed_lines(line: bytes, needle: str) -> None:
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: m:1: ") as ei:
        rm.parse_manifest(line + b"\n", "m")
    assert needle in str(ei.value)


def test_manifest_conflicting_duplicate_and_empty() -> None:
    a, b = b"/etc/x " + b"a" * 96 + b"\n", b"/etc/x " + b"b" * 96 + b"\n"
    with pytest.raises(RootfsMeasureError, match=r"/etc/x: m:2: listed twice with different hashes"):
        rm.parse_manifest(a + b, "m")
    with pytest.raises(RootfsMeasureError, match=r"^ROOTFS-MEASURE-FAILED: m: no entries"):
        rm.parse_manifest(b"\n# nothing\n", "m", scheme="next")


def test_written_manifest_equals_chutes_generator(image: Path, conf14: Path) -> None:
    result = rm.predict_entries(image, rm.read_measure_conf(str(conf14)))
    ours = rm.format_manifest(result)
    theirs = chutes_manifest(image, conf14)
    # same lines, as often (find's order within a directory is the file system's, so compare sorted)
    assert sorted(ours.splitlines()) == sorted(ln for ln in theirs.splitlines() if not ln.startswith(b"#"))


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_predict_schemes_list_json_and_manifest(image: Path, conf14: Path, tmp_path: Path,
                                                    capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    args = ["rtmr3", "predict", "--root", str(image), "--measure-conf", str(conf14)]
    for scheme in ("1.4", "next"):
        conf = conf14 if scheme == "1.4" else tmp_path / "next.conf"
        if scheme == "next":
            conf.write_bytes(CONF_14.replace(b"/etc/kube-link\n", b"").replace(b"/etc/resolv.conf\n", b""))
        base = ["rtmr3", "predict", "--root", str(image), "--measure-conf", str(conf), "--scheme", scheme]
        assert cli_main(base) == 0
        assert capsysbinary.readouterr().out.strip() == chutes_rtmr3(image, conf, scheme).hex().encode()
        assert cli_main([*base, "--list"]) == 0
        assert capsysbinary.readouterr().out == chutes_list(image, conf, scheme)

    mf = tmp_path / "manifest"
    mf.write_bytes(chutes_manifest(image, conf14))
    assert cli_main([*args, "--manifest", str(mf), "--json", "--write-manifest", str(tmp_path / "w")]) == 0
    out = json.loads(capsysbinary.readouterr().out)
    assert out["rtmr3"] == chutes_rtmr3(image, conf14, "1.4").hex() and out["scheme"] == "1.4"
    assert out["absent"] == ["/etc/default/rtmr3-verify", "/etc/resolv.conf", "/etc/ld.so.preload"]
    assert out["manifest_checked"]
    assert out["extensions"] == out["files"] == len(chutes_list(image, conf14, "1.4").splitlines())
    assert rm.parse_manifest((tmp_path / "w").read_bytes()) == rm.parse_manifest(mf.read_bytes())

    write(image, "/etc/chutes/agent.conf", b"changed")
    assert cli_main([*args, "--manifest", str(mf)]) == 3
    captured = capsysbinary.readouterr()
    assert captured.out == b"" and b"RTMR3-MEASURE-FAILED: /etc/chutes/agent.conf: SHA-384" in captured.err


def test_cli_default_list_per_scheme(image: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    write(image, "/etc/tee-measure.conf", b"/etc/chutes\n")
    write(image, "/etc/tdx-measure.conf", b"/opt/sek8s/src\n")
    assert cli_main(["rtmr3", "predict", "--root", str(image), "--scheme", "next", "--list"]) == 0
    assert capsysbinary.readouterr().out == sha(b"[agent]\n").hex().encode() + b" /etc/chutes/agent.conf\n"
    assert cli_main(["rtmr3", "predict", "--root", str(image), "--list"]) == 0
    assert capsysbinary.readouterr().out.count(b" /opt/sek8s/src/") == 2


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["rtmr3", "predict", "--root", str(tmp_path / "none"), "--paths", "/etc"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli_main(["rtmr3", "predict", "--root", str(tmp_path)]) == 3  # no etc/tdx-measure.conf in it
    assert "cannot read measured-path list" in capsys.readouterr().err
