"""The boot flow (docs/architecture.md; docs/reference/chutes-vm-generations.md §4), stage by stage, failing closed.

config volume → network → TEE (TDX or SEV-SNP, as Chutes' next decides it after the network) → ephemeral
mTLS identity → [nonce → report_data → quote → self-check → attestation] with retries → LUKS2 header check →
unlock → cache volume → hand-off files.
Hardware and tools come in through :class:`BootDeps`, so tests run this exact code against the
faithful validator, an emulated configfs-tsm and real cryptsetup on image files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import os
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric import rsa

from agent.boot import failure, generations, network, rotation, vm_ca
from agent.boot.client_cert import ClientIdentity, ssl_context
from agent.boot.config_volume import BootIdentity, ConfigVolumeError, read_config_volume
from agent.boot.cryptsetup import Cryptsetup, CryptsetupError
from agent.boot.exchange import Exchange, Shape
from agent.boot.failure import BootFailure
from agent.boot.handoff import remove_handoff_file, write_status
from agent.boot.retrying import CallBudget
from agent.boot.stages import StageTimer
from agent.config import AgentConfig, BootConfig
from agent.errors import AgentError
from agent.evidence.base import QuoteSource
from agent.evidence.mr_register import MeasurementRegister
from agent.evidence.own_quote import TDX, TEE_NAMES, tee_resolution
from agent.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from agent.log import get_logger
from agent.validator.client import ValidatorClient
from agent.validator.proof import proof_headers
from agent.validator.retry import RetryPolicy
from agent.validator.schemas import BootAttestationResponse, classify_generation
from agent.validator.transport import TlsConfigError, parse_pins

log = get_logger(__name__)



@dataclass
class BootDeps:
    """Everything the flow touches outside itself."""

    #: The evidence source; None = made by the boot itself after the network is up (``tee`` stage), so the TEE
    #: is probed then, as Chutes' next does (``make_quote_source``: configfs-tsm for the resolved TEE).
    quote_source: QuoteSource | None
    cryptsetup: Cryptsetup
    read_identity: Callable[[], BootIdentity]
    setup_network: Callable[[BootIdentity], str]
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    console: TextIO | None = None
    #: The client identity's key generation, when the caller started it even earlier (the CLI starts it
    #: before importing the flow, so RSA-4096 also overlaps the interpreter's imports).
    keygen: concurrent.futures.Future[ClientIdentity] | None = None
    #: RTMR3, for the rootfs measurement and the kubeconfig event; None = ``rtmr.sysfs_path``.
    rtmr3: MeasurementRegister | None = None


@dataclass
class BootOutcome:
    ok: bool
    exit_code: int
    reason: str = ""
    failure_line: str = ""
    status: dict[str, Any] = field(default_factory=dict)


def default_deps(cfg: AgentConfig, quote_source: QuoteSource | None = None,
                 console: TextIO | None = None) -> BootDeps:
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


def legacy_base_url(b: BootConfig) -> str:
    """The legacy attestation proxy: the only front serving 1.3.x ``luks/attest`` (reference §12.4)."""
    return b.validator_url or b.legacy_tdx_base_url


def _check_urls(b: BootConfig) -> tuple[str, str, str]:
    tdx, api = base_urls(b)
    legacy = legacy_base_url(b)
    named = (("tdx_base_url", tdx), ("validator_base_url", api), ("legacy_tdx_base_url", legacy))
    for name, url in named:
        if not url.startswith("https://"):
            # The key and the boot token must never cross the wire in clear, whatever the config says.
            key = "validator_url" if b.validator_url else name
            raise BootFailure("config", f"boot.{key} must be an https:// URL, got {url!r}", EXIT_USAGE)
    return tdx, api, legacy


async def resolve_tee_stage(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> str:
    """Which TEE this guest is, decided after the network is up as Chutes' next does (§12.8, sev-snp.md §5.1).

    Without a source yet (``BootDeps.quote_source`` None, the ``boot`` command) it is made here
    (:func:`agent.evidence.sources.make_quote_source`): ``quote.tee = "auto"`` probes the TDX guest device,
    else the SEV guest device, neither: fail closed. With a production configfs-tsm source made earlier the
    devices are probed again now and must agree with it. Any other source (simulated, emulated in tests)
    says what it is. Recorded as ``tee`` / ``tee_resolved`` in the boot status, printed as the ``tee`` stage.
    """
    with timer.stage("tee") as st:
        made_now = deps.quote_source is None
        if made_now:
            from agent.evidence.sources import make_quote_source

            try:
                deps.quote_source = await asyncio.to_thread(make_quote_source, cfg)
            except AgentError as exc:  # TeeUnavailableError (neither device), a configuration error
                raise BootFailure("tee", str(exc), exc.exit_code) from None
            except (ValueError, OSError) as exc:
                raise BootFailure("tee", f"quote source unavailable: {exc}", EXIT_UNAVAILABLE) from None
            status["quote_source"] = deps.quote_source.name
        source = deps.quote_source
        name = str(getattr(source, "name", "") or "")
        have = str(getattr(source, "tee", TDX))
        if name == "configfs" and not made_now:
            from agent.evidence.tee import resolve_tee

            try:
                tee = await asyncio.to_thread(resolve_tee, cfg.quote)
            except AgentError as exc:  # TeeUnavailableError: neither device, fail closed
                raise BootFailure("tee", str(exc), exc.exit_code) from None
            if tee != have:
                raise BootFailure("tee", f"this guest is {TEE_NAMES.get(tee, tee)} but the quote source was set "
                                  f"up for {TEE_NAMES.get(have, have)} (quote.tee)", EXIT_UNAVAILABLE)
        else:
            tee = have
        if tee not in TEE_NAMES:
            raise BootFailure("tee", f"quote source {name or '?'} names an unknown TEE {tee!r}", EXIT_UNAVAILABLE)
        how = tee_resolution(cfg.quote, tee, name)
        status.update(tee=tee, tee_resolved=how)
        st.detail = f"{TEE_NAMES[tee]} ({how})"
    return tee


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


#: Which key the boot presents, started early (kept as a name here so the benchmark can swap it).
start_identity = vm_ca.start_boot_identity


async def first_boot_flag(cfg: AgentConfig, deps: BootDeps, timer: StageTimer) -> bool:
    """``first_boot`` for the 1.4.0 request: token 15 on the root device (§4.3 step 3)."""
    with timer.stage("first_boot") as st:
        try:
            flag = await asyncio.to_thread(rotation.is_first_boot, deps.cryptsetup, cfg.boot.root_device)
        except CryptsetupError as exc:
            raise BootFailure("first_boot", f"cannot read LUKS2 token 15 on {cfg.boot.root_device}: {exc}") from None
        st.detail = f"first_boot={str(flag).lower()}"
        return flag


async def _shape(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, ident: BootIdentity,
                 clients: generations.Clients) -> Shape:
    """The request shape: 1.4.0 when a miner key is there (auto) or pinned, else the ≤1.3 shape."""
    p = cfg.boot.protocol
    if p == "1.4" and ident.signer is None:
        raise BootFailure("config", "boot.protocol = \"1.4\" needs miner-seed or miner-private-key on the "
                          "config volume", EXIT_BAD_INPUT)
    if ident.signer is not None and p in ("auto", "1.4"):
        signer = ident.signer
        return Shape(clients.tdx, clients.tdx, nonce_query=True, first_boot=await first_boot_flag(cfg, deps, timer),
                     sign=lambda nonce, body: proof_headers(signer, nonce, body))
    return Shape(clients.api_mtls, clients.tdx, nonce_query=False, first_boot=None)


async def _identity(keygen: concurrent.futures.Future[ClientIdentity], timer: StageTimer) -> ClientIdentity:
    with timer.stage("client_cert") as st:
        with st.waiting("keygen"):
            identity = await asyncio.wrap_future(keygen)
        key = identity.key
        kind = f"RSA-{key.key_size}" if isinstance(key, rsa.RSAPrivateKey) else "ECDSA P-256"
        st.detail = f"{kind}, SPKI sha256 {identity.spki_sha256.hex()[:16]}…"
    return identity


async def _boot(cfg: AgentConfig, deps: BootDeps, timer: StageTimer, status: dict[str, Any]) -> None:
    b = cfg.boot
    tdx_url, api_url, legacy_url = _check_urls(b)
    pins = tls_setup(b)
    keygen = deps.keygen if deps.keygen is not None else start_identity(b.protocol)
    run: generations.Run | None = None
    ident: BootIdentity | None = None
    done = False
    try:
        ident = await prepare(cfg, deps, timer, status)
        tee = await resolve_tee_stage(cfg, deps, timer, status)
        identity = await _identity(keygen, timer)
        # the two RSA-2048 leaf keys (1.4.0) are made meanwhile, during the attestation's network waits
        leaf_keys = [vm_ca.start_in_thread(vm_ca.generate_leaf_key) for _ in range(2)] if b.protocol in (
            "auto", "1.4") and ident.signer is not None else []
        mtls, plain = client_ctx(b, identity), client_ctx(b, None)
        budget = CallBudget(RetryPolicy(b.max_attempts, b.total_timeout_s, b.backoff_s, b.backoff_max_s),
                            timer, deps.sleep)
        assert deps.quote_source is not None  # made by the tee stage at the latest
        ex = Exchange(deps.quote_source, timer, budget, status, ident.vm_name, ident.miner_hotkey, b.allow_quote_v5,
                      tee=tee)
        async with contextlib.AsyncExitStack() as stack:
            clients = generations.Clients(
                *[await stack.enter_async_context(ValidatorClient(u, c, b.request_timeout_s, pins))
                  for u, c in ((tdx_url, mtls), (api_url, mtls), (api_url, plain), (legacy_url, mtls))])
            shape = await _shape(cfg, deps, timer, ident, clients)
            gen_box: list[str] = []

            async def attempt(n: int) -> BootAttestationResponse:
                status["attempts"] = n
                resp = await ex.attest_once(shape, identity.cert, n)
                try:
                    gen_box[:] = [classify_generation(resp, b.protocol)]
                except BaseException:
                    resp.wipe()
                    raise
                return resp

            resp = await budget.retried("attestation", "attestation", attempt)
            gen = gen_box[0]
            status["generation"] = gen
            run = generations.Run(cfg, deps.cryptsetup, timer, status, budget, ex, ident, identity, clients,
                                  deps.sleep, deps.rtmr3 or MeasurementRegister(cfg.rtmr.sysfs_path),
                                  leaf_keys=leaf_keys)
            try:
                await generations.STEPS[gen](run, resp)
            finally:
                resp.wipe()
        done = True
    finally:
        if ident is not None and ident.signer is not None:
            ident.signer.wipe()
        if not done:
            if run is not None and run.ca_written:
                _remove_ca_after_failure(b)
            for name in SECRET_HANDOFF_FILES:  # a failed boot hands nothing on
                remove_handoff_file(b.handoff_dir, name)
        if not keygen.done():
            keygen.cancel()


#: Hand-off files a failed boot removes again (values the validator issued for this boot).
SECRET_HANDOFF_FILES = ("boot-token", "luks-quote-nonce", "cert-hash", "k3s-encryption-config.yaml")


def _remove_ca_after_failure(b: BootConfig) -> None:
    """A failed boot leaves no CA file behind (sek8s premount failure removes both, §7)."""
    try:
        vm_ca.remove_ca(os.path.join(b.handoff_dir, vm_ca.CA_SUBDIR))
    except (OSError, vm_ca.VMCAError) as exc:
        log.error("boot.ca_remove_failed", error=str(exc))


#: Signals that end a running boot like a failure: the same clean-up (the ``finally`` of :func:`_boot`:
#: CA files, secret hand-off files, the miner key), the marker line, power-off if configured, exit 128+n.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def _until_signal(boot: Coroutine[Any, Any, None]) -> None:
    """Run ``boot`` as a task that SIGTERM/SIGINT cancel, so its clean-up runs before the process ends.

    The default actions would end the process at once (SIGTERM) or raise wherever it lands (SIGINT),
    leaving what the boot wrote on tmpfs. Cancelling instead unwinds every ``finally`` on the way out; a
    key-slot change already running in a worker thread finishes (``asyncio.run`` waits for it), one not
    yet started never starts, and an unfinished rotation keeps both keys. A second signal during the
    clean-up is ignored. Raises :class:`BootFailure` naming the signal.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(boot)
    got: list[int] = []

    def stop(signum: int) -> None:
        if not got:
            got.append(signum)
            log.error("boot.signal", signal=signal.Signals(signum).name, action="stopping: clean-up, then exit")
            task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        await task
    except BaseException:
        if not got:
            raise
        name = signal.Signals(got[0]).name
        raise BootFailure("signal", f"stopped by {name} before the boot finished; hand-off secrets wiped",
                          128 + got[0]) from None
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run_boot(cfg: AgentConfig, deps: BootDeps, *, poweroff: bool, force_poweroff: bool = False,
                   handle_signals: bool = False) -> BootOutcome:
    """Run the whole flow; on failure announce ``TDX-LUKS-UNLOCK-FAILED`` and (if asked) power off.

    ``handle_signals`` (the ``boot`` command): SIGTERM/SIGINT stop the boot as a failure (:func:`_until_signal`).
    """
    timer = StageTimer(deps.console)
    started = dt.datetime.now(dt.UTC)
    status: dict[str, Any] = {
        "outcome": "running", "started_at": started.isoformat(),
        "quote_source": deps.quote_source.name if deps.quote_source is not None else cfg.quote.source,
        "unlock_action": cfg.boot.unlock_action, "validator_url": base_urls(cfg.boot)[0],
    }
    outcome = BootOutcome(True, 0)
    marker = failure.MARKER
    reason_code: str | None = None
    try:
        if handle_signals:
            await _until_signal(_boot(cfg, deps, timer, status))
        else:
            await _boot(cfg, deps, timer, status)
    except BootFailure as exc:
        outcome = BootOutcome(False, exc.exit_code, f"{exc.stage}: {exc.detail}")
        marker, reason_code = exc.marker, exc.reason
    except Exception as exc:  # a bug must still fail closed, with a reason
        log.exception("boot.internal_error")
        outcome = BootOutcome(False, EXIT_FAILED, f"internal: {type(exc).__name__}: {exc}")
        reason_code = "boot_internal"
    status.update(
        outcome="unlocked" if outcome.ok else "failed", reason=outcome.reason or None, reason_code=reason_code,
        finished_at=dt.datetime.now(dt.UTC).isoformat(), stages=[r.to_dict() for r in timer.records],
        timings=timer.totals(getattr(deps.cryptsetup, "elapsed_s", 0.0)),
    )
    outcome.status = status
    try:
        write_status(cfg.serve.boot_status_path, status)
    except OSError as exc:
        log.warning("boot.status_write_failed", path=cfg.serve.boot_status_path, error=str(exc))
    log.info("boot.done", outcome=status["outcome"], reason=outcome.reason or None, tee=status.get("tee"),
             **status["timings"])
    if not outcome.ok:
        outcome.failure_line = failure.announce(outcome.reason, cfg.boot.kmsg_path, deps.console, marker)
        if poweroff:
            failure.power_off(force_poweroff, deps.console)
    return outcome
