"""Named self-check results shared by every local verifier (quote, GPU, TPM).

One shape everywhere so the CLI, the service and operators read "which check failed and why" the
same way, whatever the evidence was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One named self-check and why it passed or failed."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass
class CheckResult:
    """A list of checks; ``ok`` only if there is at least one and all passed.

    ``not_checked`` names what the verifier deliberately does not cover (said plainly, never implied).
    """

    checks: list[Check]
    not_checked: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "not_checked": list(self.not_checked),
            "info": self.info,
        }
