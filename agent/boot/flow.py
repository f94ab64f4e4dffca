"""The boot flow (docs/architecture.md; docs/reference/chutes-vm-generations.md §4), stage by stage, failing closed.

config volume → network → ephemeral mTLS identity → [nonce → report_data → quote → self-check →
attestation] with retries → LUKS2 header check → unlock → cache volume → hand-off files.
Hardware and tools come in through :class:`BootDeps`, so tests run this exact code against the
faithful validator, an emulated configfs-tsm and real cryptsetup on image files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.boot import failure, network
from agent.boot.client_cert import ClientIdentity, make_identity, ssl_context
from agent.boot.config_volume import BootIdentity, ConfigVolumeError, read_config_volume
from agent.boot.cryptsetup import Cryptsetup
from agent.boot.exchange import Exchange, Shape
from agent.boot.failure import BootFailure
from agent.boot.handoff import write_handoff, write_status
from agent.boot.legacy_cache import cache_volume_stage
from agent.boot.retrying import CallBudget
from agent.boot.root_unlock import unlock_root
from agent.boot.stages import StageTimer
from agent.config import AgentConfig, BootConfig
from agent.evidence.base import QuoteSource
from agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from agent.log import get_logger
from agent.validator.client import ValidatorClient
from agent.validator.retry import RetryPolicy
from agent.validator.transport import TlsConfigError, parse_pins

log = get_logger(__name__)



@dataclass
class BootDeps:
    """Everything the flow touches outside itself."""

    quote_source: QuoteSource
    cryptsetup: Cryptsetup
    read_identity: Callable[[], BootIdentity]
    setup_network: Callable[[BootIdentity], str]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    console: TextIO | None = None


@dataclass
class BootOutcome:
    ok: bool
    exit_code: int
    reason: str = ""
    failure_line: str = ""
    status: dict[str, Any] = field(default_factory=dict)


def default_deps(cfg: AgentConfig, quote_source: QuoteSource, console: TextIO | None = None) -> BootDeps:
    """Production wiring: config volume by label, static network with ``ip``, the configured cryptsetup."""
    b = cfg.boot

    def read_identity() -> BootIdentity:
        return read_config_volume(b.config_device, b.config_label, b.config_mount, b.device_wait_s)

    def setup_network(ident: BootIdentity) -> str:
        if b.network == "initramfs":
            return "skipped: configured by initramfs-tools (ip=/DHCP)"
        if ident.network_yaml is None:
            raise network.NetworkConfigError("network-config.yaml: missing on the config volume")
        plan = network.parse_netplan(ident.network_yaml, network.present_interfaces())
        network.apply(plan, b.resolv_conf)
        return f"{plan.interface} {','.join(plan.addresses)} gw {plan.gateway or '-'}"

    return BootDeps(quote_source, Cryptsetup(b.cryptsetup), read_identity, setup_network, console=console)


def base_urls(b: BootConfig) -> tuple[str, str]:
    """(mTLS front, public API); the legacy ``validator_url`` puts every call on one host."""
    if b.validator_url:
        return b.validator_url, b.validator_url
    return b.tdx_base_url, b.validator_base_url


def _check_urls(b: BootConfig) -> tuple[str, str]:
    tdx, api = base_urls(b)
    for url in (tdx, api):
        if not url.startswith("https://"):
            # The key and the boot token must never cross the wire in clear, whatever the config says.
            key = "validator_url" if b.validator_url else ("tdx_base_url" if url == tdx else "validator_base_url")
            raise BootFailure("config", f"boot.{key} must be an https:// URL, got {url!r}", EXIT_USAGE)
    return tdx, api


async def prepare(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> BootIdentity:
    """Config volume (identity) and network bring-up."""
    with timer.stage("config"):
        try:
            ident = await asyncio.to_thread(deps.read_identity)
        except ConfigVolumeError as exc:
            raise BootFailure("config", str(exc), EXIT_UNAVAILABLE if exc.missing else EXIT_BAD_INPUT) from None
        status.update(vm_name=ident.vm_name, miner_hotkey=ident.miner_hotkey)
    with timer.stage("network") as st:
        try:
            st.detail = await asyncio.to_thread(deps.setup_network, ident)
        except network.NetworkConfigError as exc:
            raise BootFailure("network", str(exc), EXIT_BAD_INPUT) from None
        if st.detail.startswith("skipped"):
            st.result = "skipped"
    return ident


def tls_setup(b: BootConfig) -> frozenset[bytes]:
    """The SPKI pins (validated once, before any connection)."""
    try:
        return parse_pins(b.tls_pin_spki)
    except TlsConfigError as exc:
        raise BootFailure("config", str(exc), EXIT_USAGE) from None


def client_ctx(b: BootConfig, identity: ClientIdentity | None) -> ssl.SSLContext:
    try:
        return ssl_context(identity, b.ca_bundle)
    except TlsConfigError as exc:
        raise BootFailure("config", f"boot.ca_bundle: {exc}", EXIT_USAGE) from None


async def _boot(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> None:
    b = cfg.boot
    tdx_url, _api_url = _check_urls(b)
    pins = tls_setup(b)
    ident = await prepare(cfg, deps, timer, status)
    with timer.stage("client_cert") as st:
        identity = make_identity()
        ctx = client_ctx(b, identity)
        st.detail = f"ECDSA P-256, SPKI sha256 {identity.spki_sha256.hex()[:16]}…"
    budget = CallBudget(RetryPolicy(b.max_attempts, b.total_timeout_s, b.backoff_s, b.backoff_max_s),
                        timer, deps.sleep)
    ex = Exchange(deps.quote_source, timer, budget, status, ident.vm_name, ident.miner_hotkey, b.allow_quote_v5)
    async with ValidatorClient(tdx_url, ctx, b.request_timeout_s, pins) as client:
        shape = Shape(client, client, nonce_query=True, first_boot=None)

        def count(n: int) -> None:
            status["attempts"] = n

        resp = await budget.retried("attestation", "attestation",
                                    lambda n: ex.attest_once(shape, identity.cert, n), on_attempt=count)
        try:
            try:
                await unlock_root(b, deps.cryptsetup, timer, status, resp.key)
            finally:
                resp.key.wipe()
            if b.cache_enabled:
                await cache_volume_stage(b, deps.cryptsetup, timer, budget, client, ident.vm_name,
                                         ident.miner_hotkey, resp.boot_token, status)
            with timer.stage("handoff") as st:
                paths = write_handoff(b.handoff_dir, ident.vm_name, ident.miner_hotkey, resp.boot_token)
                st.detail = ", ".join(paths)
        finally:
            resp.wipe()


async def run_boot(cfg: AgentConfig, deps: BootDeps, *, poweroff: bool, force_poweroff: bool = False) -> BootOutcome:
    """Run the whole flow; on failure announce ``TDX-LUKS-UNLOCK-FAILED`` and (if asked) power off."""
    timer = StageTimer(deps.console)
    started = dt.datetime.now(dt.UTC)
    status: dict[str, Any] = {
        "outcome": "running", "started_at": started.isoformat(), "quote_source": deps.quote_source.name,
        "unlock_action": cfg.boot.unlock_action, "validator_url": base_urls(cfg.boot)[0],
    }
    outcome = BootOutcome(True, 0)
    try:
        await _boot(cfg, deps, timer, status)
    except BootFailure as exc:
        outcome = BootOutcome(False, exc.exit_code, f"{exc.stage}: {exc.reason}")
    except Exception as exc:  # a bug must still fail closed, with a reason
        log.exception("boot.internal_error")
        outcome = BootOutcome(False, EXIT_FAILED, f"internal: {type(exc).__name__}: {exc}")
    status.update(
        outcome="unlocked" if outcome.ok else "failed", reason=outcome.reason or None,
        finished_at=dt.datetime.now(dt.UTC).isoformat(), stages=[r.to_dict() for r in timer.records],
        timings=timer.totals(getattr(deps.cryptsetup, "elapsed_s", 0.0)),
    )
    outcome.status = status
    try:
        write_status(cfg.serve.boot_status_path, status)
    except OSError as exc:
        log.warning("boot.status_write_failed", path=cfg.serve.boot_status_path, error=str(exc))
    log.info("boot.done", outcome=status["outcome"], reason=outcome.reason or None, **status["timings"])
    if not outcome.ok:
        outcome.failure_line = failure.announce(outcome.reason, cfg.boot.kmsg_path, deps.console)
        if poweroff:
            failure.power_off(force_poweroff, deps.console)
    return outcome
