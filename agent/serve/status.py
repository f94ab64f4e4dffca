"""The status documents: a caller's own view (chute ``/v1/status``) and the node-wide one (compat ``/status``).

Containers share a node but must not watch each other: the chute socket's ``/v1/status`` shows the
calling container only its own request counters, queued quotes, live rint nonces and connections, plus
node facts every tenant already depends on (health, boot outcome, measurements, versions). Figures that
add up every caller (per-route counters of all callers, queue statistics, connection totals) are only
served on the compat socket, which the node operator's attestation proxy and ``doctor`` use.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent import __version__
from agent.serve.context import ServiceContext
from agent.serve.peer import Peer


@dataclass(frozen=True, slots=True)
class HealthState:
    """What the health check reads, sampled once per evaluation period by the service's health loop."""

    #: The event loop's worst lag over the period, and the most it may lag and still count as responsive.
    loop_lag_s: float
    max_lag_s: float
    #: A quote-source call (or an evidence request) has been running past the wedge limit.
    wedged: bool
    #: Quote-source calls that failed in a row since the last success, and the last failure's text.
    consecutive_failures: int = 0
    last_error: str = ""


def responsive(state: HealthState) -> bool:
    """The service answers and its quote source is not stuck: the systemd watchdog may be pinged."""
    return not state.wedged and state.loop_lag_s <= state.max_lag_s


def health(state: HealthState) -> tuple[str, dict[str, Any]]:
    """("ok" or "degraded", the health document ``/v1/health``, ``/v1/status`` and ``/status`` show).

    Degraded when the loop lags past its limit, a quote-source call is wedged, or the last quote-source
    call failed; a pure function of ``state``.
    """
    failing = state.consecutive_failures > 0
    status = "ok" if responsive(state) and not failing else "degraded"
    source = "wedged" if state.wedged else ("failing: " + state.last_error if failing else "ok")
    return status, {"status": status, "loop_lag_ms": round(state.loop_lag_s * 1000, 1), "quote_source": source}


def _boot_status(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable boot status {path}: {type(exc).__name__}"}


def _node_facts(ctx: ServiceContext) -> dict[str, Any]:
    queue = ctx.collector.queue
    return {
        "service": "chutes-attest",
        "versions": {"agent": __version__, "python": platform.python_version(), "aiohttp": aiohttp.__version__},
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "health": ctx.health,
        "boot": _boot_status(ctx.cfg.serve.boot_status_path),
        "measurements": ctx.measurements,
        "quote_source": getattr(getattr(queue, "source", None), "name", ctx.cfg.quote.source),
    }


def caller_status(ctx: ServiceContext, peer: Peer, socket_name: str) -> dict[str, Any]:
    """Node facts plus this caller's own figures only."""
    tracker = ctx.trackers.get(socket_name)
    own = dict(tracker.counters_of(peer.scope)) if tracker is not None else {}
    queue = ctx.collector.queue
    queued = queue.queued_for(peer.scope) if hasattr(queue, "queued_for") else 0
    doc = _node_facts(ctx)
    doc.update(
        caller={"scope": peer.scope, "identified": peer.identified},
        queue={"depth": queued},
        rint={"live_nonces": ctx.nonces.live_for(peer.scope)},
        counters={
            "requests": own,
            "connections": {socket_name: tracker.connections_of(peer.scope) if tracker is not None else 0},
        },
    )
    return doc


def node_status(ctx: ServiceContext) -> dict[str, Any]:
    """Everything, summed over all callers (compat socket only)."""
    c = ctx.collector
    stats = getattr(c.queue, "stats", None)
    doc = _node_facts(ctx)
    doc.update(
        queue={"depth": getattr(c.queue, "depth", 0), "stats": stats if isinstance(stats, dict) else None},
        rint={"live_nonces": len(ctx.nonces), "issued": ctx.nonces.issued, "consumed": ctx.nonces.consumed,
              "refused_full": ctx.nonces.refused_full, "cap": ctx.nonces.max_total},
        counters={
            "requests": dict(ctx.counters),
            "rate_limited": {"evidence": ctx.evidence_limiter.rejected, "nonce": ctx.nonce_limiter.rejected,
                             "relay": ctx.relay_limiter.rejected},
            "quotes": {"ok": c.health.ok, "failed": c.health.failed, "v5_refused": c.health.v5_refused},
            "connections": {name: {"open": len(t.states), "accepted": t.accepted, "refused": t.refused,
                                   "timed_out": t.timed_out, "bad_http": t.bad_http,
                                   "unidentified": t.resolver.unidentified}
                            for name, t in ctx.trackers.items()},
            "request_log": ctx.request_log.status(),
        },
    )
    return doc
