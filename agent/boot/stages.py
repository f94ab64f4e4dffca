"""Stage timing: every boot stage is one ``boot.stage`` log event and one readable console line.

Each stage also says how much of its time was spent waiting on something outside the agent
(network, quote hardware, cryptsetup's KDF, back-off sleeps), so the agent's own overhead is
total minus waits.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from agent.log import get_logger

log = get_logger("agent.boot")

WAIT_KINDS = ("network", "quote", "cryptsetup", "backoff")


@dataclass
class StageRecord:
    stage: str
    duration_ms: float
    result: str
    detail: str = ""
    waits_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["duration_ms"] = round(self.duration_ms, 3)
        d["waits_ms"] = {k: round(v, 3) for k, v in self.waits_ms.items()}
        return d


class StageTimer:
    """Collects stage records; ``with timer.stage("nonce") as st: ...; st.wait("network", s)``."""

    def __init__(self, console: TextIO | None = None) -> None:
        self.records: list[StageRecord] = []
        self._console = console
        self._t0 = time.monotonic()

    @contextmanager
    def stage(self, name: str, **fields: Any) -> Iterator[_Stage]:
        st = _Stage()
        start = time.monotonic()
        try:
            yield st
        except BaseException as exc:
            self._finish(name, start, st, "failed", str(exc) or type(exc).__name__, fields)
            raise
        self._finish(name, start, st, st.result, st.detail, fields)

    def _finish(self, name: str, start: float, st: _Stage, result: str, detail: str, fields: dict[str, Any]) -> None:
        ms = (time.monotonic() - start) * 1000
        rec = StageRecord(name, ms, result, detail, dict(st.waits_ms))
        self.records.append(rec)
        level = log.info if result in ("ok", "skipped") else log.warning
        level("boot.stage", stage=name, duration_ms=round(ms, 3), result=result, detail=detail or None, **fields)
        out = self._console if self._console is not None else sys.stderr
        line = f"chutes-attest: [{name:<14}] {result:<7} {ms:9.1f} ms"
        if detail:
            line += f"  {detail}"
        print(line, file=out, flush=True)

    def totals(self, cryptsetup_s: float = 0.0) -> dict[str, float]:
        """Wall time since start, waits per kind, and the agent's own overhead (all in ms).

        ``agent_overhead_ms`` = total minus waiting on the network, the quote and back-off sleeps;
        ``agent_overhead_excl_cryptsetup_ms`` also leaves out time inside cryptsetup processes.
        """
        total = (time.monotonic() - self._t0) * 1000
        waits = {k: 0.0 for k in WAIT_KINDS}
        for r in self.records:
            for k, v in r.waits_ms.items():
                waits[k] = waits.get(k, 0.0) + v
        waits["cryptsetup"] = cryptsetup_s * 1000
        out = {"total_ms": total, **{f"{k}_wait_ms": v for k, v in waits.items()}}
        out["agent_overhead_ms"] = total - waits["network"] - waits["quote"] - waits["backoff"]
        out["agent_overhead_excl_cryptsetup_ms"] = out["agent_overhead_ms"] - waits["cryptsetup"]
        return {k: round(v, 3) for k, v in out.items()}


class _Stage:
    """Handle given to a running stage: result/detail overrides and wait accounting."""

    def __init__(self) -> None:
        self.result = "ok"
        self.detail = ""
        self.waits_ms: dict[str, float] = {}

    def wait(self, kind: str, seconds: float) -> None:
        self.waits_ms[kind] = self.waits_ms.get(kind, 0.0) + seconds * 1000

    @contextmanager
    def waiting(self, kind: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.wait(kind, time.monotonic() - t)
