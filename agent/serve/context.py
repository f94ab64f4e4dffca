"""State shared by both apps: config, evidence collector, nonce store, limiters, counters."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.config import AgentConfig
from agent.evidence.collector import Collector
from agent.serve.ratelimit import KeyedLimiter
from agent.serve.request_log import RequestLog
from agent.serve.rint import NonceStore

if TYPE_CHECKING:
    from agent.serve.gate import ServeGate

CTX_KEY: web.AppKey[ServiceContext] = web.AppKey("chutes_attest_ctx")


@dataclass
class ServiceContext:
    cfg: AgentConfig
    collector: Collector
    nonces: NonceStore
    evidence_limiter: KeyedLimiter
    nonce_limiter: KeyedLimiter
    #: Validator relay calls per caller (each is an outbound TLS request to the validator).
    relay_limiter: KeyedLimiter
    measurements: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    counters: Counter[str] = field(default_factory=Counter)
    #: Each socket's :class:`~agent.serve.gate.ServeGate`, by socket name.
    trackers: dict[str, ServeGate] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=lambda: {"status": "starting"})
    #: What the journal gets per request (lines for refusals/errors/slow, a summary per interval).
    request_log: RequestLog = field(default_factory=RequestLog)

    @classmethod
    def build(cls, cfg: AgentConfig, collector: Collector) -> ServiceContext:
        s = cfg.serve
        return cls(
            cfg=cfg,
            collector=collector,
            nonces=NonceStore(s.rint_nonce_ttl_s, s.rint_nonces_per_caller, max_total=s.rint_nonces_max),
            evidence_limiter=KeyedLimiter(s.evidence_rate_per_s, s.evidence_burst),
            nonce_limiter=KeyedLimiter(s.nonce_rate_per_s, s.nonce_burst),
            relay_limiter=KeyedLimiter(s.relay_rate_per_s, s.relay_burst),
            request_log=RequestLog(mode=s.request_log, interval_s=s.request_summary_interval_s,
                                   slow_ms=s.slow_request_ms),
        )


def ctx_of(request: web.Request) -> ServiceContext:
    return request.app[CTX_KEY]
