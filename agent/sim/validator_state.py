"""State of the faithful validator: measurement registry, nonce stores, per-VM key state, faults.

Kept apart from the HTTP app (:mod:`agent.sim.validator`) so the rules that decide a VM's generation
and its key life cycle (chutes-vm-generations.md §1, §5, §9) read in one place. NEVER production.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from agent.log import Secret

if TYPE_CHECKING:
    from agent.sim.validator_signing import SigningRoot
    from agent.validator.proof import Hotkey

ZERO_RTMR = "0" * 96
TDX = "tdx"
SNP = "snp"
GENERATIONS = ("1.2", "1.3", "1.4")
SUPPORTED_VOLUMES = ("storage", "tdx-cache")
#: TTLs of the validator's Redis keys (§5 "Validator state").
NONCE_TTL_S = 600.0
BOOT_TOKEN_TTL_S = 600.0
LUKS_QUOTE_NONCE_TTL_S = 600.0
CONFIRM_NONCE_TTL_S = 300.0
FRONTS = ("cvm", "legacy", "api")
FAULT_KINDS = ("status", "delay", "garbage", "truncated", "drop", "replay_nonce", "redirect", "missing_fields",
               "override", "bad_signature", "split")
_HEX96 = re.compile(r"[0-9a-fA-F]{96}")


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.4.0"``, ``"1.4"``, ``"0.0.0-sim"`` → a comparable triple (leading digits of each part)."""
    parts = []
    for piece in version.split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group()) if m else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def generation_of(version: str) -> str:
    """The API generation a measurement version speaks (§1: <1.3 boot_token, 1.3.x luks/attest, ≥1.4.0)."""
    v = parse_version(version)
    if v < (1, 3, 0):
        return "1.2"
    if v < (1, 4, 0):
        return "1.3"
    return "1.4"


def rtmr3_chain(digests: Iterable[bytes]) -> bytes:
    """RTMR3 after extending zero with each 48-byte digest in order (§6)."""
    value = bytes(48)
    for d in digests:
        if len(d) != 48:
            raise ValueError(f"rtmr3_chain: digests are 48 bytes (SHA-384), got {len(d)}")
        value = hashlib.sha384(value + d).digest()
    return value


#: The runtime RTMR3 the simulated ≥1.3 measurements register when a test gives none: one measured file.
SIM_RUNTIME_RTMR3 = rtmr3_chain([hashlib.sha384(b"chutes-attest simulated rootfs file").digest()]).hex()
_SIM_VERSIONS = {"1.2": "1.2.0-sim", "1.3": "1.3.1-sim", "1.4": "1.4.0-sim"}
_SIM_NAMES = {"1.2": "simulated-dev", "1.3": "simulated-1.3", "1.4": "simulated-1.4"}  # 1.2 kept its old name


class MeasuredQuote(Protocol):
    """The registers a measurement set compares: a parsed Quote, or the validator's fixed-offset v4 view."""

    @property
    def mr_td(self) -> bytes: ...
    @property
    def rtmr0(self) -> bytes: ...
    @property
    def rtmr1(self) -> bytes: ...
    @property
    def rtmr2(self) -> bytes: ...
    @property
    def rtmr3(self) -> bytes: ...


@dataclass
class MeasurementSet:
    """One ``TeeMeasurementConfig`` entry (§9): boot quotes match RTMR3 = 0, runtime quotes ``runtime_rtmr3``."""

    name: str
    version: str
    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    runtime_rtmr3: str = ZERO_RTMR
    rc: bool = False
    authorized_hotkeys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "runtime_rtmr3"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX96.fullmatch(value):
                raise ValueError(f"MeasurementSet.{name}: expected 96 hex characters, got {value!r}")
            setattr(self, name, value.lower())
        self.authorized_hotkeys = tuple(self.authorized_hotkeys)

    @property
    def generation(self) -> str:
        return generation_of(self.version)

    def rtmrs(self, *, runtime: bool) -> tuple[bytes, bytes, bytes, bytes]:
        """RTMR0–3 a quote must carry to match (for building simulated quote sources)."""
        r3 = self.runtime_rtmr3 if runtime else ZERO_RTMR
        return (bytes.fromhex(self.rtmr0), bytes.fromhex(self.rtmr1), bytes.fromhex(self.rtmr2), bytes.fromhex(r3))

    def matches(self, q: MeasuredQuote | SnpMeasured, *, runtime: bool = False) -> bool:
        if getattr(q, "tee", TDX) != TDX or isinstance(q, SnpMeasured):  # an SNP report matches SNP entries only
            return False
        want = (self.mrtd, *(r.hex() for r in self.rtmrs(runtime=runtime)))
        got = (q.mr_td, q.rtmr0, q.rtmr1, q.rtmr2, q.rtmr3)
        return all(bytes(g).hex() == w for g, w in zip(got, want, strict=True))


@runtime_checkable
class SnpMeasured(Protocol):
    """What an SEV-SNP entry compares: the verified report's MEASUREMENT (the launch digest)."""

    @property
    def tee(self) -> str: ...
    @property
    def measurement(self) -> bytes: ...


@dataclass
class SnpMeasurementSet:
    """One SEV-SNP entry, as measurements.yaml publishes it (``snp: {hardware: [{measurement, ...}]}``,
    sev-snp.md §5.4): the 48-byte launch digest MEASUREMENT. There is no RTMR3 on SNP, so boot and runtime
    reports match the same value (the root is checked inside the measured initramfs instead, §5.2)."""

    name: str
    version: str
    measurement: str
    rc: bool = False
    authorized_hotkeys: tuple[str, ...] = ()
    tee: ClassVar[str] = SNP

    def __post_init__(self) -> None:
        if not isinstance(self.measurement, str) or not _HEX96.fullmatch(self.measurement):
            raise ValueError(f"SnpMeasurementSet.measurement: expected 96 hex characters, got {self.measurement!r}")
        self.measurement = self.measurement.lower()
        self.authorized_hotkeys = tuple(self.authorized_hotkeys)

    @property
    def generation(self) -> str:
        return generation_of(self.version)

    def matches(self, q: Any, *, runtime: bool = False) -> bool:
        """Runtime or boot: the same MEASUREMENT (``runtime`` is accepted for the registry's one signature)."""
        return getattr(q, "tee", TDX) == SNP and bytes(q.measurement).hex() == self.measurement


#: Any registry entry.
AnyMeasurement = MeasurementSet | SnpMeasurementSet


@dataclass
class SnpTrust:
    """How this validator verifies SEV-SNP reports, standing in for what the production API does (sev-snp.md
    §0.3, §5.5): it fetches the VCEK from AMD's KDS itself (the VM sends no certificate table), here a table
    ``CHIP_ID hex -> VCEK DER``; the ASK/ARK chain (KDS ``cert_chain``: PEM; None = the agent's packaged AMD
    chain of the product line); and the roots it trusts (None = AMD's pinned ARKs). Never present by
    default: a validator without one refuses every SNP report, and the simulated AMD chain is trusted only
    where a test or the demo passes it explicitly (as the simulated PCK root is for TDX)."""

    veks: dict[str, bytes] = field(default_factory=dict)
    chain_pem: bytes | None = None
    arks: list[Any] | None = None

    def vek_for(self, chip_id: bytes) -> bytes | None:
        return self.veks.get(bytes(chip_id).hex())


def simulated_measurement(generation: str = "1.2", runtime_rtmr3: str | None = None) -> MeasurementSet:
    """An entry matching :mod:`agent.sim.quote_sim`'s default MRTD/RTMR0–2, registered for ``generation``.

    ``runtime_rtmr3`` defaults to zero for 1.2 (those images register RTMR3 = 0 at runtime) and to
    :data:`SIM_RUNTIME_RTMR3` for ≥1.3 (the rootfs chain has run).
    """
    from agent.sim import quote_sim

    if generation not in GENERATIONS:
        raise ValueError(f"generation: one of {', '.join(GENERATIONS)}, got {generation!r}")
    if runtime_rtmr3 is None:
        runtime_rtmr3 = ZERO_RTMR if generation == "1.2" else SIM_RUNTIME_RTMR3
    r = quote_sim.DEFAULT_RTMRS
    return MeasurementSet(_SIM_NAMES[generation], _SIM_VERSIONS[generation], quote_sim.DEFAULT_MR_TD.hex(),
                          r[0].hex(), r[1].hex(), r[2].hex(), runtime_rtmr3)


def simulated_measurements() -> list[MeasurementSet]:
    """The ≤1.2 default registry (what the sim served before generations existed)."""
    return [simulated_measurement("1.2")]


@dataclass
class Fault:
    """One injected misbehaviour on one endpoint. ``times`` None = always.

    Kinds: ``status`` (code + detail, optional Retry-After), ``delay`` (then the real answer),
    ``garbage`` (200 text/html), ``truncated`` (the real answer cut in half, valid framing), ``drop``
    (connection closed without an answer), ``replay_nonce`` (the nonce endpoint hands out the previous,
    consumed nonce), ``redirect`` (``status`` if 3xx else 307 to ``location``, default the same path on
    plain ``http://``), ``missing_fields`` (the real answer without ``fields``: names or key paths),
    ``override`` (the real answer with ``fields`` (a dict) replacing its values), ``bad_signature``
    (signing-keys answer whose signatures for ``fields`` — default the first key — are corrupted),
    ``split`` (the real answer sent in two parts ``delay_s`` apart).

    ``applied=True`` with ``status``/``drop``/``garbage`` runs the real handler first (its state changes
    happen: keys promoted, nonces consumed) and then answers with the fault: a lost answer.
    """

    kind: str
    status: int = 500
    times: int | None = 1
    delay_s: float = 0.0
    retry_after: str | None = None
    detail: str = "injected fault"
    fields: Any = None
    location: str | None = None
    applied: bool = False
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind: unknown {self.kind!r}")
        if self.kind == "override" and not isinstance(self.fields, dict):
            raise ValueError("Fault('override') needs fields={name: value}")
        if self.kind == "missing_fields" and not self.fields:
            raise ValueError("Fault('missing_fields') needs fields=[name or (key, path), ...]")


@dataclass
class _Nonce:
    ip: str
    hotkey: str | None
    expires: float
    purpose: str = "boot"


@dataclass
class Timed:
    """A single-use value with an expiry (luks_quote_nonce, confirm nonce)."""

    value: str
    expires: float


@dataclass
class VolumeKeys:
    current: Secret | None = None
    pending: Secret | None = None


@dataclass
class _Vm:
    """What the validator holds for one VM. ``root`` is the build (static) passphrase."""

    hotkey: str
    root: Secret
    cache: Secret | None = None  # legacy GET/PUT containerd-cache passphrase
    root_stored: Secret | None = None  # rotated root key (1.4), returned on non-first boots
    pending_root: Secret | None = None
    volumes: dict[str, VolumeKeys] = field(default_factory=dict)
    k3s_key: Secret | None = None
    vm_root_ca_pem: bytes | None = None
    vm_auth: Hotkey | None = None  # this boot's per-VM signer
    generation: str | None = None
    first_boot: bool | None = None
    boots: int = 0

    def secret_values(self) -> list[bytes]:
        out = [self.root, self.cache, self.root_stored, self.pending_root, self.k3s_key]
        for vk in self.volumes.values():
            out += [vk.current, vk.pending]
        return [bytes(s.reveal()) for s in out if s is not None and len(s)]

    def wipe(self) -> None:
        for s in (self.root, self.cache, self.root_stored, self.pending_root, self.k3s_key):
            if s is not None:
                s.wipe()
        for vk in self.volumes.values():
            for s in (vk.current, vk.pending):
                if s is not None:
                    s.wipe()
        if self.vm_auth is not None:
            self.vm_auth.wipe()


def new_passphrase() -> Secret:
    """``secrets.token_hex(64)`` as the validator makes volume and root passphrases."""
    return Secret(secrets.token_hex(64))


def new_k3s_key() -> Secret:
    return Secret(base64.b64encode(os.urandom(32)))


@dataclass
class _Launch:
    token: str
    nonce: str | None


@dataclass
class ValidatorState:
    root_ca_pem: bytes
    measurements: list[AnyMeasurement]
    #: per-front provenance secrets nginx injects (the VM never knows them)
    proxy_auth: str = field(default_factory=lambda: secrets.token_hex(16))
    cvm_auth: str = field(default_factory=lambda: secrets.token_hex(16))
    front_auth: str = field(default_factory=lambda: secrets.token_hex(16))
    #: hotkeys on the subnet (``None`` = every hotkey); add_vm registers its hotkey
    registered_hotkeys: set[str] | None = field(default_factory=set)
    blacklisted_hotkeys: set[str] = field(default_factory=set)
    legacy_luks: bool = True
    tee_minimum_boot_version: str | None = None
    #: §2 Guards: a server already attested at ≥ this version must take nonces / confirms through cvm
    tee_mtls_min_version: str | None = "1.4.0"
    response_extras: dict[str, Any] = field(default_factory=dict)
    nonces: dict[str, _Nonce] = field(default_factory=dict)
    vms: dict[str, _Vm] = field(default_factory=dict)
    boot_tokens: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    luks_quote_nonces: dict[tuple[str, str], Timed] = field(default_factory=dict)
    confirm_nonces: dict[tuple[str, str], Timed] = field(default_factory=dict)
    server_versions: dict[str, str] = field(default_factory=dict)  # caller IP → matched version
    launches: dict[str, _Launch] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    handed_out: list[bytes] = field(default_factory=list)  # every secret value ever answered (leak scans)
    last_nonce: str | None = None
    clock_offset: float = 0.0
    signing: SigningRoot | None = None  # made on first use
    #: SEV-SNP verification (VCEK "KDS", chain, trusted roots); None = every SNP report is refused.
    snp: SnpTrust | None = None

    def now(self) -> float:
        return time.time() + self.clock_offset

    def take_timed(self, store: dict[tuple[str, str], Timed], key: tuple[str, str], value: str, what: str) -> bool:
        """Consume a single-use value if it matches and has not expired; counts every outcome."""
        entry = store.get(key)
        if entry is None or not secrets.compare_digest(entry.value.encode(), value.encode()):
            self.counters[f"{what}.refused"] += 1
            return False
        del store[key]
        if entry.expires < self.now():
            self.counters[f"{what}.expired"] += 1
            return False
        self.counters[f"{what}.consumed"] += 1
        return True

    def issue_timed(self, store: dict[tuple[str, str], Timed], key: tuple[str, str], ttl: float, what: str) -> str:
        value = secrets.token_hex(32)
        store[key] = Timed(value, self.now() + ttl)
        self.counters[f"{what}.issued"] += 1
        return value
