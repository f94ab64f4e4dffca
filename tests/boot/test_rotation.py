"""1.4.0 root rotation and the first-boot token on real LUKS2 images: every failure point leaves a
disk that the old key, the new key or both open — never neither — and no key reaches argv or a file."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.boot import cryptsetup as cs_mod
from agent.boot.confirm import ConfirmAnswer
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.rotation import RotationError, clear_first_boot, is_first_boot, rotate_root
from agent.log import Secret
from agent.sim.luks_image import FAST_KDF, FaultyCryptsetup, first_boot_token_json, make_luks_image

pytestmark = pytest.mark.integration

OLD = "old-build-passphrase-0123456789"
NEW = "a" * 64 + "b" * 64  # root_next is 128 hex


def opens(dev: str, key: str) -> bool:
    return Cryptsetup().test_key(dev, Secret(key))


def disk_keys(dev: str) -> set[str]:
    return {name for name, k in (("old", OLD), ("new", NEW)) if opens(dev, k)}


@pytest.fixture
def root(tmp_path: Path) -> str:
    path = str(tmp_path / "root.img")
    make_luks_image(path, Secret(OLD), label="root", first_boot_version="1.4.0")
    return path


#: The validator's confirmation (True) and a refusal it states (False), as agent.boot.confirm reads them.
PROMOTED = ConfirmAnswer(results={"root": "promoted"})
REFUSED = ConfirmAnswer(refused=True, detail="POST /servers/{vm}/provision/confirm: HTTP 401 (Invalid nonce)")


def confirm_with(result: bool | Exception | ConfirmAnswer, seen: list[str] | None = None) -> Any:
    async def confirm() -> ConfirmAnswer:
        if seen is not None:
            seen.append("confirm")
        if isinstance(result, Exception):
            raise result
        if isinstance(result, ConfirmAnswer):
            return result
        return PROMOTED if result else REFUSED
    return confirm


# -- first-boot token ---------------------------------------------------------------------------

def test_first_boot_token_is_detected_then_removed(root: str) -> None:
    cs = Cryptsetup()
    out = subprocess.run(["cryptsetup", "token", "export", "--token-id", "15", root], capture_output=True, check=True)
    expected = b'{"type":"chutes-first-boot","keyslots":[],"version":"1.4.0"}'
    assert out.stdout == first_boot_token_json("1.4.0") == expected
    assert is_first_boot(cs, root) is True
    assert clear_first_boot(cs, root) is True
    assert is_first_boot(cs, root) is False
    assert "15" not in cs.dump_json(root)["tokens"]
    assert opens(root, OLD)  # removing the token leaves the keyslots alone


def test_token_removal_errors_are_ignored(root: str, tmp_path: Path) -> None:
    cs = Cryptsetup()
    assert clear_first_boot(cs, root) is True
    assert clear_first_boot(cs, root) is False  # already gone: cryptsetup fails, boot carries on
    assert clear_first_boot(FaultyCryptsetup("token_remove"), str(tmp_path / "missing.img")) is False


def test_first_boot_false_without_token(tmp_path: Path) -> None:
    path = str(tmp_path / "r.img")
    make_luks_image(path, Secret(OLD))
    assert is_first_boot(Cryptsetup(), path) is False


@pytest.mark.parametrize("content", ["missing", "raw"])
def test_first_boot_check_errors_raise(tmp_path: Path, content: str) -> None:
    """A wrong first_boot=true would make the validator drop the stored key: errors never read as a bool."""
    path = tmp_path / "x.img"
    if content == "raw":
        path.write_bytes(bytes(1 << 20))
    with pytest.raises(CryptsetupError):
        is_first_boot(Cryptsetup(), str(path))


# -- the rotation itself --------------------------------------------------------------------------

async def test_rotation_confirmed_kills_every_old_slot(root: str) -> None:
    cs = Cryptsetup()
    assert cs.keyslots(root) == [0]
    seen: list[str] = []
    out = await rotate_root(cs, root, Secret(OLD), Secret(NEW), confirm_with(True, seen), kdf=FAST_KDF)
    assert seen == ["confirm"]
    assert (out.old_slots, out.confirmed, out.active_key, out.killed) == ([0], True, "new", [0])
    assert cs.keyslots(root) == [1]
    assert disk_keys(root) == {"new"}


async def test_rotation_kills_stale_slots_too(root: str) -> None:
    """Slots left by an earlier interrupted rotation are killed by number, whatever key they hold."""
    cs = Cryptsetup()
    cs.add_key(root, Secret(OLD), Secret("stale-leftover"), kdf=FAST_KDF)
    assert cs.keyslots(root) == [0, 1]
    out = await rotate_root(cs, root, Secret(OLD), Secret(NEW), confirm_with(True), kdf=FAST_KDF)
    assert out.killed == [0, 1]
    assert cs.keyslots(root) == [2]
    assert disk_keys(root) == {"new"} and not opens(root, "stale-leftover")


async def test_confirm_refused_continue_keeps_old_key(root: str) -> None:
    cs = Cryptsetup()
    out = await rotate_root(cs, root, Secret(OLD), Secret(NEW), confirm_with(False), on_confirm_failure="continue",
                            kdf=FAST_KDF)
    assert (out.confirmed, out.active_key, out.killed) == (False, "old", [])
    assert cs.keyslots(root) == [0]
    assert disk_keys(root) == {"old"}


async def test_confirm_refused_default_powers_off_on_old_key(root: str) -> None:
    """Default boot.root_confirm_failure = poweroff (the changelog; fail closed where code and it disagree)."""
    with pytest.raises(RotationError) as ei:
        await rotate_root(Cryptsetup(), root, Secret(OLD), Secret(NEW), confirm_with(False), kdf=FAST_KDF)
    assert ei.value.step == "confirm" and ei.value.keys == "old"
    assert disk_keys(root) == {"old"}


async def test_bad_setting_is_refused(root: str) -> None:
    with pytest.raises(ValueError, match="on_confirm_failure"):
        await rotate_root(Cryptsetup(), root, Secret(OLD), Secret(NEW), confirm_with(True), on_confirm_failure="x")


async def test_wrong_current_key_fails_closed_on_old(root: str) -> None:
    with pytest.raises(RotationError) as ei:
        await rotate_root(Cryptsetup(), root, Secret("not-the-key"), Secret(NEW), confirm_with(True), kdf=FAST_KDF)
    assert ei.value.step == "add_key"
    assert disk_keys(root) == {"old"}


async def test_no_keyslots_fails_closed(root: str) -> None:
    class NoSlots(Cryptsetup):
        def keyslots(self, device: str) -> list[int]:
            return []

    confirms: list[str] = []
    with pytest.raises(RotationError, match="no keyslots") as ei:
        await rotate_root(NoSlots(), root, Secret(OLD), Secret(NEW), confirm_with(True, confirms), kdf=FAST_KDF)
    assert ei.value.step == "keyslots" and confirms == []
    assert disk_keys(root) == {"old"}


# Every cryptsetup step and the confirm outcome, failing before or after its change:
# (fault, nth call, after, confirm result, on_confirm_failure, expected step or None, keys that open)
FAULTS = [
    ("keyslots", 1, False, True, "poweroff", "keyslots", {"old"}),
    ("add_key", 1, False, True, "poweroff", "add_key", {"old"}),
    ("add_key", 1, True, True, "poweroff", "add_key", {"old", "new"}),
    (None, 0, False, TimeoutError("no answer"), "poweroff", "confirm", {"old", "new"}),
    (None, 0, False, ConnectionResetError("reset"), "continue", "confirm", {"old", "new"}),
    ("kill_slot", 1, False, True, "poweroff", "kill_slot", {"old", "new"}),
    ("kill_slot", 1, True, True, "poweroff", "kill_slot", {"new"}),  # the kill happened, then "failed"
    ("kill_slot", 2, False, True, "poweroff", "kill_slot", {"old", "new"}),  # two old slots: 2nd fails
    ("kill_slot", 2, True, True, "poweroff", "kill_slot", {"new"}),
    ("remove_key", 1, False, False, "continue", "remove_key", {"old", "new"}),
    ("remove_key", 1, True, False, "continue", "remove_key", {"old"}),
    ("remove_key", 1, False, False, "poweroff", "remove_key", {"old", "new"}),
    (None, 0, False, False, "continue", None, {"old"}),
    (None, 0, False, False, "poweroff", "confirm", {"old"}),
    (None, 0, False, True, "poweroff", None, {"new"}),
    # issue 18 item 9: answers that prove neither a promotion nor a refusal keep both keys, whatever the policy
    (None, 0, False, ConfirmAnswer(), "continue", "confirm", {"old", "new"}),
    (None, 0, False, ConfirmAnswer(results={"root": "discarded"}), "continue", "confirm", {"old", "new"}),
    (None, 0, False, ConfirmAnswer(results={"root": "no_pending"}), "poweroff", "confirm", {"old", "new"}),
    (None, 0, False, ConfirmAnswer(results={"storage": "promoted"}), "continue", "confirm", {"old", "new"}),
]


@pytest.mark.parametrize(("fault", "nth", "after", "confirmed", "policy", "step", "keys"), FAULTS)
async def test_every_failure_point_leaves_an_openable_disk(
    tmp_path: Path, fault: str | None, nth: int, after: bool, confirmed: bool | Exception | ConfirmAnswer, policy: str,
    step: str | None, keys: set[str],
) -> None:
    dev = str(tmp_path / "root.img")
    make_luks_image(dev, Secret(OLD), label="root")
    two_old = fault == "kill_slot" and nth == 2
    if two_old:  # a stale slot from an earlier run that also holds the old key
        Cryptsetup().add_key(dev, Secret(OLD), Secret(OLD), kdf=FAST_KDF)
    cs = FaultyCryptsetup(fault, nth=nth, after=after)
    try:
        await rotate_root(cs, dev, Secret(OLD), Secret(NEW), confirm_with(confirmed), on_confirm_failure=policy,
                          kdf=FAST_KDF)
        got = None
    except RotationError as exc:
        got = exc.step
    assert cs.injected == (fault is not None)
    assert got == step
    now = disk_keys(dev)
    assert now, "half-rotated disk: neither the old nor the new key opens it"
    assert now == keys


# -- secrets: never argv, env or a named file -------------------------------------------------------

class ProcWatch:
    """Reads every process's argv and environment while it runs."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        me = str(os.getpid())
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        self.blobs.append(Path(f"/proc/{pid}/{what}").read_bytes())
                    except OSError:
                        pass
            time.sleep(0.002)

    def __enter__(self) -> ProcWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@pytest.fixture
def popen_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every Popen the wrapper makes: argv, env, and what each passed fd really is."""
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def spy(argv: list[str], **kw: Any) -> Any:
        fds = kw.get("pass_fds", ())
        calls.append({"argv": list(argv), "env": kw.get("env"), "stdin": kw.get("stdin"),
                      "fds": {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds},
                      "sizes": {fd: os.fstat(fd).st_size for fd in fds}})
        return real(argv, **kw)

    monkeypatch.setattr(cs_mod.subprocess, "Popen", spy)
    yield calls


def _listing(dirs: list[Path]) -> set[str]:
    out: set[str] = set()
    for d in dirs:
        for dirpath, _dirs, files in os.walk(d):
            out.update(os.path.join(dirpath, f) for f in files)
    return out


async def test_keys_never_in_argv_env_or_named_files(root: str, tmp_path: Path,
                                                     popen_log: list[dict[str, Any]]) -> None:
    watched = [Path("/tmp"), Path("/dev/shm"), Path("/run"), tmp_path]
    before = _listing(watched)
    fds_before = set(os.listdir("/proc/self/fd"))
    with ProcWatch() as watch:
        await rotate_root(Cryptsetup(), root, Secret(OLD), Secret(NEW), confirm_with(True), kdf=FAST_KDF)
        # the refused-confirm path uses luksRemoveKey: cover it as well
        await rotate_root(Cryptsetup(), root, Secret(NEW), Secret(OLD), confirm_with(False),
                          on_confirm_failure="continue", kdf=FAST_KDF)
    ops = [c["argv"][1] for c in popen_log]
    assert ops == ["luksDump", "luksAddKey", "luksKillSlot", "luksDump", "luksAddKey", "luksDump", "luksRemoveKey"]
    for call in popen_log:
        joined = "\0".join(call["argv"]).encode()
        assert OLD.encode() not in joined and NEW.encode() not in joined
        assert call["env"] is None  # the environment is inherited untouched: no key put there
        for fd, target in call["fds"].items():
            assert target.startswith("/memfd:luks-key"), target  # anonymous memory, not a path on disk
            assert f"/proc/self/fd/{fd}" in " ".join(call["argv"])
    add = popen_log[1]
    assert sorted(add["sizes"].values()) == sorted([len(OLD), len(NEW)])  # both keys, exact bytes
    assert add["argv"][-1].startswith("/proc/self/fd/") and add["argv"][-3].startswith("--key-file=/proc/self/fd/")
    assert watch.blobs, "the /proc watcher saw nothing"
    for blob in watch.blobs:
        assert OLD.encode() not in blob and NEW.encode() not in blob
    # Other processes share /tmp and /run: no file created meanwhile may hold a key (ours create none).
    for path in _listing(watched) - before:
        try:
            data = Path(path).read_bytes()[: 1 << 24]
        except OSError:
            continue
        assert OLD.encode() not in data and NEW.encode() not in data, f"key found in {path}"
    assert set(os.listdir("/proc/self/fd")) == fds_before  # every memfd closed


def test_memfd_is_zeroed_before_close() -> None:
    key = Secret("zero-me-please")
    with cs_mod.key_fds([key]) as fds:
        fd = os.dup(fds[0])  # keep the memory object alive past the wrapper's close
    try:
        assert os.fstat(fd).st_size == 0
        assert os.pread(fd, 64, 0) == b""
    finally:
        os.close(fd)
    assert bytes(key.reveal()) == b"zero-me-please"  # the caller's Secret is the caller's to wipe


def test_remove_key_refuses_the_last_slot(tmp_path: Path) -> None:
    """cryptsetup --batch-mode would wipe the last keyslot; the wrapper refuses first."""
    dev = str(tmp_path / "r.img")
    make_luks_image(dev, Secret(OLD))
    with pytest.raises(CryptsetupError, match="removing would leave no key"):
        Cryptsetup().remove_key(dev, Secret(OLD))
    assert opens(dev, OLD)


def test_kill_slot_cannot_kill_the_slot_of_its_own_key(tmp_path: Path) -> None:
    """cryptsetup excludes the slot being killed when checking the authorising key."""
    dev = str(tmp_path / "r.img")
    make_luks_image(dev, Secret(OLD))
    cs = Cryptsetup()
    cs.add_key(dev, Secret(OLD), Secret(NEW), kdf=FAST_KDF)
    with pytest.raises(CryptsetupError) as ei:
        cs.kill_slot(dev, 1, Secret(NEW))
    assert ei.value.wrong_key
    assert cs.keyslots(dev) == [0, 1]
