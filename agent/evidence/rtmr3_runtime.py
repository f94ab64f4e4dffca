"""The fixed "runtime" RTMR3 event for ≤1.2 images (setting ``rtmr.runtime_event``, issue 11 item 6).

Why: on ≤1.2 images nothing extends RTMR3, so a runtime quote (``/tdx/quote``, ``/attest``) is
indistinguishable from a boot quote: whoever holds the service TLS key and the compat socket could
fetch a boot nonce and get the root key released with a runtime quote. Extending RTMR3 once with a
fixed event before the service answers any quote request makes every runtime quote carry
``RUNTIME_RTMR3`` instead of zeros, which a boot measurement (RTMR3 = 0) never matches.

The event: data = ASCII ``chutes-attest:runtime:v1``; digest = SHA-384(data); from a zero register
RTMR3 = SHA-384(0⁴⁸ ‖ digest) = :data:`RUNTIME_RTMR3` — the value an operator registers as the
image's ``runtime_rtmr3``. It goes through :class:`~agent.evidence.rtmr.RtmrExtender` (logged in the
RTMR event log, read back). Once per boot: a service restart that finds the event already applied
(register == replayed log, event in the log) does not extend again. A register that is neither zero
nor explained by the log (e.g. a ≥1.3 image whose rootfs chain already ran) fails closed: this
setting is for ≤1.2 images only. SEV-SNP guests have no RTMR3: there the event is skipped (logged).
"""

from __future__ import annotations

import hashlib
import json

from agent.errors import UnavailableError
from agent.evidence.base import EvidenceError
from agent.evidence.mr_register import ZERO
from agent.evidence.own_quote import TDX
from agent.evidence.rtmr import RtmrError, RtmrExtender, replay_event_log
from agent.log import get_logger

log = get_logger(__name__)

RUNTIME_EVENT = "chutes-attest:runtime:v1"
RUNTIME_EVENT_DATA = RUNTIME_EVENT.encode("ascii")
RUNTIME_DIGEST = hashlib.sha384(RUNTIME_EVENT_DATA).digest()
#: RTMR3 after the runtime event on a register that was zero (the value to register as runtime_rtmr3).
RUNTIME_RTMR3 = hashlib.sha384(ZERO + RUNTIME_DIGEST).digest()


class RuntimeEventError(EvidenceError, UnavailableError):
    """The runtime event could not be applied; the service must not answer quote requests."""

    reason = "rtmr3_runtime_event_failed"


def _logged(event_log: str) -> bool:
    try:
        with open(event_log, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "extend" and rec.get("event") == RUNTIME_EVENT:
            return True
    return False


def apply_runtime_event(sysfs_path: str, event_log: str, *, tee: str = TDX) -> bytes | None:
    """Extend RTMR3 with the runtime event unless this boot already did; returns the register value.

    On SEV-SNP there is no RTMR3 (and no ≤1.2 SNP image): nothing is extended, the skip is logged, None.
    """
    if tee != TDX:
        log.info("rtmr.runtime_event", result="skipped", tee=tee,
                 reason="no RTMR3 on this TEE: the runtime event exists for TDX ≤1.2 images only")
        return None
    ext = RtmrExtender(sysfs_path, event_log)
    try:
        current = ext.read()
        if current != ZERO and _logged(event_log) and replay_event_log(event_log) == current:
            log.info("rtmr.runtime_event", result="already_applied", rtmr3=current.hex())
            return current
        if current != ZERO:
            raise RuntimeEventError(
                f"RTMR3 is already extended ({current.hex()[:16]}…) and the event log does not explain it; "
                "rtmr.runtime_event is for ≤1.2 images, whose RTMR3 is zero after boot")
        value = ext.extend(RUNTIME_EVENT, RUNTIME_EVENT_DATA)
    except RtmrError as exc:
        raise RuntimeEventError(f"runtime RTMR3 event: {exc}") from None
    log.info("rtmr.runtime_event", result="applied", rtmr3=value.hex())
    return value
