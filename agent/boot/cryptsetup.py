"""The ``cryptsetup`` calls of the boot flow, with every passphrase on stdin.

A passphrase arrives as a :class:`agent.log.Secret`; its bytearray is written straight into the
child's stdin pipe (``--key-file=-``: the exact bytes, no newline handling), so it never appears in
argv, the environment or a file. Hardware/tool access only; the header policy lives in
:mod:`agent.boot.luks_header`.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from agent.log import Secret

TIMEOUT_S = 300.0
#: cryptsetup's exit code for "No key available with this passphrase".
EXIT_WRONG_KEY = 2


class CryptsetupError(Exception):
    def __init__(self, op: str, returncode: int, stderr: str) -> None:
        msg = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        super().__init__(f"cryptsetup {op}: {msg}")
        self.op = op
        self.returncode = returncode
        self.wrong_key = returncode == EXIT_WRONG_KEY


class Cryptsetup:
    """Thin runner around the ``cryptsetup`` binary (path configurable: ``boot.cryptsetup``)."""

    def __init__(self, binary: str = "cryptsetup") -> None:
        self.binary = binary
        #: Wall time spent inside cryptsetup processes (KDF, I/O), for the agent-overhead figure.
        self.elapsed_s = 0.0

    def _run(self, op: str, args: list[str], secret: Secret | None = None) -> str:
        t0 = time.monotonic()
        try:
            return self._run_timed(op, args, secret)
        finally:
            self.elapsed_s += time.monotonic() - t0

    def _run_timed(self, op: str, args: list[str], secret: Secret | None) -> str:
        argv = [self.binary, *args]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if secret is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, close_fds=True,
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

    def luks_format(self, device: str, passphrase: Secret, *, label: str, pbkdf: str = "argon2id",
                    iterations: int = 0) -> None:
        """A new LUKS2 volume with AES-XTS-512 (passes the header policy by construction)."""
        args = ["luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
                "--key-size", "512", "--label", label, "--pbkdf", pbkdf, "--key-file=-"]
        if iterations > 0:
            args += ["--pbkdf-force-iterations", str(iterations)]
        self._run("luksFormat", [*args, device], passphrase)
