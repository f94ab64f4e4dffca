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
from agent.evidence import mr_register
from agent.evidence import rootfs_measure as rm
from agent.evidence.file_hashing import CHUNK
from agent.evidence.mr_register import MeasurementRegister
from agent.evidence.rootfs_measure import RootfsMeasureError

pytestmark = pytest.mark.integration


def write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str, str]:
    """A root tree, its measured-path list (with an absent path and an overlap) and a Chutes-style manifest."""
    root = tmp_path / "newroot"
    for i in range(40):
        write(root, f"/opt/sek8s/src/m{i:02d}.py", f"module {i}\n".encode() * (i + 1))
    write(root, "/etc/opa/policies/admission.rego", b"package admission\ndefault allow = false\n")
    write(root, "/etc/opa/policies-extra", b"sorts between 'policies' and 'policies/'")
    write(root, "/usr/local/bin/tool", os.urandom(CHUNK * 2 + 5))
    os.symlink("/etc/opa", root / "etc" / "opa-link")  # inside a measured directory: not measured
    conf = tmp_path / "tdx-measure.conf"
    conf.write_text("# measured\n/etc/opa\n/opt/sek8s/src\n/usr/local/bin # tools\n/etc/opa/policies\n"
                    "/etc/default/rtmr3-verify\n")
    manifest = tmp_path / "tdx-rtmr3-expected-hashes"
    lines = [f"{rel} {hashlib.sha384((root / rel.lstrip('/')).read_bytes()).hexdigest()}"
             for rel in ORDER_14]  # path first (§12.3), written here, not by the agent
    manifest.write_text("# expected\n" + "\n".join(lines) + "\n")
    return root, str(conf), str(manifest)


#: 1.4 order: byte-wise, the rego reached through /etc/opa and /etc/opa/policies twice.
ORDER_14 = ["/etc/opa/policies-extra", "/etc/opa/policies/admission.rego", "/etc/opa/policies/admission.rego",
            *[f"/opt/sek8s/src/m{i:02d}.py" for i in range(40)], "/usr/local/bin/tool"]


def digest(root: Path, rel: str) -> bytes:
    return hashlib.sha384((root / rel.lstrip("/")).read_bytes()).digest()


def independent_chain(root: Path, rels: list[str]) -> bytes:
    value = bytes(48)
    for rel in rels:
        value = hashlib.sha384(value + digest(root, rel)).digest()
    return value


def register(mnt: str) -> MeasurementRegister:
    return MeasurementRegister(os.path.join(mnt, "rtmr3:sha384"))


def test_boot_14_equals_predict(image, measurements, capsys) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    capsys.readouterr()
    assert cli_main(["rtmr3", "predict", "--root", str(root), "--measure-conf", conf, "--scheme", "1.4"]) == 0
    predicted = bytes.fromhex(capsys.readouterr().out.strip())

    result = rm.measure_rootfs(str(root), conf, manifest, register(mnt), scheme="1.4")

    assert state.rtmr(3) == result.rtmr3 == predicted == independent_chain(root, ORDER_14)
    assert state.extends == result.files == 44  # one extension per file, the duplicate too
    assert [state.rtmr(i) for i in range(3)] == [bytes(48)] * 3
    assert result.absent == [b"/etc/default/rtmr3-verify"]


def test_boot_next_is_one_extension_over_the_list_text(image, measurements, capsys) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    unique = sorted(set(ORDER_14))
    text = "".join(f"{digest(root, rel).hex()} {rel}\n" for rel in unique).encode()
    capsys.readouterr()
    assert cli_main(["rtmr3", "predict", "--root", str(root), "--measure-conf", conf, "--scheme", "next"]) == 0
    predicted = bytes.fromhex(capsys.readouterr().out.strip())

    result = rm.measure_rootfs(str(root), conf, manifest, register(mnt), scheme="next")

    want = hashlib.sha384(bytes(48) + hashlib.sha384(text).digest()).digest()
    assert state.rtmr(3) == result.rtmr3 == predicted == want
    assert state.extends == 1 and result.files == 43


def test_tampered_file_fails_closed_before_any_extension(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    write(root, "/opt/sek8s/src/m39.py", b"import os; os.system('curl evil')\n")
    with pytest.raises(RootfsMeasureError, match=r"^RTMR3-MEASURE-FAILED: /opt/sek8s/src/m39.py: SHA-384"):
        rm.measure_rootfs(str(root), conf, manifest, register(mnt))
    with pytest.raises(RootfsMeasureError, match=r"^ROOTFS-MEASURE-FAILED: /opt/sek8s/src/m39.py: SHA-384"):
        rm.measure_rootfs(str(root), conf, manifest, register(mnt), scheme="next")
    assert state.extends == 0 and state.rtmr(3) == bytes(48)  # nothing extended, not even m00..m38


def test_planted_file_and_reappearing_path_change_the_value(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    registered = independent_chain(root, ORDER_14)
    write(root, "/etc/opa/policies/allow-all.rego", b"package admission\ndefault allow = true\n")
    write(root, "/etc/default/rtmr3-verify", b"SKIP=1\n")
    result = rm.measure_rootfs(str(root), conf, manifest, register(mnt))  # not named: measured unchecked
    assert result.unchecked == 3 and state.rtmr(3) == result.rtmr3 != registered


def test_already_extended_register_is_refused(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    state.extend(3, hashlib.sha384(b"someone else").digest())
    with pytest.raises(RootfsMeasureError, match="already extended"):
        rm.measure_rootfs(str(root), conf, manifest, register(mnt))
    assert state.extends == 1


def test_failed_register_write_fails_closed(image, measurements) -> None:
    root, conf, manifest = image
    mnt, state = measurements
    state.fail_writes(1)
    with pytest.raises(RootfsMeasureError, match=r"extending .* failed at digest 1: Input/output error"):
        rm.measure_rootfs(str(root), conf, manifest, register(mnt))


def test_read_back_mismatch_fails_closed(image, measurements, monkeypatch) -> None:
    root, conf, manifest = image
    mnt, _ = measurements
    real = os.pwrite
    calls = []

    def skip_one(fd: int, data: bytes, offset: int) -> int:  # a write that "succeeds" but is lost
        calls.append(1)
        return len(data) if len(calls) == 5 else real(fd, data, offset)

    monkeypatch.setattr(mr_register.os, "pwrite", skip_one)
    with pytest.raises(RootfsMeasureError, match="after the measurement, expected"):
        rm.measure_rootfs(str(root), conf, manifest, register(mnt))
