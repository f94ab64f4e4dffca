"""What a root or storage confirm proved (reference §4.3 steps 6 and 9, §5, §12.5).

The confirm is the one call after which a key slot is destroyed, so its answer is read for proof,
never for a status code alone:

- **committed** — HTTP 200 whose body is the validator's confirmation, ``{"status": "confirmed",
  "volumes": {name: {"result": "promoted"}}}``, for that volume. Only then are the old slots killed.
- **refused** — a 4xx carrying the validator's JSON ``detail`` (FastAPI's error body: bad nonce 400/401,
  bad proof 401/403, unsupported volume 400). The validator said it kept nothing new, so ``next``
  may be removed again.
- **unknown** — everything else: 5xx (a gateway's 502 can follow a commit), a cut connection, a
  timeout, a redirect, a 4xx without the validator's JSON (a proxy's page), a 200 that is not the
  confirmation, a confirmation whose ``result`` for the volume is missing or not ``promoted``. Both
  keyslots stay (whichever key the validator now holds opens the disk next boot, and that boot's
  rotation kills the stale slot by number) and a 1.4.0 boot fails closed.

sek8s keys on ``200`` vs ``non-200`` alone; this is stricter where a wrong guess strands the disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.errors import AgentError
from agent.validator.client import ValidatorClient
from agent.validator.errors import ValidatorHTTPError, ValidatorRedirectError
from agent.validator.schemas import ConfirmResponse


class ConfirmUnknown(AgentError):
    """The confirm's outcome at the validator is unknown (it may have committed): keep every key slot."""

    reason = "confirm_unknown"


@dataclass(frozen=True)
class ConfirmAnswer:
    """A confirm answer that proves something: a refusal the validator stated, or its per-volume results."""

    refused: bool = False
    #: volume → "promoted" | "discarded" | "no_pending", only for volumes the body names properly.
    results: Mapping[str, str] = field(default_factory=dict)
    #: The refusal's text (status and the validator's detail), for logs and the failure line.
    detail: str = ""

    def promoted(self, volume: str) -> bool:
        """True only when the validator's confirmation says it promoted ``volume``'s new key."""
        return not self.refused and self.results.get(volume) == "promoted"

    def result(self, volume: str) -> str:
        """"refused", the proven result, or "unproven" (the body names no usable result for ``volume``)."""
        return "refused" if self.refused else self.results.get(volume, "unproven")


def is_stated_refusal(exc: ValidatorHTTPError) -> bool:
    """A 4xx with the validator's JSON error text: the validator refused and committed nothing.

    A redirect, a 5xx, or a 4xx without a JSON ``detail``/``message``/``error`` (an nginx or proxy page,
    never the validator's own answer) proves nothing.
    """
    return not isinstance(exc, ValidatorRedirectError) and 400 <= exc.status < 500 and bool(exc.detail)


async def send_confirm(client: ValidatorClient, endpoint: str, path: str, headers: dict[str, str],
                       body: bytes, volumes: tuple[str, ...]) -> ConfirmAnswer:
    """POST one confirm (exactly ``body``) and read what it proves.

    Returns a :class:`ConfirmAnswer` for a stated refusal or a confirmation body; raises
    :class:`ConfirmUnknown` for an HTTP answer that proves nothing, and lets the client's
    :class:`~agent.validator.errors.ValidatorTransportError` (no answer) and
    :class:`~agent.validator.errors.ValidatorProtocolError` (200 but not the confirmation) through:
    every exception means "outcome unknown" to the caller.
    """
    try:
        answer = await client.request(endpoint, "POST", path, headers=headers, body=body)
    except ValidatorHTTPError as exc:
        if is_stated_refusal(exc):
            return ConfirmAnswer(refused=True, detail=str(exc))
        raise ConfirmUnknown(f"{exc}: not a refusal the validator stated (it may have committed)") from None
    return ConfirmAnswer(results=ConfirmResponse.parse(endpoint, answer, volumes).results)
