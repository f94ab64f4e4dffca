"""The boot flow (architecture.md, Flows → Boot), stage by stage, failing closed.

config volume → network → ephemeral mTLS identity → [nonce → report_data → quote → self-check →
attestation] with retries → LUKS2 header check → unlock → cache volume → hand-off files.
Hardware and tools come in through :class:`BootDeps`, so tests run this exact code against the
faithful validator, an emulated configfs-tsm and real cryptsetup on image files.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.boot import failure, network
from agent.boot.client_cert import make_identity, ssl_context
from agent.boot.config_volume import BootIdentity, ConfigVolumeError, read_config_volume
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.failure import BootFailure
from agent.boot.handoff import write_handoff, write_status
from agent.boot.luks_header import HeaderSummary, LuksHeaderError
from agent.boot.stages import StageTimer
from agent.boot.volumes import private_header_copy, setup_cache_volume, validate_header_copy
from agent.config import AgentConfig
from agent.evidence.base import QuoteSource, QuoteSourceError
from agent.evidence.report_data import ReportDataError, build_report_data
from agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, EXIT_VERIFY_FAILED
from agent.log import Secret, get_logger
from agent.quote import QuoteError, parse_quote
from agent.validator.client import ValidatorClient
from agent.validator.errors import ValidatorError, ValidatorTransportError
from agent.validator.retry import Action, RetryPolicy
from agent.validator.schemas import BootAttestationResponse

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


class _Attestor:
    """The retried nonce → quote → attestation exchange."""

    def __init__(self, cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> None:
        self.cfg, self.deps, self.timer, self.status = cfg, deps, timer, status
        b = cfg.boot
        self.policy = RetryPolicy(b.max_attempts, b.total_timeout_s, b.backoff_s, b.backoff_max_s)
        self.t0 = time.monotonic()

    def remaining(self) -> float:
        return self.cfg.boot.total_timeout_s - (time.monotonic() - self.t0)

    async def call(self, endpoint: str, coro: Awaitable[Any]) -> Any:
        """Bound one request by the remaining total budget too."""
        left = self.remaining()
        if left <= 0:
            raise ValidatorTransportError(endpoint, "total time budget exhausted")
        try:
            return await asyncio.wait_for(coro, timeout=left)
        except TimeoutError:
            raise ValidatorTransportError(endpoint, "total time budget exhausted") from None

    async def attest(self, client: ValidatorClient, ident: BootIdentity, cert: Any) -> BootAttestationResponse:
        attempt = 0
        while True:
            attempt += 1
            self.status["attempts"] = attempt
            try:
                return await self._once(client, ident, cert, attempt)
            except QuoteSourceError as exc:
                if not exc.retryable:
                    raise BootFailure("quote", f"quote: {exc}", EXIT_UNAVAILABLE) from None
                err_text, decision = str(exc), self.policy.decide(
                    ValidatorTransportError("quote", str(exc)), attempt, time.monotonic() - self.t0)
            except ValidatorError as exc:
                err_text, decision = str(exc), self.policy.decide(exc, attempt, time.monotonic() - self.t0)
            log.warning("boot.retry", attempt=attempt, error=err_text, action=decision.action.value,
                        delay_s=round(decision.delay_s, 3), why=decision.why)
            if decision.action is Action.STOP:
                raise BootFailure("attestation", f"attestation failed after {attempt} attempt(s): {err_text}; "
                                                 f"{decision.why}")
            with self.timer.stage("backoff", attempt=attempt) as st, st.waiting("backoff"):
                st.detail = f"{decision.delay_s:.2f}s ({decision.why})"
                await self.deps.sleep(decision.delay_s)

    async def _once(
        self, client: ValidatorClient, ident: BootIdentity, cert: Any, attempt: int,
    ) -> BootAttestationResponse:
        with self.timer.stage("nonce", attempt=attempt) as st, st.waiting("network"):
            nonce = (await self.call("GET /servers/nonce", client.get_nonce(ident.miner_hotkey))).nonce
            st.detail = f"nonce {nonce[:8]}…"
        with self.timer.stage("quote", attempt=attempt) as st:
            try:
                rd = build_report_data(nonce, cert)
            except ReportDataError as exc:
                raise BootFailure("quote", f"report_data: {exc}") from None
            with st.waiting("quote"):
                raw = await asyncio.to_thread(self.deps.quote_source.get_quote, rd)
            st.detail = f"{len(raw)} bytes from {self.deps.quote_source.name}"
        with self.timer.stage("self_check", attempt=attempt) as st:
            try:
                q = parse_quote(raw)
            except QuoteError as exc:
                raise BootFailure("self_check", f"own quote does not parse: {exc}", EXIT_VERIFY_FAILED) from None
            if bytes(q.report_data) != rd:
                raise BootFailure("self_check",
                                  "own quote: report_data differs from nonce || SHA-256(client cert SPKI)",
                                  EXIT_VERIFY_FAILED)
            if q.debug:
                raise BootFailure("self_check", "own quote: TD DEBUG attribute is set; refusing to request keys",
                                  EXIT_VERIFY_FAILED)
            self.status["measurements"] = {
                "quote_version": q.version, "mr_td": q.mr_td.hex(),
                **{f"rtmr{i}": getattr(q, f"rtmr{i}").hex() for i in range(4)}, "debug": bool(q.debug),
            }
            st.detail = f"v{q.version} report_data ok, debug off"
        quote_b64 = base64.b64encode(raw).decode("ascii")
        with self.timer.stage("attestation", attempt=attempt) as st, st.waiting("network"):
            resp: BootAttestationResponse = await self.call(
                "POST /servers/boot/attestation",
                client.boot_attestation(nonce, quote_b64, ident.vm_name, ident.miner_hotkey),
            )
            self.status["validator_fields"] = resp.fields_seen
            st.detail = "fields: " + ",".join(resp.fields_seen)
        return resp

    async def volume_key(self, client: ValidatorClient, method: str, ident: BootIdentity, token: Secret) -> Secret:
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.timer.stage(f"cache_key_{method.lower()}", attempt=attempt) as st, st.waiting("network"):
                    resp = await self.call(f"{method} /servers/{{vm_name}}/luks",
                                           client.volume_key(method, ident.vm_name, ident.miner_hotkey, token))
                return resp.passphrase
            except ValidatorError as exc:
                decision = self.policy.decide(exc, attempt, time.monotonic() - self.t0)
                log.warning("boot.retry", attempt=attempt, error=str(exc), action=decision.action.value,
                            delay_s=round(decision.delay_s, 3), why=decision.why)
                if decision.action is Action.STOP:
                    raise BootFailure("cache_volume", f"cache volume key: {exc}; {decision.why}") from None
                with self.timer.stage("backoff", attempt=attempt) as st, st.waiting("backoff"):
                    await self.deps.sleep(decision.delay_s)


def _header_dict(h: HeaderSummary | None) -> dict[str, Any] | None:
    if h is None:
        return None
    return {"uuid": h.uuid, "label": h.label, "cipher": h.cipher, "sector_size": h.sector_size,
            "key_size": h.key_size, "keyslots": h.keyslots, "metadata_sha256": h.json_sha256}


async def _boot(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> None:
    b = cfg.boot
    if not b.validator_url.startswith("https://"):
        # The key and the boot token must never cross the wire in clear, whatever the config says.
        raise BootFailure("config", f"boot.validator_url must be an https:// URL, got {b.validator_url!r}",
                          EXIT_USAGE)
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
    with timer.stage("client_cert") as st:
        identity = make_identity()
        ctx = ssl_context(identity, b.ca_bundle)
        st.detail = f"ECDSA P-256, SPKI sha256 {identity.spki_sha256.hex()[:16]}…"
    attestor = _Attestor(cfg, deps, timer, status)
    async with ValidatorClient(b.validator_url, ctx, b.request_timeout_s) as client:
        resp = await attestor.attest(client, ident, identity.cert)
        try:
            action = b.unlock_action
            try:
                with private_header_copy(deps.cryptsetup, b.root_device, b.header_dir) as hdr:
                    with timer.stage("luks_header") as st:
                        summary = validate_header_copy(deps.cryptsetup, hdr)
                        status["root_header"] = _header_dict(summary)
                        st.detail = f"LUKS2 {summary.cipher} key {summary.key_size * 8} bits, " \
                                    f"{len(summary.keyslots)} keyslot(s)"
                    with timer.stage("unlock") as st:
                        await asyncio.to_thread(deps.cryptsetup.open, b.root_device, b.root_mapper, resp.key,
                                                header=hdr, test_only=(action == "test-passphrase"))
                        st.detail = (f"passphrase confirmed (--test-passphrase) for {b.root_device}"
                                     if action == "test-passphrase"
                                     else f"{b.root_device} → /dev/mapper/{b.root_mapper}")
            except LuksHeaderError as exc:
                raise BootFailure("luks_header", f"root volume header refused: {exc}", EXIT_VERIFY_FAILED) from None
            except CryptsetupError as exc:
                what = "the validator's key does not open the root volume" if exc.wrong_key else "unlock failed"
                raise BootFailure("unlock", f"{what} ({exc})") from None
            finally:
                resp.key.wipe()
            status["unlocked"] = {"root": b.root_device, "action": action}
            if b.cache_enabled:
                with timer.stage("cache_volume") as st:
                    if resp.boot_token is None:
                        st.result, st.detail = "skipped", "validator sent no boot_token (newer generation)"
                    else:
                        token = resp.boot_token

                        async def fetch(method: str) -> Secret:
                            return await attestor.volume_key(client, method, ident, token)

                        try:
                            cache = await setup_cache_volume(
                                deps.cryptsetup, device=b.cache_device, label=b.cache_label, wait_s=b.device_wait_s,
                                mapper=b.cache_mapper, header_dir=b.header_dir, action=action, fetch_key=fetch,
                                pbkdf=b.format_pbkdf, iterations=b.format_pbkdf_iterations,
                            )
                        except LuksHeaderError as exc:
                            raise BootFailure("cache_volume", f"cache volume header refused: {exc}",
                                              EXIT_VERIFY_FAILED) from None
                        except CryptsetupError as exc:
                            raise BootFailure("cache_volume", f"cache volume: {exc}") from None
                        if cache.device is None:
                            st.result, st.detail = "skipped", f"no volume labelled {b.cache_label!r}"
                        else:
                            kind = "formatted, first boot" if cache.first_boot else "existing"
                            st.detail = f"{cache.device} ({kind})"
                            status["cache"] = {"device": cache.device, "first_boot": cache.first_boot,
                                               "header": _header_dict(cache.header)}
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
        "unlock_action": cfg.boot.unlock_action, "validator_url": cfg.boot.validator_url,
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
