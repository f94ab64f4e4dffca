"""RTMR extension through the kernel's measurement sysfs, with a crash-safe, append-only event log.

Off by default (``cfg.rtmr.enabled``): the live validator pins boot RTMR3 to zeros (chutes-protocol.md
§2.8), so extending it changes what the validator sees. When enabled, every extension is:

1. under one exclusive ``flock`` on the event log (cooperating processes never interleave);
2. written ahead to the log as one JSON line (event name, data, digest = SHA-384(data), the register
   value before and the value expected after) and fsync'ed;
3. applied by writing the 48-byte digest to ``rtmrN:sha384`` in one write (the kernel computes
   SHA-384(old ‖ digest)), then read back and compared.

Recovery: a crash after step 2 leaves a logged but unapplied record; the next call sees the register
still at that record's "old" value and re-applies it (redo). A failed write appends an ``abort`` record
so replay skips it. A torn last line (crash mid-append) was never applied and is truncated. Replaying
the log from zeros therefore reproduces the register, which is what a verifier does with it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.evidence.mr_register import ZERO, MeasurementRegister, RegisterError, extend_value
from agent.log import get_logger

log = get_logger(__name__)

class RtmrError(AgentError):
    """The register could not be extended, or it disagrees with the event log."""


def _parse_log(raw: bytes, path: str) -> tuple[list[dict[str, Any]], int]:
    """Committed records and the byte length they occupy (a torn tail without newline is excluded)."""
    end = raw.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(raw[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise RtmrError(f"{path}:{lineno}: not a JSON record") from None
        if not isinstance(rec, dict) or rec.get("type") not in ("extend", "abort") or "seq" not in rec:
            raise RtmrError(f"{path}:{lineno}: not an event record")
        rec["_line"] = lineno
        records.append(rec)
    return records, end


def _fold(records: list[dict[str, Any]], path: str) -> tuple[bytes, bytes]:
    """(register after all records, register before the last applied record); checks every record."""
    aborted = {r["seq"] for r in records if r["type"] == "abort"}
    value = prev = ZERO
    for rec in records:
        if rec["type"] != "extend" or rec["seq"] in aborted:
            continue
        where = f"{path}:{rec['_line']}"
        try:
            data = base64.b64decode(rec["data"], validate=True)
            digest, old, new = (bytes.fromhex(rec[k]) for k in ("digest", "old", "new"))
        except (KeyError, ValueError, TypeError):
            raise RtmrError(f"{where}: malformed extend record") from None
        if hashlib.sha384(data).digest() != digest:
            raise RtmrError(f"{where}: digest does not match the event data")
        if old != value:
            raise RtmrError(f"{where}: record starts from {old.hex()[:16]}…, replay is at {value.hex()[:16]}…")
        prev, value = value, extend_value(value, digest)
        if value != new:
            raise RtmrError(f"{where}: recorded value does not match SHA-384(old ‖ digest)")
    return value, prev


def replay_event_log(path: str) -> bytes:
    """The register value the log implies, replayed from zeros (every record checked on the way)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return ZERO
    records, _ = _parse_log(raw, path)
    return _fold(records, path)[0]


class RtmrExtender:
    """Extends one RTMR through sysfs and keeps its event log; one instance per register."""

    def __init__(self, sysfs_path: str, event_log_path: str) -> None:
        self.register = MeasurementRegister(sysfs_path)
        self.event_log_path = event_log_path

    @property
    def sysfs_path(self) -> str:
        return self.register.path

    def read(self) -> bytes:
        """The register's current 48-byte value."""
        try:
            return self.register.read()
        except RegisterError as exc:
            raise RtmrError(str(exc)) from None

    def _write_digest(self, digest: bytes) -> None:
        try:
            self.register.extend([digest])  # exactly one 48-byte write at offset 0, as the ABI demands
        except RegisterError as exc:
            raise OSError(str(exc)) from None

    @contextlib.contextmanager
    def _locked_log(self) -> Iterator[int]:
        parent = os.path.dirname(self.event_log_path) or "."
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(self.event_log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _append(fd: int, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        os.write(fd, line)
        os.fsync(fd)

    def extend(self, event: str, data: bytes) -> bytes:
        """Log then extend with SHA-384(data); returns the register's new value."""
        if not event or len(event) > 256:
            raise ValueError("event: expected a name of 1..256 characters")
        digest = hashlib.sha384(bytes(data)).digest()
        with self._locked_log() as fd:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0) if size else b""
            records, committed = _parse_log(raw, self.event_log_path)
            if committed != len(raw):
                os.ftruncate(fd, committed)  # a torn append was never applied (we extend only after fsync)
                os.fsync(fd)
                log.warning("rtmr.log_torn_tail_removed", path=self.event_log_path, bytes=len(raw) - committed)
            logged, before_last = _fold(records, self.event_log_path)
            current = self.read()
            if current != logged:
                last = next((r for r in reversed(records) if r["type"] == "extend"), None)
                if last is not None and current == before_last and bytes.fromhex(last["new"]) == logged:
                    try:
                        self._write_digest(bytes.fromhex(last["digest"]))  # redo the logged intent
                    except OSError as exc:
                        raise RtmrError(f"re-applying logged event {last['seq']} failed: {exc}") from None
                    current = self.read()
                    log.warning("rtmr.recovered", seq=last["seq"], event_name=last["event"])
                if current != logged:
                    raise RtmrError(
                        f"{self.sysfs_path} does not match the event log {self.event_log_path} "
                        "(extended outside the agent, or the log belongs to another boot)"
                    )
            seq = max((r["seq"] for r in records), default=0) + 1
            new = extend_value(current, digest)
            self._append(fd, {
                "type": "extend", "seq": seq, "event": event, "data": base64.b64encode(bytes(data)).decode(),
                "digest": digest.hex(), "old": current.hex(), "new": new.hex(),
            })
            try:
                self._write_digest(digest)
            except OSError as exc:
                if self.read() == current:
                    self._append(fd, {"type": "abort", "seq": seq, "reason": str(exc)})
                raise RtmrError(f"extending {self.sysfs_path} failed: {exc}") from None
            after = self.read()
            if after != new:
                raise RtmrError(f"{self.sysfs_path} is {after.hex()[:16]}… after extension, expected {new.hex()[:16]}…")
        log.info("rtmr.extended", event_name=event, seq=seq, digest=digest.hex())
        return new


def make_rtmr_extender(cfg: AgentConfig) -> RtmrExtender | None:
    """The configured extender, or None when RTMR extension is disabled (the default)."""
    if not cfg.rtmr.enabled:
        return None
    return RtmrExtender(cfg.rtmr.sysfs_path, cfg.rtmr.event_log)
