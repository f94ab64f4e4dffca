"""Test and demo disks: LUKS2 images, tampered headers, config volumes, hotkeys. NEVER used at boot.

Everything is a regular file formatted by the real tools (``cryptsetup luksFormat``, ``mkfs.ext4 -d``),
so the boot flow sees exactly what it sees on a VM disk; the root flow opens it with
``cryptsetup open --test-passphrase`` here (no device-mapper) and for real in the VM tests.
``tamper_luks2_metadata`` rewrites the JSON area of both header copies with valid checksums, the way a
malicious host would (e.g. a ``cipher_null`` segment: dstack GHSA-jxq2-hpw3-m5wf).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from agent.boot.cryptsetup import Cryptsetup, CryptsetupError, Kdf
from agent.boot.names import ss58_encode
from agent.log import Secret

FAST_PBKDF_ITERATIONS = 1000
#: New keyslots in tests: as fast as the test images (production keeps cryptsetup's argon2id).
FAST_KDF = Kdf("pbkdf2", FAST_PBKDF_ITERATIONS)

DEFAULT_NETPLAN = """\
network:
  version: 2
  ethernets:
    enp0s2:
      dhcp4: false
      addresses: [10.20.30.40/24]
      routes:
        - to: default
          via: 10.20.30.1
      nameservers:
        addresses: [1.1.1.1, 8.8.8.8]
"""


def random_hotkey() -> str:
    """A well-formed SS58 address (prefix 42) for a random public key."""
    return ss58_encode(os.urandom(32))


def make_luks_image(path: str, passphrase: Secret, *, size_mb: int = 20, label: str = "",
                    cryptsetup: str = "cryptsetup", iterations: int = FAST_PBKDF_ITERATIONS,
                    first_boot_version: str | None = None) -> None:
    """A LUKS2 image (AES-XTS-512, fast PBKDF2 for tests); the passphrase goes in on stdin.

    ``first_boot_version`` (e.g. ``"1.4.0"``) also adds the first-boot token 15, as a 1.4.0 image build does.
    """
    with open(path, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    args = [cryptsetup, "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
            "--key-size", "512", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", str(iterations),
            "--key-file=-"]
    if label:
        args += ["--label", label]
    proc = subprocess.Popen([*args, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0)
    assert proc.stdin is not None
    proc.stdin.write(memoryview(passphrase.reveal()))  # raw pipe (bufsize=0): no copy kept
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"luksFormat {path}: {err.decode(errors='replace').strip()}")
    if first_boot_version is not None:
        add_first_boot_token(path, first_boot_version, cryptsetup=cryptsetup)


def first_boot_token_json(version: str) -> bytes:
    """Token 15 exactly as the sek8s image build writes it (luks_encrypt.yml)."""
    return json.dumps({"type": "chutes-first-boot", "keyslots": [], "version": version},
                      separators=(",", ":")).encode()


def add_first_boot_token(path: str, version: str = "1.4.0", *, cryptsetup: str = "cryptsetup") -> None:
    """``cryptsetup token import --token-id 15`` with the first-boot JSON on stdin."""
    proc = subprocess.run([cryptsetup, "token", "import", "--token-id", "15", path],
                          input=first_boot_token_json(version), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"token import {path}: {proc.stderr.decode(errors='replace').strip()}")


def _rewrite_header(buf: bytearray, off: int, hdr_size: int, meta_json: bytes) -> None:
    area = hdr_size - 4096
    if len(meta_json) >= area:
        raise ValueError("tampered metadata does not fit the JSON area")
    buf[off + 4096: off + hdr_size] = meta_json + bytes(area - len(meta_json))
    buf[off + 448: off + 512] = bytes(64)
    digest = hashlib.sha256(bytes(buf[off: off + hdr_size])).digest()
    buf[off + 448: off + 448 + 32] = digest


def tamper_luks2_metadata(path: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``mutate`` to the JSON metadata of both LUKS2 header copies, fixing their checksums."""
    with open(path, "r+b") as fh:
        head = bytearray(fh.read(2 * 4 * 1024 * 1024))
        (hdr_size,) = struct.unpack_from(">Q", head, 8)
        raw = bytes(head[4096:hdr_size]).split(b"\0", 1)[0]
        meta = json.loads(raw)
        mutate(meta)
        new = json.dumps(meta, separators=(",", ":")).encode()
        for off in (0, hdr_size):
            _rewrite_header(head, off, hdr_size, new)
        fh.seek(0)
        fh.write(head[: 2 * hdr_size])


def null_cipher_segment(meta: dict[str, Any]) -> None:
    """The GHSA-jxq2-hpw3-m5wf attack: data segment "encrypted" with cipher_null."""
    meta["segments"]["0"]["encryption"] = "cipher_null-ecb"


def null_cipher_keyslot(meta: dict[str, Any]) -> None:
    for ks in meta["keyslots"].values():
        ks["area"]["encryption"] = "cipher_null-ecb"


def make_ext4_image(path: str, files: dict[str, str], *, label: str, size_mb: int = 8) -> None:
    """An ext4 image labelled ``label`` holding ``files`` (built with ``mkfs.ext4 -d``: no mount needed)."""
    with tempfile.TemporaryDirectory(prefix="cfgvol-") as src:
        for name, text in files.items():
            with open(os.path.join(src, name), "w") as fh:
                fh.write(text)
        with open(path, "wb") as fh:
            fh.truncate(size_mb * 1024 * 1024)
        proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", src, path],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"mkfs.ext4 {path}: {proc.stderr.strip()}")


def make_config_volume(path: str, *, hostname: str, hotkey: str, network_yaml: str | None = DEFAULT_NETPLAN,
                       label: str = "tdx-config") -> None:
    """The host's config volume as its tooling writes it: hostname, miner-ss58, network-config.yaml."""
    files = {"hostname": hostname + "\n", "miner-ss58": hotkey + "\n"}
    if network_yaml is not None:
        files["network-config.yaml"] = network_yaml
    make_ext4_image(path, files, label=label)


_T = TypeVar("_T")


class FaultyCryptsetup(Cryptsetup):
    """The real wrapper with one injected failure, to prove every failure point leaves an openable disk.

    ``fail`` names a method (``keyslots``, ``add_key``, ``kill_slot``, ``remove_key``, ``token_remove``,
    ``format_luks2``); its ``nth`` call (1-based) raises :class:`CryptsetupError` — before running
    cryptsetup (``after=False``: nothing changed) or after it succeeded (``after=True``: the change
    happened but the caller sees a failure, like a timeout after the header write).
    """

    FAULTABLE = ("keyslots", "add_key", "kill_slot", "remove_key", "token_remove", "format_luks2")

    def __init__(self, fail: str | None = None, *, nth: int = 1, after: bool = False, binary: str = "cryptsetup"):
        super().__init__(binary)
        if fail is not None and fail not in self.FAULTABLE:
            raise ValueError(f"cannot inject into {fail!r}")
        self.fail, self.nth, self.after = fail, nth, after
        self.calls: dict[str, int] = {}
        self.injected = False

    def _step(self, name: str, run: Callable[[], _T]) -> _T:
        self.calls[name] = self.calls.get(name, 0) + 1
        hit = name == self.fail and self.calls[name] == self.nth
        if hit and not self.after:
            self.injected = True
            raise CryptsetupError(name, 1, "injected failure (before)")
        out = run()
        if hit:
            self.injected = True
            raise CryptsetupError(name, 1, "injected failure (after the change)")
        return out

    def keyslots(self, device: str) -> list[int]:
        return self._step("keyslots", lambda: super(FaultyCryptsetup, self).keyslots(device))

    def add_key(self, device: str, current: Secret, new: Secret, *, kdf: Kdf | None = None) -> None:
        self._step("add_key", lambda: super(FaultyCryptsetup, self).add_key(device, current, new, kdf=kdf))

    def kill_slot(self, device: str, slot: int, auth: Secret) -> None:
        self._step("kill_slot", lambda: super(FaultyCryptsetup, self).kill_slot(device, slot, auth))

    def remove_key(self, device: str, key: Secret) -> None:
        self._step("remove_key", lambda: super(FaultyCryptsetup, self).remove_key(device, key))

    def token_remove(self, device: str, token_id: int = 15) -> None:
        self._step("token_remove", lambda: super(FaultyCryptsetup, self).token_remove(device, token_id))

    def format_luks2(self, device: str, key: Secret, *, label: str, kdf: Kdf | None = None) -> None:
        self._step("format_luks2", lambda: super(FaultyCryptsetup, self).format_luks2(device, key, label=label,
                                                                                       kdf=kdf))
