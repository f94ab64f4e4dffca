"""The ``cryptsetup`` calls of the boot flow; no key ever reaches argv, the environment or a named file.

A passphrase arrives as a :class:`agent.log.Secret`. A single key goes in on the child's stdin pipe
(``--key-file=-``: the exact bytes, no newline handling). Calls that need two keys (``luksAddKey``:
the current one authorises, the new one is added) or a key alongside other input get each key in an
anonymous in-memory file (``memfd_create``) handed to the child with ``pass_fds`` and named on the
command line only as ``/proc/self/fd/N`` (``/proc`` exists in every initramfs, ``/dev/fd`` does not):
the argv shows a descriptor number, never key bytes, and nothing touches a filesystem. The memfd is
overwritten with zeros and truncated before it is closed. Hardware/tool access only; the header
policy lives in :mod:`agent.boot.luks_header`, the rotation order in :mod:`agent.boot.rotation`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError
from agent.log import Secret

TIMEOUT_S = 300.0
#: cryptsetup's exit code for "No key available with this passphrase".
EXIT_WRONG_KEY = 2
#: LUKS2 token slot marking a never-booted image (sek8s builds it with ``token import --token-id 15``).
FIRST_BOOT_TOKEN = 15


class CryptsetupError(AgentError):
    def __init__(self, op: str, returncode: int, stderr: str) -> None:
        msg = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        super().__init__(f"cryptsetup {op}: {msg}")
        self.op = op
        self.returncode = returncode
        self.wrong_key = returncode == EXIT_WRONG_KEY


@dataclass(frozen=True)
class Kdf:
    """PBKDF for new keyslots (format, add-key). ``iterations`` 0 = let cryptsetup benchmark.

    Tests and images for tests use ``Kdf("pbkdf2", 1000)``; production keeps cryptsetup's argon2id.
    """

    pbkdf: str = "argon2id"
    iterations: int = 0

    def args(self) -> list[str]:
        out = ["--pbkdf", self.pbkdf]
        if self.iterations > 0:
            out += ["--pbkdf-force-iterations", str(self.iterations)]
        return out


@contextlib.contextmanager
def key_fds(keys: Sequence[Secret]) -> Iterator[list[int]]:
    """One anonymous in-memory file per key, positioned at 0; zeroed, truncated and closed on exit."""
    fds: list[int] = []
    try:
        for key in keys:
            fd = os.memfd_create("luks-key", os.MFD_CLOEXEC)
            fds.append(fd)
            view = memoryview(key.reveal())
            try:
                while view:
                    view = view[os.write(fd, view):]
            finally:
                view.release()
            os.lseek(fd, 0, os.SEEK_SET)
        yield fds
    finally:
        for fd, key in zip(fds, keys, strict=False):
            with contextlib.suppress(OSError):
                os.pwrite(fd, bytes(len(key)), 0)
                os.ftruncate(fd, 0)
            os.close(fd)


def fd_path(fd: int) -> str:
    """How the child names an inherited descriptor (the number is the same in the child)."""
    return f"/proc/self/fd/{fd}"


@dataclass(frozen=True)
class KeyArg:
    """An argv entry naming the memfd of key number ``index``: ``prefix`` + ``/proc/self/fd/N``."""

    index: int
    prefix: str = ""

    def render(self, fds: Sequence[int]) -> str:
        return self.prefix + fd_path(fds[self.index])


class Cryptsetup:
    """Thin runner around the ``cryptsetup`` binary (path configurable: ``boot.cryptsetup``)."""

    def __init__(self, binary: str = "cryptsetup") -> None:
        self.binary = binary
        #: Wall time spent inside cryptsetup processes (KDF, I/O), for the agent-overhead figure.
        self.elapsed_s = 0.0

    def _run(self, op: str, args: Sequence[str | KeyArg], secret: Secret | None = None,
             keys: Sequence[Secret] = ()) -> str:
        """Run ``cryptsetup args``; ``secret`` goes to stdin, each of ``keys`` to a memfd that the
        :class:`KeyArg` entries of ``args`` name."""
        t0 = time.monotonic()
        try:
            with key_fds(keys) as fds:
                argv = [a.render(fds) if isinstance(a, KeyArg) else a for a in args]
                return self._run_timed(op, argv, secret, tuple(fds))
        finally:
            self.elapsed_s += time.monotonic() - t0

    def _run_timed(self, op: str, args: list[str], secret: Secret | None, pass_fds: tuple[int, ...]) -> str:
        argv = [self.binary, *args]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if secret is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, close_fds=True, pass_fds=pass_fds,
        )
        try:
            if secret is not None:
                assert proc.stdin is not None
                view = memoryview(secret.reveal())
                try:
                    while view:
                        view = view[proc.stdin.write(view) or 0:]
                except BrokenPipeError:
                    pass
                finally:
                    view.release()
            out, err = proc.communicate(timeout=TIMEOUT_S)  # closes stdin: EOF ends the key
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise CryptsetupError(op, -1, f"timed out after {TIMEOUT_S:g}s") from None
        if proc.returncode != 0:
            raise CryptsetupError(op, proc.returncode, err.decode("utf-8", "replace"))
        return out.decode("utf-8", "replace")

    # -- inspection -------------------------------------------------------------------------------

    def is_luks(self, device: str) -> bool:
        """True for a LUKS device, False only when cryptsetup says "not LUKS" (exit 1).

        Any other failure (device missing, I/O or permission error) raises: treating it as "not LUKS"
        would send a boot down the first-boot path and re-key (wipe) an existing volume.
        """
        try:
            self._run("isLuks", ["isLuks", device])
        except CryptsetupError as exc:
            if exc.returncode == 1:
                return False
            raise
        return True

    def header_backup(self, device: str, out_path: str) -> None:
        self._run("luksHeaderBackup", ["luksHeaderBackup", device, "--header-backup-file", out_path])

    def dump_json(self, path: str) -> dict[str, Any]:
        out = self._run("luksDump", ["luksDump", "--dump-json-metadata", path])
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise CryptsetupError("luksDump", 0, f"metadata is not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise CryptsetupError("luksDump", 0, "metadata is not a JSON object")
        return data

    def keyslots(self, device: str) -> list[int]:
        """Every keyslot number in use, ascending (``luksDump --dump-json-metadata``)."""
        slots = self.dump_json(device).get("keyslots")
        if not isinstance(slots, dict):
            raise CryptsetupError("luksDump", 0, "metadata has no keyslots object")
        try:
            return sorted(int(k) for k in slots)
        except ValueError:
            raise CryptsetupError("luksDump", 0, "a keyslot id is not a number") from None

    def label(self, device: str) -> str:
        """The LUKS2 header label ('' when none): the ``Label:`` line of the text ``luksDump`` (the label
        lives in the binary header, not in the JSON metadata)."""
        for line in self._run("luksDump", ["luksDump", device]).splitlines():
            if line.startswith("Label:"):
                value = line.split(":", 1)[1].strip()
                return "" if value == "(no label)" else value
        return ""

    def token_exists(self, device: str, token_id: int = FIRST_BOOT_TOKEN) -> bool:
        """Whether LUKS2 token ``token_id`` exists (``token export``, as the sek8s images test it).

        ``token export`` exits 1 both for "no such token" and for other errors, so a non-zero exit is
        settled from the JSON metadata: absent there → False; anything unsettled raises, because a
        wrong ``first_boot=true`` makes the validator drop the stored root key.
        """
        try:
            self._run("token export", ["token", "export", "--token-id", str(token_id), device])
            return True
        except CryptsetupError as exc:
            tokens = self.dump_json(device).get("tokens", {})
            if not isinstance(tokens, dict):
                raise CryptsetupError("luksDump", 0, "metadata tokens is not an object") from None
            if str(token_id) in tokens:
                raise exc from None
            return False

    # -- unlocking --------------------------------------------------------------------------------

    def open(self, device: str, name: str, passphrase: Secret, *, header: str | None = None,
             test_only: bool = False) -> None:
        """``cryptsetup open`` (or ``--test-passphrase``: check the key, map nothing)."""
        args = ["open", "--type", "luks2", "--key-file=-"]
        if header:
            args += ["--header", header]
        if test_only:
            args += ["--test-passphrase", device]
        else:
            args += [device, name]
        self._run("open --test-passphrase" if test_only else "open", args, passphrase)

    def test_key(self, device: str, key: Secret) -> bool:
        """True if ``key`` opens some keyslot of ``device``; False on "no key available"; else raises."""
        try:
            self.open(device, "", key, test_only=True)
        except CryptsetupError as exc:
            if exc.wrong_key:
                return False
            raise
        return True

    # -- changing keyslots and tokens ---------------------------------------------------------------

    def add_key(self, device: str, current: Secret, new: Secret, *, kdf: Kdf | None = None) -> None:
        """``luksAddKey``: a new keyslot for ``new``, authorised by ``current`` (both via memfds)."""
        args: list[str | KeyArg] = ["luksAddKey", "--batch-mode", *(kdf or Kdf()).args(), KeyArg(0, "--key-file="),
                                    device, KeyArg(1)]
        self._run("luksAddKey", args, keys=(current, new))

    def kill_slot(self, device: str, slot: int, auth: Secret) -> None:
        """``luksKillSlot``: wipe keyslot ``slot``; ``auth`` must open a *different* slot (cryptsetup
        excludes the slot being killed), so this can never remove the last working key."""
        if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
            raise ValueError(f"keyslot must be a non-negative int, got {slot!r}")
        self._run("luksKillSlot", ["luksKillSlot", "--batch-mode", KeyArg(0, "--key-file="), device, str(slot)],
                  keys=(auth,))

    def remove_key(self, device: str, key: Secret) -> None:
        """``luksRemoveKey``: wipe the keyslot ``key`` opens.

        In batch mode cryptsetup would also wipe the LAST keyslot, leaving a disk no key opens; this
        refuses that case first (fewer than two keyslots).
        """
        slots = self.keyslots(device)
        if len(slots) < 2:
            raise CryptsetupError("luksRemoveKey", -1,
                                  f"refused: only keyslot(s) {slots} left, removing would leave no key")
        self._run("luksRemoveKey", ["luksRemoveKey", "--batch-mode", KeyArg(0, "--key-file="), device], keys=(key,))

    def token_remove(self, device: str, token_id: int = FIRST_BOOT_TOKEN) -> None:
        self._run("token remove", ["token", "remove", "--token-id", str(token_id), device])

    # -- formatting -------------------------------------------------------------------------------

    def format_luks2(self, device: str, key: Secret, *, label: str, kdf: Kdf | None = None) -> None:
        """A new LUKS2 volume with AES-XTS-512 (passes the header policy by construction)."""
        args = ["luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
                "--key-size", "512", "--label", label, *(kdf or Kdf()).args(), "--key-file=-", device]
        self._run("luksFormat", args, key)

    def luks_format(self, device: str, passphrase: Secret, *, label: str, pbkdf: str = "argon2id",
                    iterations: int = 0) -> None:
        """Older spelling of :meth:`format_luks2` (≤1.2 cache volume code)."""
        self.format_luks2(device, passphrase, label=label, kdf=Kdf(pbkdf, iterations))

    def erase(self, device: str) -> None:
        """``cryptsetup erase``: wipe every keyslot of a LUKS device (the data becomes unrecoverable)."""
        self._run("erase", ["erase", "--batch-mode", device])

