"""``chutes-attest serve``: both unix-socket APIs, systemd readiness/watchdog, graceful drain.

Start-up order matters: the service certificate is loaded (or created), the quote source produces one
quote whose REPORTDATA is checked after parsing, and only then are the sockets served and ``READY=1``
sent. The watchdog is pinged only while the event loop is responsive and no quote is stuck in the
source; ``STATUS=`` says what the service is doing; SIGTERM stops accepting, lets in-flight requests
finish (bounded) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent.config import AgentConfig
from agent.errors import AgentError, UnavailableError
from agent.evidence.base import EvidenceError
from agent.evidence.collector import Collector
from agent.evidence.service_identity import load_identity
from agent.log import get_logger
from agent.serve import app_chute, app_compat
from agent.serve.acceptor import Acceptor
from agent.serve.context import CTX_KEY, ServiceContext
from agent.serve.errors import ApiError, chute_body, compat_body
from agent.serve.gate import ServeGate
from agent.serve.middleware import make_middleware
from agent.serve.sockets import bind_unix
from agent.serve.status import HealthState, health, responsive
from agent.serve.systemd_integration import Notifier, listen_sockets, watchdog_interval_s

if TYPE_CHECKING:
    from agent.evidence.quote_queue import QuoteQueue

log = get_logger(__name__)

SOCKET_NAMES = ("compat", "chute")
#: Routes that neither read a body nor wait on I/O: no per-request timeout timer needed.
NO_TIMEOUT = frozenset({("GET", "/health"), ("GET", "/v1/health"), ("GET", "/v1/status"),
                        ("POST", "/v1/rint/nonce")})
MAX_LOOP_LAG_S = 5.0
#: GIL hand-off interval once serving (CPython's default is 5 ms).
GIL_SWITCH_INTERVAL_S = 0.0005
#: Young-generation threshold once serving (CPython's default is 700).
GC_GEN0_THRESHOLD = 7000
#: A single quote-source call running longer than 2 x quote.deadline_s + this is "wedged".
WEDGE_GRACE_S = 5.0


class SelfCheckError(UnavailableError, RuntimeError):
    """The start-up self-check failed; the service must not report ready."""


def match_activated(fds: dict[str, socket.socket], paths: dict[str, str]) -> dict[str, socket.socket]:
    """Name activated sockets "compat"/"chute": by FileDescriptorName= first, else by bound path
    (one .socket unit with two ListenStream= gives both fds the same name)."""
    out: dict[str, socket.socket] = {}
    for name, sock in fds.items():
        if name in SOCKET_NAMES and name not in out:
            out[name] = sock
            continue
        try:
            bound = sock.getsockname()
        except OSError:
            bound = None
        role = next((r for r, p in paths.items() if bound == p and r not in out), None)
        out[role or f"unmatched:{name}:{sock.fileno()}"] = sock
    return out


@dataclass
class _Listener:
    name: str
    path: str
    sock: socket.socket
    activated: bool
    runner: web.AppRunner
    tracker: ServeGate
    server: Acceptor | None = None


@dataclass
class Service:
    cfg: AgentConfig
    notifier: Notifier = field(default_factory=Notifier)
    ctx: ServiceContext | None = None
    listeners: list[_Listener] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _queue: QuoteQueue | None = None

    # -- start-up -----------------------------------------------------------------------------------
    async def _self_check(self, collector: Collector) -> dict[str, Any]:
        """One real quote (TDX) or report (SEV-SNP) through the queue, under the one own-evidence policy
        (:mod:`agent.evidence.own_quote`): REPORTDATA = nonce ‖ SPKI hash, debug off (SNP: VMPL 0, signed).
        Any TDX version is served here: the compat socket refuses v5 per request unless ``quote.allow_v5``."""
        from agent.evidence.own_quote import TDX, OwnEvidenceError, check_own_evidence

        nonce = secrets.token_bytes(32)
        started = time.monotonic()
        raw = await collector.quote(nonce, caller="self-check")
        try:
            ev = check_own_evidence(raw, collector.report_data(nonce), tee=collector.tee, allow_v5=True,
                                    binding="nonce || SHA-256(service cert SPKI)", refusal="refusing to serve it")
        except OwnEvidenceError as exc:
            raise SelfCheckError(f"self-check: {exc.message}") from None
        took_ms = round((time.monotonic() - started) * 1000, 1)
        m: dict[str, Any] = dict(ev.measurements)
        if ev.tee == TDX:
            m.update(debug=ev.debug, quote_version=ev.version, self_check_ms=took_ms, tee=ev.tee)
            log.info("serve.self_check", result="ok", tee=ev.tee, duration_ms=took_ms, mr_td=m["mr_td"][:16])
        else:
            m.update(debug=ev.debug, report_version=ev.version, self_check_ms=took_ms, tee=ev.tee)
            log.info("serve.self_check", result="ok", tee=ev.tee, duration_ms=took_ms,
                     measurement=m["measurement"][:16])
        return m

    def _listener(self, name: str, path: str, sock: socket.socket, activated: bool) -> _Listener:
        assert self.ctx is not None
        s = self.cfg.serve
        tracker = ServeGate.for_socket(name, s)
        render = compat_body if name == "compat" else chute_body
        tracker.error_body = render
        mw = make_middleware(tracker, socket_name=name, render=render, max_body=s.max_body_bytes,
                             timeout_s=s.request_timeout_s, counters=self.ctx.counters,
                             request_log=self.ctx.request_log, no_timeout=NO_TIMEOUT,
                             reserved_lane=name == "compat")
        app = web.Application(middlewares=[mw], client_max_size=s.max_body_bytes)
        app[CTX_KEY] = self.ctx
        (app_compat if name == "compat" else app_chute).add_routes(app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=s.idle_timeout_s)
        self.ctx.trackers[name] = tracker
        return _Listener(name, path, sock, activated, runner, tracker)

    async def start(self) -> None:
        from agent.evidence.gpu_sources import make_gpu_source
        from agent.evidence.quote_queue import QuoteQueue
        from agent.evidence.sources import make_quote_source

        cfg = self.cfg
        self.notifier.status("starting: loading service certificate")
        cert = load_identity(cfg.serve)  # the boot's CA-signed leaf (1.4.0+) or the self-signed pair
        source = make_quote_source(cfg)  # resolves the TEE (quote.tee); nothing is quoted yet
        if cfg.rtmr.runtime_event:  # ≤1.2 images: before any quote, so no runtime quote passes as a boot one
            from agent.evidence.rtmr3_runtime import apply_runtime_event

            await asyncio.to_thread(apply_runtime_event, cfg.rtmr.sysfs_path, cfg.rtmr.event_log,
                                    tee=getattr(source, "tee", "tdx"))
        self._queue = QuoteQueue(source, max_len=cfg.quote.queue_max, default_deadline_s=cfg.quote.deadline_s,
                                 max_per_caller=cfg.quote.queue_per_caller,
                                 reserved=min(cfg.quote.queue_reserved_compat, cfg.quote.queue_max - 1))
        gpu = make_gpu_source(cfg)
        collector = Collector(cfg, cert, self._queue, gpu)
        self.ctx = ServiceContext.build(cfg, collector)
        self.notifier.status(f"starting: self-check quote from {getattr(source, 'name', cfg.quote.source)}")
        try:
            measurements = await self._self_check(collector)
        except EvidenceError as exc:  # the source cannot produce the one quote: unavailable (exit 5), never ready
            raise SelfCheckError(f"self-check quote: {exc}") from exc
        measurements["quote_source"] = getattr(source, "name", cfg.quote.source)
        measurements["service_cert_spki_sha256"] = cert.spki_sha256.hex()
        measurements["service_identity"] = {"source": cert.source, "why": cert.why}
        self.ctx.measurements = measurements

        paths = {"compat": cfg.serve.compat_socket, "chute": cfg.serve.chute_socket}
        activated = match_activated(listen_sockets(), paths)
        for name in SOCKET_NAMES:
            sock = activated.pop(name, None)
            was_activated = sock is not None
            if sock is None:
                sock = bind_unix(paths[name], cfg.serve.socket_mode, cfg.serve.socket_group)
            else:
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    paths[name] = sock.getsockname() or paths[name]
            self.listeners.append(self._listener(name, paths[name], sock, was_activated))
        for extra, sock in activated.items():
            log.warning("serve.unexpected_fd", name=extra, reason="socket passed by systemd with an unknown name")
            sock.close()
        for lst in self.listeners:
            await lst.runner.setup()
            assert lst.runner.server is not None
            lst.sock.listen(self.cfg.serve.listen_backlog)  # an activated socket gets our backlog too
            # accepted here, not by asyncio: a refused connection never becomes a transport/aiohttp handler
            lst.server = Acceptor(lst.sock, lst.tracker, lst.tracker.factory(lst.runner.server))
        self.ctx.health = {"status": "ok"}
        status = "serving " + ", ".join(f"{lst.name}={lst.path}" for lst in self.listeners)
        log.info("serve.ready", compat=paths["compat"], chute=paths["chute"],
                 activated=[lst.name for lst in self.listeners if lst.activated],
                 quote_source=measurements["quote_source"])
        # Everything allocated so far (modules, keys, the app) lives for the whole process: move it out
        # of the collector's view so full collections stay short and don't show up as latency spikes.
        gc.collect()
        gc.freeze()
        # Requests allocate (and free) many short-lived containers; a young collection every 700 net
        # allocations meant one every ~150 requests and a full one every few seconds under load.
        # Ten times fewer collections of all generations, same objects found; cycles are rare here.
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        # Quote and GPU evidence work runs on threads; with the default 5 ms GIL switch interval a thread
        # waits up to 5 ms per hand-off while the event loop is busy (e.g. answering a flooding caller), so
        # one container's cheap requests would stretch every neighbour's evidence. Hand off sooner.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.notifier.ready(status)
        self._tasks.append(asyncio.create_task(self._health_loop(), name="serve-health"))
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="serve-purge"))
        self._tasks.append(asyncio.create_task(self._summary_loop(), name="serve-request-summary"))

    # -- steady state -------------------------------------------------------------------------------
    async def _purge_loop(self) -> None:
        assert self.ctx is not None
        while True:
            await asyncio.sleep(min(30.0, max(1.0, self.ctx.nonces.ttl_s / 4)))
            self.ctx.nonces.purge_expired()

    async def _summary_loop(self) -> None:
        """One serve.request_summary line per interval (routine successes are not logged one by one)."""
        assert self.ctx is not None
        rlog = self.ctx.request_log
        while True:
            await asyncio.sleep(max(0.05, rlog.seconds_until_due()))
            if rlog.seconds_until_due() <= 0:
                rlog.flush()

    async def _probe(self) -> None:
        assert self.ctx is not None
        with contextlib.suppress(Exception):
            await self.ctx.collector.quote(secrets.token_bytes(32), caller="health-probe")

    async def _health_loop(self) -> None:
        """Measure loop lag; ping the watchdog only when healthy; keep STATUS= current."""
        assert self.ctx is not None
        wd = watchdog_interval_s() if self.cfg.serve.watchdog else None
        period = wd if wd else 5.0
        tick = min(1.0, period / 2)
        loop = asyncio.get_running_loop()
        max_lag = min(MAX_LOOP_LAG_S, wd if wd else MAX_LOOP_LAG_S)
        wedge_s = 2 * self.cfg.quote.deadline_s + WEDGE_GRACE_S
        call_seen: tuple[int, float] | None = None  # (source_calls, first seen running)
        last_status = ""
        last_probe = 0.0
        window_lag = 0.0
        next_eval = loop.time() + period
        while True:
            t0 = loop.time()
            await asyncio.sleep(tick)
            window_lag = max(window_lag, loop.time() - t0 - tick)
            if loop.time() < next_eval:
                continue
            next_eval = loop.time() + period
            ch = self.ctx.collector.health
            # wedged: the same source call (no new source_calls) has been running for too long
            calls = int(getattr(self._queue, "stats", {}).get("source_calls", 0))
            if getattr(self._queue, "in_flight", False):
                if call_seen is None or call_seen[0] != calls:
                    call_seen = (calls, loop.time())
            else:
                call_seen = None
            wedged = (call_seen is not None and loop.time() - call_seen[1] > wedge_s) or \
                ch.oldest_in_flight_s() > wedge_s
            state = HealthState(loop_lag_s=window_lag, max_lag_s=max_lag, wedged=wedged,
                                consecutive_failures=ch.consecutive_failures, last_error=ch.last_error)
            failing = state.consecutive_failures > 0
            healthy = responsive(state)
            self.ctx.health = health(state)[1]
            window_lag = 0.0
            if healthy and wd:
                self.notifier.watchdog()
            if failing and loop.time() - last_probe > 30:
                last_probe = loop.time()
                self._tasks.append(asyncio.create_task(self._probe()))
                self._tasks = [t for t in self._tasks if not t.done()]
            status = (f"{'serving' if healthy and not failing else 'degraded'}; quotes ok={ch.ok} failed={ch.failed}"
                      f"; queue={getattr(self._queue, 'depth', 0)}; rint nonces={len(self.ctx.nonces)}")
            if failing:
                status += f"; quote source: {ch.last_error[:120]}"
            if status != last_status:
                self.notifier.status(status)
                last_status = status

    # -- shutdown -----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests (bounded), release everything."""
        self.notifier.stopping("draining")
        started = time.monotonic()
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        in_flight = sum(lst.tracker.busy_count() for lst in self.listeners)
        log.info("serve.draining", in_flight=in_flight)
        # aiohttp's own shutdown ignores request bytes that arrive after it starts, so wait here
        # first: in-flight requests (even ones whose body is still arriving) finish, idle ones close.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.serve.drain_timeout_s
        for lst in self.listeners:
            lst.tracker.start_drain()
        while loop.time() < deadline and any(lst.tracker.busy_count() for lst in self.listeners):
            await asyncio.sleep(0.05)
        left = sum(lst.tracker.busy_count() for lst in self.listeners)
        for lst in self.listeners:
            if lst.runner.server is not None:
                await lst.runner.server.shutdown(0.5 if left else 0.1)
        for lst in self.listeners:
            lst.tracker.close()
            await lst.runner.cleanup()
            if not lst.activated:
                with contextlib.suppress(OSError):
                    os.unlink(lst.path)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._queue is not None:
            await self._queue.aclose()
        from agent.validator.rint_relay import close_shared

        await close_shared()  # the rint relay's pooled validator connections
        if self.ctx is not None:
            self.ctx.request_log.flush()  # what was counted since the last summary, not lost at stop
        log.info("serve.stopped", duration_ms=round((time.monotonic() - started) * 1000, 1), abandoned=left)


class StartError(UnavailableError):
    """An operating-system resource the service needs at start (a socket's directory, a file) is unusable."""


def start_error(exc: Exception) -> AgentError | None:
    """What a start failure exits with (``cli.main`` maps it, as every command's error): an
    :class:`~agent.errors.AgentError` keeps its class's exit code (a socket or certificate problem 5, a
    configuration problem 2, a hand-off identity that does not verify 3, a failed self-check 5), any other
    ``OSError`` is :class:`StartError` (5); None for anything else (a bug: re-raised as it is)."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return StartError(f"{where}{exc.strerror or exc}")
    return None


def _start_failure_report(exc: AgentError) -> tuple[str, str]:
    """(log event, ``STATUS=`` text) for a start failure."""
    from agent.evidence.service_identity import ServiceCertError

    if isinstance(exc, SelfCheckError):
        return "serve.self_check", f"self-check failed: {exc}"
    if isinstance(exc, ServiceCertError):  # the boot's identity is there but wrong: never fall back
        return "serve.start_failed", f"start failed: service identity: {exc}"
    return "serve.start_failed", f"start failed: {exc}"


async def serve(cfg: AgentConfig) -> int:
    """Run until SIGTERM/SIGINT, then exit 0; a start failure is raised (after the clean-up) as the
    :class:`~agent.errors.AgentError` whose exit code ``cli.main`` returns (see :func:`start_error`)."""
    from agent.exitcodes import EXIT_OK

    svc = Service(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, svc.request_stop)
    try:
        await svc.start()
    except Exception as exc:
        err = start_error(exc)
        if err is None:
            log.error("serve.start_failed", reason=f"{type(exc).__name__}: {exc}", code="internal")
            await svc.stop()
            raise
        event, status = _start_failure_report(err)
        log.error(event, result="failed", reason=str(err), code=err.reason, exit_code=err.exit_code)
        svc.notifier.status(status)
        await svc.stop()
        if err is exc:
            raise
        raise err from exc
    await svc.wait()
    await svc.stop()
    return EXIT_OK


__all__ = ["ApiError", "SelfCheckError", "Service", "StartError", "serve", "start_error"]
