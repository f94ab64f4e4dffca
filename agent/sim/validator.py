"""A faithful Chutes validator for tests and the demo, all VM generations (chutes-vm-generations.md). NEVER production.

Shape: one real nginx (:mod:`agent.sim.validator_nginx`) with three TLS fronts, as the live validator is
deployed, proxying to this aiohttp app on a unix socket:

- ``cvm`` (:attr:`FaithfulValidator.cvm_url`, ``cvm.chutes.ai``): ``optional_no_ca`` mTLS, client cert
  forwarded as ``X-Client-Cert``, injects ``X-Cvm-Proxy-Auth``; the 1.4.0 ``TDX_BASE_URL``, the agent's
  ``boot.tdx_base_url`` (:attr:`tdx_base_url`) from 1.3 on;
- ``legacy`` (:attr:`url` = :attr:`legacy_url` = :attr:`legacy_tdx_base_url`, the 1.3.x attestation proxy,
  ``tdx-attestation.chutes.ai:8443``): same mTLS, injects ``X-Attestation-Proxy-Auth``; the 1.3.x
  ``TDX_BASE_URL`` (the agent's ``boot.legacy_tdx_base_url``) and the ≤1.2 endpoints;
- ``api`` (:attr:`api_url`, ``api.chutes.ai``, ``VALIDATOR_BASE_URL``): no client certificate, no proxy
  header.

A VM's generation is that of the measurement its boot quote matches (§1, §9): boot quotes need RTMR3 =
48 zero bytes, ``luks/attest`` and ``provision`` quotes the entry's ``runtime_rtmr3``; a runtime quote sent
to boot is refused. An SEV-SNP report in the same ``quote`` field is told apart by its bytes (sev-snp.md
§0.3), verified against :class:`SnpTrust` (the VCEK as AMD's KDS would serve it, the roots configured) and
matched on MEASUREMENT (:class:`SnpMeasurementSet`; no RTMR3 on SNP). Endpoints (route guards as §2
"Guards" and §12.4, enforced per front with the newest validator's 403 texts; checks in the validator's
order; §12.5 status codes and ``{"detail"}`` bodies):

- ``GET /servers/nonce[?miner_hotkey=]`` → ``{"nonce", "expires_at"}``; single use, 600 s, bound to caller
  IP, purpose ``boot`` and the hotkey when given;
- ``POST /servers/boot/attestation`` (``X-Chutes-Nonce``; 1.4 also sr25519 proof headers and
  ``first_boot``) → 1.2 ``{"key", "boot_token"}``; 1.3 ``{"key", "luks_quote_nonce", "boot_token": null}``;
  1.4 adds ``root_next``, ``root_confirm_nonce``, ``vm_auth_ss58``;
- ``POST /servers/{vm}/luks`` (1.2, ``X-Boot-Token``) → ``{volume: passphrase}``; the removed
  ``GET``/``PUT`` cache calls only with ``legacy_luks=True``;
- ``POST /servers/{vm}/luks/attest`` (1.3, legacy front only: elsewhere 403 "This endpoint serves only legacy
  VMs, via the attestation proxy. …") and ``POST /servers/{vm}/provision`` (1.4, cvm front only, signed,
  stores the client CA as ``vm_root_ca_cert``), ``X-Quote-Nonce`` →
  ``{"volumes": {v: {"current", "next"}}, "confirm_nonce", "k3s_encryption_key"}``;
- ``POST /servers/{vm}/luks/confirm`` (1.3, ``X-Confirm-Nonce``) and ``POST /servers/{vm}/provision/confirm``
  (1.4, cvm, signed; also the root rotation confirm) → ``{"status": "confirmed", "volumes": {v: {"result"}}}``;
- ``GET /servers/signing-keys`` (public) → keys signed by a simulated root signing key;
- ``GET /instances/launch_config/{config_id}/nonce`` (``Authorization`` = launch token) → one-time nonce.

Faults (:class:`Fault`) are injectable per endpoint (:data:`ENDPOINTS`). Everything it saw is kept in
:attr:`FaithfulValidator.events` (no secret values) for assertions.

CLI: ``python -m agent.sim.validator --port 8443 --state-dir DIR --vm NAME --hotkey SS58 --root-key-file F``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.log import Secret, get_logger
from agent.sim import validator_nginx as nginx_mod
from agent.sim.validator_routes import (
    ENDPOINTS,
    STATE_KEY,
    make_app,
)
from agent.sim.validator_signing import SigningRoot
from agent.sim.validator_state import (
    CONFIRM_NONCE_TTL_S,
    GENERATIONS,
    NONCE_TTL_S,
    SUPPORTED_VOLUMES,
    ZERO_RTMR,
    AnyMeasurement,
    Fault,
    MeasurementSet,
    SnpMeasurementSet,
    SnpTrust,
    ValidatorState,
    _Vm,
    generation_of,
    simulated_measurement,
    simulated_measurements,
)

if TYPE_CHECKING:
    from agent.validator.proof import Hotkey

__all__ = [
    "CONFIRM_NONCE_TTL_S", "ENDPOINTS", "GENERATIONS", "NONCE_TTL_S", "STATE_KEY", "SUPPORTED_VOLUMES", "ZERO_RTMR",
    "FaithfulValidator", "Fault", "MeasurementSet", "SnpMeasurementSet", "SnpTrust", "ValidatorState",
    "generation_of", "make_app", "simulated_measurement", "simulated_measurements", "simulated_snp_trust",
]

log = get_logger(__name__)


class FaithfulValidator:
    """nginx (three TLS fronts) + the app; ``async with FaithfulValidator(...) as v: v.tdx_base_url``.

    ``generation`` picks the default measurement registry (:func:`simulated_measurement`); pass
    ``measurements`` for a full registry (several generations side by side; SEV-SNP entries are
    :class:`SnpMeasurementSet`). ``port`` is the legacy front's (what :attr:`url` names, as before),
    ``cvm_port``/``api_port`` the others (0 = free port). ``snp`` (:class:`SnpTrust`): how SEV-SNP reports
    are verified (the VCEK "KDS", chain and trusted roots); None = every SNP report is refused.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, root_ca_pem: bytes,
                 measurements: list[AnyMeasurement] | None = None, host: str = "127.0.0.1", port: int = 0,
                 generation: str = "1.2", runtime_rtmr3: str | None = None, legacy_luks: bool = True,
                 cvm_port: int = 0, api_port: int = 0, signing_root: SigningRoot | None = None,
                 snp: SnpTrust | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if measurements is None:
            measurements = [simulated_measurement(generation, runtime_rtmr3)]
        self.generation = generation
        self.state = ValidatorState(root_ca_pem, measurements, legacy_luks=legacy_luks, signing=signing_root, snp=snp)
        self.host = host
        self.port = port or nginx_mod.free_port(host)
        self.cvm_port = cvm_port or nginx_mod.free_port(host)
        self.api_port = api_port or nginx_mod.free_port(host)
        self.tls = nginx_mod.make_test_tls(self.state_dir, host)
        self._runner: web.AppRunner | None = None
        self._nginx: nginx_mod.NginxProcess | None = None

    # ── where the agent points ──────────────────────────────────────────────
    @property
    def url(self) -> str:
        """The legacy front (≤1.2 endpoints; the 1.3.x attestation proxy)."""
        return f"https://{self.host}:{self.port}"

    legacy_url = url

    @property
    def cvm_url(self) -> str:
        return f"https://{self.host}:{self.cvm_port}"

    @property
    def api_url(self) -> str:
        return f"https://{self.host}:{self.api_port}"

    @property
    def legacy_tdx_base_url(self) -> str:
        """``boot.legacy_tdx_base_url``: the legacy attestation proxy, the only front serving 1.3.x
        ``luks/attest`` (§12.4)."""
        return self.url

    @property
    def tdx_base_url(self) -> str:
        """``boot.tdx_base_url`` for this validator's generation: the cvm front from 1.3 on (as the agent's
        default ``https://cvm.chutes.ai``: a 1.3.x boot attests through either mTLS front, its ``luks/attest``
        goes to :attr:`legacy_tdx_base_url`), the legacy proxy for ≤1.2 (its removed endpoints)."""
        return self.url if self.generation == "1.2" else self.cvm_url

    @property
    def validator_base_url(self) -> str:
        """``boot.validator_base_url``: the public API host."""
        return self.api_url

    @property
    def ca_bundle(self) -> str:
        return str(self.tls.ca_pem)

    @property
    def signing_root(self) -> SigningRoot:
        if self.state.signing is None:
            self.state.signing = SigningRoot()
        return self.state.signing

    @property
    def signing_root_pem(self) -> bytes:
        """The simulated root signing key (public PEM) the agent bakes as ``root-signing-key.pem``."""
        return self.signing_root.public_pem

    @property
    def signing_root_pem_path(self) -> str:
        path = self.state_dir / "root-signing-key.pem"
        if not path.exists():
            path.write_bytes(self.signing_root_pem)
        return str(path)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.state.events

    # ── configuration ───────────────────────────────────────────────────────
    def add_vm(self, vm_name: str, hotkey: str, root_passphrase: Secret | None = None) -> Secret:
        """Register a VM, its build root passphrase (returned) and put its hotkey on the subnet."""
        secret = root_passphrase if root_passphrase is not None else Secret(secrets.token_hex(32))
        self.state.vms[vm_name] = _Vm(hotkey, secret)
        if self.state.registered_hotkeys is not None:
            self.state.registered_hotkeys.add(hotkey)
        return secret

    def deregister_hotkey(self, hotkey: str) -> None:
        """Take a hotkey off the subnet (boot/provision then answer 403, or 401 before 1.4)."""
        if self.state.registered_hotkeys is None:
            self.state.registered_hotkeys = set()
        self.state.registered_hotkeys.discard(hotkey)

    def inject(self, endpoint: str, fault: Fault) -> Fault:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint: one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        self.state.faults.setdefault(endpoint, []).append(fault)
        return fault

    def clear_faults(self) -> None:
        self.state.faults.clear()

    def register_launch_config(self, config_id: str, token: str, nonce: str | None = None) -> str:
        """A launch config whose one-time rint nonce is served to ``Authorization: token``."""
        from agent.sim.validator_state import _Launch

        value = nonce or secrets.token_hex(16)
        self.state.launches[config_id] = _Launch(token, value)
        return value

    def advance(self, seconds: float) -> None:
        """Move the validator's clock forward (TTL tests without waiting)."""
        self.state.clock_offset += seconds

    # ── inspection ──────────────────────────────────────────────────────────
    def attestations(self) -> list[dict[str, Any]]:
        return [e for e in self.state.events if e.get("endpoint") == "attestation" and "fault" not in e]

    def calls(self, endpoint: str) -> list[dict[str, Any]]:
        """Events of one endpoint that reached its handler (not answered by a fault)."""
        return [e for e in self.state.events if e.get("endpoint") == endpoint and "fault" not in e]

    def confirmations(self, vm_name: str) -> list[dict[str, str]]:
        """``{volume: promoted|discarded|no_pending}`` of every accepted confirm of a VM, oldest first."""
        return [e["results"] for e in self.state.events
                if e.get("endpoint") in ("luks_confirm", "provision_confirm") and e.get("vm_name") == vm_name
                and "results" in e]

    def vm(self, vm_name: str) -> _Vm:
        return self.state.vms[vm_name]

    def root_key(self, vm_name: str) -> Secret:
        """The root key a non-first boot is handed now (the rotated key, else the build passphrase)."""
        vm = self.state.vms[vm_name]
        return vm.root_stored if vm.root_stored is not None else vm.root

    def key_state(self, vm_name: str) -> dict[str, Any]:
        """Which keys are stored / pending for a VM (booleans and names, never values)."""
        vm = self.state.vms[vm_name]
        return {
            "generation": vm.generation,
            "boots": vm.boots,
            "first_boot": vm.first_boot,
            "root": "rotated" if vm.root_stored is not None else "build",
            "pending_root": vm.pending_root is not None,
            "volumes": {n: {"current": k.current is not None, "pending": k.pending is not None}
                        for n, k in sorted(vm.volumes.items())},
            "k3s_key": vm.k3s_key is not None,
            "vm_root_ca": vm.vm_root_ca_pem is not None,
            "vm_auth_ss58": vm.vm_auth.ss58 if vm.vm_auth is not None else None,
        }

    def volume_key(self, vm_name: str, volume: str, *, pending: bool = False) -> Secret | None:
        keys = self.state.vms[vm_name].volumes.get(volume)
        if keys is None:
            return None
        return keys.pending if pending else keys.current

    def stored_ca(self, vm_name: str) -> x509.Certificate | None:
        """The ``vm_root_ca_cert`` stored from ``/provision`` (None before)."""
        pem = self.state.vms[vm_name].vm_root_ca_pem
        return x509.load_pem_x509_certificate(pem) if pem else None

    def stored_ca_pem(self, vm_name: str) -> bytes | None:
        ca = self.stored_ca(vm_name)
        return ca.public_bytes(Encoding.PEM) if ca is not None else None

    def vm_auth_key(self, vm_name: str) -> Hotkey | None:
        """This boot's per-VM sr25519 signer whose ss58 was ``vm_auth_ss58`` (None before one was made)."""
        return self.state.vms[vm_name].vm_auth

    def nonce_usage(self) -> dict[str, int]:
        """Counters ``{boot_nonce,boot_token,luks_quote_nonce,confirm_nonce}.{issued,consumed,refused,expired}``."""
        return dict(self.state.counters)

    def secret_values(self) -> list[bytes]:
        """Every secret the validator holds or handed out (passphrases, tokens, k3s keys) to scan for leaks."""
        out: list[bytes] = [t.encode() for t in self.state.boot_tokens]
        for vm in self.state.vms.values():
            out += vm.secret_values()
        out += self.state.handed_out
        return [s for s in dict.fromkeys(out) if s]

    # ── life cycle ──────────────────────────────────────────────────────────
    def _fronts(self) -> list[nginx_mod.Front]:
        st = self.state
        common = ((nginx_mod.FRONT_AUTH_HEADER, st.front_auth),)
        return [
            nginx_mod.Front("legacy", self.port, True, (*common, (nginx_mod.PROXY_AUTH_HEADER, st.proxy_auth))),
            nginx_mod.Front("cvm", self.cvm_port, True, (*common, (nginx_mod.CVM_AUTH_HEADER, st.cvm_auth))),
            nginx_mod.Front("api", self.api_port, False, common),
        ]

    async def start(self) -> FaithfulValidator:
        sock = self.state_dir / "validator-app.sock"
        self._runner = web.AppRunner(make_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(sock))
        await site.start()
        os.chmod(sock, 0o600)
        fronts = self._fronts()
        conf = nginx_mod.nginx_conf(self.state_dir, self.tls, self.host, fronts, sock)
        self._nginx = nginx_mod.NginxProcess(self.state_dir, conf, self.host, [f.port for f in fronts])
        await asyncio.to_thread(self._nginx.start)
        log.info("sim.validator_started", url=self.url, cvm_url=self.cvm_url, api_url=self.api_url,
                 generation=self.generation, state_dir=str(self.state_dir))
        return self

    async def stop(self) -> None:
        if self._nginx is not None:
            await asyncio.to_thread(self._nginx.stop)
            self._nginx = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for vm in self.state.vms.values():
            vm.wipe()

    async def __aenter__(self) -> FaithfulValidator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def simulated_snp_trust(sim_state_dir: str | os.PathLike[str]) -> tuple[SnpTrust, str]:
    """(:class:`SnpTrust` for the simulated AMD chips in ``sim_state_dir``, their guests' MEASUREMENT hex).

    The VCEKs as AMD's KDS would serve them, the ASK/ARK chain, and the simulated ARKs as the only trusted
    roots: for tests and the demo, passed explicitly (a validator is never given it by default).
    """
    from agent.sim.snp_sim import sim_kds

    kds = sim_kds(sim_state_dir)
    return SnpTrust(veks=dict(kds.veks), chain_pem=kds.chain_pem, arks=list(kds.arks)), kds.measurement.hex()


def _read_key_file(path: str) -> Secret:
    with open(path, "rb") as fh:
        return Secret(fh.read().rstrip(b"\n"))


async def _serve(args: argparse.Namespace) -> int:
    from agent.sim.quote_sim import load_or_create_sim_pki

    root = Path(args.root_ca).read_bytes() if args.root_ca else load_or_create_sim_pki(args.sim_state_dir).root_ca_pem
    measurements: list[AnyMeasurement] | None = None
    if args.measurements:
        measurements = [MeasurementSet(**m) for m in json.loads(Path(args.measurements).read_text())]
    v = FaithfulValidator(args.state_dir, root_ca_pem=root, measurements=measurements, host=args.host, port=args.port,
                          generation=args.generation, runtime_rtmr3=args.runtime_rtmr3,
                          legacy_luks=args.legacy_luks, cvm_port=args.cvm_port, api_port=args.api_port)
    if args.vm:
        if not (args.hotkey and args.root_key_file):
            print("--vm needs --hotkey and --root-key-file", file=sys.stderr)
            return 2
        v.add_vm(args.vm, args.hotkey, _read_key_file(args.root_key_file))
    await v.start()
    print(json.dumps({"url": v.url, "tdx_base_url": v.tdx_base_url, "validator_base_url": v.validator_base_url,
                      "legacy_tdx_base_url": v.legacy_tdx_base_url, "cvm_url": v.cvm_url, "api_url": v.api_url,
                      "ca_bundle": v.ca_bundle,
                      "signing_root_pem": v.signing_root_pem_path, "state_dir": str(v.state_dir)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await v.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.sim.validator", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443, help="legacy attestation-proxy front")
    p.add_argument("--cvm-port", type=int, default=0, help="cvm front (0 = free port)")
    p.add_argument("--api-port", type=int, default=0, help="public api front (0 = free port)")
    p.add_argument("--state-dir", required=True, help="TLS files, nginx config and logs go here")
    p.add_argument("--sim-state-dir", default="/var/lib/chutes-attest/sim",
                   help="simulated PCK chain (same as quote.simulated_state_dir); its root verifies quotes")
    p.add_argument("--root-ca", help="PEM root CA for quote verification instead of the simulated one")
    p.add_argument("--generation", choices=GENERATIONS, default="1.2", help="generation of the default measurement")
    p.add_argument("--runtime-rtmr3", help="96 hex: runtime RTMR3 of the default measurement")
    p.add_argument("--legacy-luks", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the removed GET/PUT /servers/{vm}/luks cache calls")
    p.add_argument("--measurements", help="JSON list of measurement sets (default: the simulated one)")
    p.add_argument("--vm", help="VM name to register")
    p.add_argument("--hotkey", help="its miner hotkey")
    p.add_argument("--root-key-file", help="file holding its root LUKS passphrase (keep it 0600)")
    args = p.parse_args(argv)
    from agent import log as log_mod

    log_mod.configure("info", "console")
    return asyncio.run(_serve(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

