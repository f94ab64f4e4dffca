"""Agent configuration: one TOML file, environment and flag overrides, validated on load.

Every key lives in a typed dataclass section below. Sources are applied in order
(defaults < file < environment < ``--set`` flags); an unknown key or a value of the wrong
type is a :class:`ConfigError` that names the key and where it came from, so a typo in a
boot-critical file fails loudly instead of silently falling back to a default.

Environment: ``CHUTES_ATTEST_<SECTION>_<KEY>`` (e.g. ``CHUTES_ATTEST_QUOTE_SOURCE=simulated``).
Flags: ``--set section.key=value`` (repeatable).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import UsageError

DEFAULT_PATH = Path("/etc/chutes-attest/agent.toml")
ENV_PREFIX = "CHUTES_ATTEST_"
CONFIG_PATH_ENV = "CHUTES_ATTEST_CONFIG"


class ConfigError(UsageError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


@dataclass
class LogConfig:
    """Where log lines go and how they look."""

    #: Least severe level written: "debug", "info", "warning" or "error" (also --log-level).
    level: str = "info"
    #: "auto" (journald under systemd, console on a TTY, else console), "console", "json", "journald".
    format: str = "auto"


@dataclass
class QuoteConfig:
    """Where TEE evidence (TDX quotes, SEV-SNP reports) comes from and how the hardware queue treats callers."""

    #: "configfs" (production, Linux configfs-tsm) or "simulated" (explicit opt-in, never trusted).
    source: str = "configfs"
    #: Which TEE this guest is: "auto" (as Chutes' next image: the TDX guest device -> "tdx", else the
    #: SEV guest device -> "snp", neither -> fail closed), or pin "tdx" / "snp". With source="simulated",
    #: "auto" means "tdx" (there is no device to probe).
    tee: str = "auto"
    #: Device probed by tee="auto" for an Intel TDX guest.
    tdx_device: str = "/dev/tdx_guest"
    #: Device probed by tee="auto" for an AMD SEV-SNP guest (checked only when the TDX device is absent).
    sev_device: str = "/dev/sev-guest"
    #: configfs-tsm report directory (Linux >= 6.7); each request uses a private entry under it.
    configfs_root: str = "/sys/kernel/config/tsm/report"
    #: configfs-tsm provider the entry must report; "" = the TEE's own ("tdx_guest" or "sev_guest").
    expected_provider: str = ""
    #: SEV-SNP: the VCEK or VLEK certificate (DER or PEM) for local verification when the host's
    #: certificate table (configfs auxblob) carries none, as on upstream KVM; "" = none (never fetched).
    snp_vek_file: str = ""
    #: Extra attempts after a retryable configfs-tsm failure (EBUSY, a concurrent writer, a short write); 0 = one try.
    retries: int = 3
    #: Pause between those attempts.
    retry_delay_s: float = 0.5
    #: Directory holding the simulated PCK chain and keys (created on first use) for source="simulated".
    simulated_state_dir: str = "/var/lib/chutes-attest/sim"
    #: Quote requests that may wait for the hardware at once (all callers); beyond it: 429 queue_full.
    queue_max: int = 64
    #: How long a request may wait for its quote before 504 deadline_exceeded; 2x it + 5 s = wedged.
    deadline_s: float = 30.0
    #: Quote requests one caller may have waiting (its share of queue_max).
    queue_per_caller: int = 8
    #: Slots of queue_max only the compat socket (the validator's /attest path) may use; served first.
    queue_reserved_compat: int = 16
    #: Serve v5 quotes on the compat socket. Off: the validator reads v4 offsets only, so a v5 quote is
    #: refused there (503 naming the version and this key) instead of failing at the validator.
    allow_v5: bool = False


@dataclass
class RtmrConfig:
    """RTMR3 extension. Off by default: the live validator pins boot RTMR3 to zeros."""

    #: Extend RTMR3 with agent events (agent.evidence.rtmr); off: the validator expects boot RTMR3 zeros.
    enabled: bool = False
    #: The kernel's RTMR3 measurement file (written to extend, read back to check).
    sysfs_path: str = "/sys/class/misc/tdx_guest/measurements/rtmr3:sha384"
    #: Append-only, fsync'ed log of every RTMR3 extension (replayed from zeros it gives the register).
    event_log: str = "/run/chutes-attest/rtmr3-events.jsonl"
    #: ≤1.2 images only: ``serve`` extends RTMR3 once with the fixed runtime event
    #: (agent.evidence.rtmr3_runtime) before answering any quote request, so runtime quotes cannot be
    #: replayed as boot quotes. Off by default: those images' registered runtime RTMR3 is zero.
    runtime_event: bool = False


@dataclass
class GpuConfig:
    """NVIDIA GPU evidence through NVML."""

    #: Collect NVIDIA GPU evidence and device info; off: evidence carries no GPUs.
    enabled: bool = True
    #: Path of libnvidia-ml.so.1; empty = the library's default search.
    nvml_library: str = ""
    #: Each NVML call runs in a worker thread and is abandoned (GPU evidence error) after this long.
    call_timeout_s: float = 10.0
    #: Set the GPU ready state only after every GPU's evidence passed local verification.
    set_ready_after_verify: bool = False
    #: Pinned NVIDIA Device Identity root; empty = the copy shipped in the package.
    device_root_ca: str = ""
    #: Emulated NVML (tests/demo only, logs a warning, evidence NOT real): "" = real NVML;
    #: "<model>x<count>" with model h100, h200 or b200 (e.g. "h100x8") = that many emulated GPUs
    #: whose evidence is signed by a simulated device chain (agent.sim.gpu_sim), never NVIDIA's root.
    emulate: str = ""


#: Per measurement scheme: the image's measured-path list and manifest (reference §12.2).
RTMR3_SCHEME_FILES: dict[str, tuple[str, str]] = {
    "1.4": ("/etc/tdx-measure.conf", "/etc/tdx-rtmr3-expected-hashes"),
    "next": ("/etc/tee-measure.conf", "/etc/rootfs-manifest"),
}


@dataclass
class BootConfig:
    """The initramfs unlock flow."""

    #: Legacy single-host setting (baseline images, tests): when set, every call goes to this URL.
    validator_url: str = ""
    #: The validator's mTLS front (boot nonce/attestation, provision, confirm on 1.4.0).
    tdx_base_url: str = "https://cvm.chutes.ai"
    #: The validator's public API (1.3.x nonce and luks/confirm, signing keys).
    validator_base_url: str = "https://api.chutes.ai"
    #: The legacy attestation proxy: the only front serving 1.3.x ``/servers/{vm}/luks/attest``
    #: (reference §12.4; the 1.3.x ``TDX_BASE_URL``).
    legacy_tdx_base_url: str = "https://tdx-attestation.chutes.ai:8443"
    #: "auto" (steps chosen by the validator's answer), or pin one generation: "1.2", "1.3", "1.4".
    protocol: str = "auto"
    #: CA bundle (baked into the initramfs) for the validator's server certificate; the only trust source.
    ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    #: SHA-256 hex of acceptable CA/intermediate SPKIs; non-empty = the verified chain must contain one.
    tls_pin_spki: list[str] = field(default_factory=list)
    #: Byte offset of the data segment the images are made with (LUKS2 default header area: 16 MiB).
    luks_data_offset: int = 16777216
    #: Accept a v5 quote from the quote source (the Chutes validator reads v4 offsets only).
    allow_quote_v5: bool = False
    #: ≤1.2: use the removed GET/PUT /servers/{vm}/luks cache-key calls instead of POST /servers/{vm}/luks.
    legacy_cache_endpoints: bool = False
    #: Filesystem label of the config volume (identity, network config) found with blkid.
    config_label: str = "tdx-config"
    #: Where the config volume is mounted read-only during the boot.
    config_mount: str = "/run/tdx-config"
    #: "static" (netplan subset from the config volume) or "initramfs" (ip=/DHCP done by initramfs-tools).
    network: str = "static"
    #: The LUKS2 root volume unlocked with the validator's key.
    root_device: str = "/dev/disk/by-partlabel/root-luks"
    #: Device-mapper name of the opened root (/dev/mapper/<root_mapper>).
    root_mapper: str = "root"
    #: <=1.2: label of the containerd cache volume (LUKS2, formatted on first boot).
    cache_label: str = "containerd-cache"
    #: <=1.2: device-mapper name of the opened cache volume.
    cache_mapper: str = "containerd-cache"
    #: <=1.2: after the root, unlock the extra volumes keyed with the boot token (off: the root only).
    cache_enabled: bool = True
    #: tmpfs directory the boot leaves its hand-off files in (token, CA, leaves, signing keys).
    handoff_dir: str = "/run/chutes"
    #: Attempts per validator call before the boot fails (TDX_RETRY_COUNT, reference §3.6).
    max_attempts: int = 3  # TDX_RETRY_COUNT (reference §3.6)
    #: Budget for all validator calls of one step together, retries and waits included.
    total_timeout_s: float = 300.0
    #: One validator HTTP request (connect to last byte).
    request_timeout_s: float = 30.0
    #: Wait before retrying a failed validator call (429: Retry-After, else 2 x attempt + this).
    backoff_s: float = 2.0
    #: Upper bound of any single wait between validator retries.
    backoff_max_s: float = 30.0
    #: The cryptsetup program (a name looked up in PATH, or a path).
    cryptsetup: str = "cryptsetup"
    #: Power the VM off when the boot fails (--no-poweroff overrides it, for debugging only).
    poweroff: bool = True
    #: Block device or image file holding the config volume; empty = find it by config_label (blkid).
    config_device: str = ""
    #: How long to wait for the labelled config/cache devices to appear (udev may still be settling).
    device_wait_s: float = 10.0
    #: Cache volume device or image file; empty = find it by cache_label.
    cache_device: str = ""
    #: Final step: "open" (cryptsetup open) or "test-passphrase" (confirm the key only: machines without
    #: device-mapper, tests, the demo). Same code path up to the cryptsetup call.
    unlock_action: str = "open"
    #: Private directory for the validated LUKS header copy (tmpfs in the initramfs).
    header_dir: str = "/run/chutes-attest/luks"
    #: PBKDF for formatting the cache volume on first boot; iterations 0 = let cryptsetup benchmark.
    format_pbkdf: str = "argon2id"
    #: PBKDF iterations for format_pbkdf; 0 = let cryptsetup benchmark.
    format_pbkdf_iterations: int = 0
    #: Where the failure marker line is written for the host console (the kernel log).
    kmsg_path: str = "/dev/kmsg"
    #: How the rootfs is measured (reference §12.2): "1.4" = one RTMR3 extension per file, duplicates kept
    #: (the released 1.4.0 images); "next" = ``sort -u`` and one extension with SHA-384 of the list text.
    rtmr3_scheme: str = "1.4"
    #: RTMR3 rootfs chain (≥1.3): measured path list and expected-hash manifest, both in the initramfs.
    #: Empty = the scheme's name (1.4: /etc/tdx-measure.conf, /etc/tdx-rtmr3-expected-hashes;
    #: next: /etc/tee-measure.conf, /etc/rootfs-manifest); see :meth:`BootConfig.measure_files`.
    measure_conf: str = ""
    #: Expected-hash manifest of the RTMR3 rootfs chain; empty = the scheme's (see measure_conf).
    rtmr3_manifest: str = ""
    #: SEV-SNP (no RTMR3): where the boot leaves the verified rootfs list digest (lowercase hex + newline,
    #: 0444) for the image's ``rootfs-verify`` before k3s, as Chutes' next does (sev-snp.md §5.2).
    rootfs_digest_file: str = "/run/sek8s/rootfs-digest"
    #: resolv.conf written from the config volume's nameservers (network = "static").
    resolv_conf: str = "/etc/resolv.conf"
    #: 1.4.0 root confirm refused (non-200): root_next is removed either way; then "continue" on the old
    #: key (sek8s code) or "poweroff" (1.4.0 changelog; default: fail closed where the two disagree).
    root_confirm_failure: str = "poweroff"
    #: ≥1.3 storage volumes (STORAGE_LABEL / CACHE_LABEL); each is opened as /dev/mapper/<label>.
    storage_label: str = "storage"
    #: >=1.3 cache volume label (CACHE_LABEL); opened as /dev/mapper/<label>.
    tdx_cache_label: str = "tdx-cache"
    #: Explicit device or image file per storage volume; empty = find it by label (blkid, then LUKS label).
    storage_device: str = ""
    #: Explicit device or image file of the tdx_cache_label volume; empty = find it by label.
    tdx_cache_device: str = ""
    #: Filesystem made on a first-use storage volume (only with unlock_action = "open").
    storage_mkfs: str = "mkfs.xfs"
    #: ≥1.3 RTMR3 rootfs chain: the unlocked root's files as a directory (tests, a pre-mounted root);
    #: empty = mount /dev/mapper/<root_mapper> read-only (rootfs_type) for the measurement.
    rootfs_dir: str = ""
    #: Filesystem type used to mount the unlocked root read-only for the RTMR3 measurement.
    rootfs_type: str = "ext4"
    #: Run the ≥1.3 RTMR3 chain (off only where no RTMR3 interface exists: the validator then refuses
    #: the provision / luks-attest quote, so this is for debugging the steps before it).
    rtmr3_chain: bool = True
    #: Group owning /run/chutes/proxy-tls (the attestation service's user group, 1.4.0).
    proxy_tls_group: str = "tdx-attest"
    #: Baked, measured RSA key that signs the validator's cosign/Helm key bundle (1.4.0).
    signing_root_key: str = "/etc/chutes/root-signing-key.pem"

    def measure_files(self) -> tuple[str, str]:
        """(measured-path list, manifest) in effect: the configured paths, else the scheme's names."""
        conf, manifest = RTMR3_SCHEME_FILES[self.rtmr3_scheme]
        return self.measure_conf or conf, self.rtmr3_manifest or manifest


@dataclass
class ServeConfig:
    """The runtime unix-socket service."""

    #: Unix socket of the validator-facing API (the existing attestation service's path and shape).
    compat_socket: str = "/run/attestation-service/attestation.sock"
    #: Unix socket of the /v1 API for chute containers on this node.
    chute_socket: str = "/run/chutes-attest/chutes.sock"
    #: File mode of both sockets when the service binds them (not when systemd passes them).
    socket_mode: int = 0o660
    #: Group owning both sockets when bound here; empty = the service's own group.
    socket_group: str = ""
    #: Pre-1.4.0 self-signed service certificate (created with key_path when both are absent).
    cert_path: str = "/etc/attestation-service/certs/server.crt"
    #: Private key of cert_path (mode 0600).
    key_path: str = "/etc/attestation-service/certs/server.key"
    #: 1.4.0+ boot hand-off: the CA-signed proxy leaf and the per-boot VM root CA. When the leaf exists it
    #: is the service identity (chain, key pair and key mode checked at start); cert_path/key_path and
    #: the self-signed pair are then never used.
    handoff_cert_path: str = "/run/chutes/proxy-tls/server.crt"
    #: Private key of handoff_cert_path: a regular file no one but its owner (and group, read-only) may access.
    handoff_key_path: str = "/run/chutes/proxy-tls/server.key"
    #: The per-boot VM root CA that handoff_cert_path must chain to.
    vm_root_ca_path: str = "/run/chutes/vm-root-ca/ca.crt"
    #: Lifetime of a rint nonce from /v1/rint/nonce; a commitment after it is "expired".
    rint_nonce_ttl_s: float = 300.0
    #: Live rint nonces one caller may hold; beyond it its own oldest goes.
    rint_nonces_per_caller: int = 1024
    #: Evidence requests per second per caller (token bucket; over it: 429 rate_limited).
    evidence_rate_per_s: float = 2.0
    #: Burst of that evidence bucket.
    evidence_burst: int = 10
    #: rint nonce requests per second per caller (token bucket; over it: 429 rate_limited).
    nonce_rate_per_s: float = 5000.0
    #: Burst of that nonce bucket.
    nonce_burst: int = 10000
    #: Largest request body accepted (413 body_too_large beyond it).
    max_body_bytes: int = 65536
    #: Connections one socket holds at once; more are refused at accept.
    max_connections: int = 1024
    #: Connections one caller (container, pod, else cgroup) may hold on one socket.
    max_connections_per_caller: int = 32
    #: Connections shared by every caller that could not be identified (exited, pid reused, main thread
    #: gone): their whole lane, never more (at most a quarter of max_connections).
    max_connections_unidentified: int = 8
    #: Connections of each socket only containers may use (at most a quarter of max_connections); what no
    #: class is guaranteed is shared by containers and host processes, first come.
    connections_share_containers: int = 256
    #: Connections of each socket only host processes (outside any container) may use (at most a quarter).
    connections_share_host: int = 64
    #: Pending connections the kernel queues on each socket before a connect() fails with EAGAIN (capped by
    #: net.core.somaxconn).
    listen_backlog: int = 4096
    #: Requests one caller may have in progress at once; more wait (unread) for their turn, so one caller
    #: gets a bounded share of the service's event loop (0: no limit).
    max_active_requests_per_caller: int = 4
    #: Requests in progress at once on one socket; beyond it, requests start in round-robin order across
    #: callers as slots free (0: no limit).
    max_active_requests: int = 64
    #: Requests per second one caller may send on one socket (and the burst); beyond it its next requests
    #: wait unread until it is back within the rate: delayed, never refused (0: no limit).
    requests_per_caller_per_s: float = 2000.0
    #: Burst of requests_per_caller_per_s.
    requests_per_caller_burst: int = 4000
    #: The last connection slots of a socket, kept for callers holding none there (at most a quarter).
    connections_reserved_for_new_callers: int = 64
    #: Global cap on live rint nonces (see agent.serve.rint.NonceStore for the memory arithmetic).
    rint_nonces_max: int = 65536
    #: Validator relay calls (/v1/rint/validator-nonce) per caller: token bucket rate and burst.
    relay_rate_per_s: float = 1.0
    #: Burst of relay_rate_per_s.
    relay_burst: int = 10
    #: A request still unanswered after this long gets 504 timeout.
    request_timeout_s: float = 60.0
    #: Hosts the rint validator-nonce relay may contact (no SSRF).
    validator_hosts: list[str] = field(default_factory=lambda: ["api.chutes.ai"])
    #: One validator-nonce relay call, connect to answer (504 validator_timeout after it).
    relay_timeout_s: float = 10.0
    #: CA bundle for the relay's TLS to the validator; empty = the system bundle file (never SSL_CERT_FILE/DIR).
    relay_ca_bundle: str = ""
    #: The boot's boot-status.json: written by `boot`, shown in /v1/status by `serve`.
    boot_status_path: str = "/run/chutes/boot-status.json"
    #: Ping the systemd watchdog (WatchdogSec=) while the loop and the quote source are healthy.
    watchdog: bool = True
    #: A connection must deliver a complete request head this soon after its first byte.
    header_timeout_s: float = 10.0
    #: An idle keep-alive connection (no request in progress) is closed after this long.
    idle_timeout_s: float = 75.0
    #: On SIGTERM, in-flight requests get this long to finish before connections are closed.
    drain_timeout_s: float = 10.0
    #: "summary": refusals, errors and slow requests get a serve.request line each (at most 10 per caller per
    #: second), routine successes are counted into one serve.request_summary line per interval (and logged
    #: one by one only at log.level debug); "each": one serve.request line per request.
    request_log: str = "summary"
    #: Seconds between serve.request_summary lines (none when no request came).
    request_summary_interval_s: float = 60.0
    #: A request that took longer than this (milliseconds) is logged on its own line as slow.
    slow_request_ms: float = 1000.0


@dataclass
class RintConfig:
    """Runtime-integrity commitment checks on the chute socket."""

    #: v4 embedded nonce: "validator" (format + Ed25519 signature only, as the validator checks; the answer
    #: says nonce_bound) or "exact" (the nonce must equal the issued one).
    v4_nonce: str = "validator"


@dataclass
class TpmConfig:
    """Optional vTPM evidence."""

    #: "auto" (use /dev/tpmrm0 or tcti when present), "off".
    mode: str = "auto"
    #: TCTI to reach the TPM (tpm2-tools syntax, e.g. swtpm:...); empty = /dev/tpmrm0 when present.
    tcti: str = ""
    #: PCR indexes the AK quote covers and the evidence reports.
    pcrs: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7, 14])
    #: PCR bank quoted and read.
    bank: str = "sha256"
    #: Persistent AK handle (0x81000000..0x81ffffff); 0 = the ECC P-256 endorsement primary.
    ak_handle: int = 0
    #: Firmware (TCG) event log included with the TPM evidence when readable.
    event_log: str = "/sys/kernel/security/tpm0/binary_bios_measurements"


@dataclass
class AgentConfig:
    """The whole configuration, one attribute per TOML table."""

    log: LogConfig = field(default_factory=LogConfig)
    quote: QuoteConfig = field(default_factory=QuoteConfig)
    rtmr: RtmrConfig = field(default_factory=RtmrConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    rint: RintConfig = field(default_factory=RintConfig)
    tpm: TpmConfig = field(default_factory=TpmConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("auto", "console", "json", "journald"),
    "quote.source": ("configfs", "simulated"),
    "quote.tee": ("auto", "tdx", "snp"),
    "boot.network": ("static", "initramfs"),
    "boot.protocol": ("auto", "1.2", "1.3", "1.4"),
    "boot.unlock_action": ("open", "test-passphrase"),
    "boot.format_pbkdf": ("argon2id", "argon2i", "pbkdf2"),
    "boot.root_confirm_failure": ("continue", "poweroff"),
    "tpm.mode": ("auto", "off"),
    "rint.v4_nonce": ("validator", "exact"),
    "serve.request_log": ("summary", "each"),
    "tpm.bank": ("sha1", "sha256", "sha384", "sha512"),
}


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(AgentConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(AgentConfig)}


def _coerce(key: str, value: Any, typ: Any, origin: str, textual: bool) -> Any:
    """Check (file values) or convert (``textual``: strings from env/flags) one value to its declared type."""
    from_text = textual and isinstance(value, str) and typ is not str

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{origin}: {key}: expected {expected}, got {value!r}")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and value.lower() in ("0", "false", "no", "off"):
            return False
        raise fail("a boolean")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise fail("an integer")
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        if from_text:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise fail("a list")
        return [_coerce(f"{key}[{i}]", v, item, origin, textual) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported type {typ!r}")  # pragma: no cover - schema bug


def _apply(cfg: AgentConfig, section: str, key: str, value: Any, origin: str, textual: bool = False) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{origin}: unknown section {section!r} (known: {', '.join(sorted(sections))})")
    sec_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec_obj))
    if key not in hints:
        raise ConfigError(f"{origin}: unknown key {section}.{key} (known: {', '.join(sorted(hints))})")
    full = f"{section}.{key}"
    coerced = _coerce(full, value, hints[key], origin, textual)
    allowed = _CHOICES.get(full)
    if allowed and coerced not in allowed:
        raise ConfigError(f"{origin}: {full}: must be one of {', '.join(allowed)}, got {coerced!r}")
    setattr(sec_obj, key, coerced)


def _apply_mapping(cfg: AgentConfig, data: Mapping[str, Any], origin: str) -> None:
    for section, table in data.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{origin}: {section}: expected a table, got {table!r}")
        for key, value in table.items():
            _apply(cfg, section, key, value, origin)


def _split_dotted(text: str, origin: str) -> tuple[str, str, str]:
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"{origin}: expected section.key=value, got {text!r}")
    return section, key, value


def _validate(cfg: AgentConfig) -> None:
    """Cross-field and range checks that a type alone cannot express."""
    positive = {
        "quote.queue_max": cfg.quote.queue_max,
        "quote.deadline_s": cfg.quote.deadline_s,
        "boot.max_attempts": cfg.boot.max_attempts,
        "boot.total_timeout_s": cfg.boot.total_timeout_s,
        "boot.request_timeout_s": cfg.boot.request_timeout_s,
        "serve.rint_nonce_ttl_s": cfg.serve.rint_nonce_ttl_s,
        "serve.max_body_bytes": cfg.serve.max_body_bytes,
        "serve.max_connections": cfg.serve.max_connections,
        "serve.max_connections_per_caller": cfg.serve.max_connections_per_caller,
        "serve.max_connections_unidentified": cfg.serve.max_connections_unidentified,
        "serve.rint_nonces_max": cfg.serve.rint_nonces_max,
        "serve.relay_burst": cfg.serve.relay_burst,
        "serve.request_summary_interval_s": cfg.serve.request_summary_interval_s,
        "serve.slow_request_ms": cfg.serve.slow_request_ms,
        "quote.queue_per_caller": cfg.quote.queue_per_caller,
        "gpu.call_timeout_s": cfg.gpu.call_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")
    if not 0 <= cfg.quote.queue_reserved_compat < cfg.quote.queue_max:
        raise ConfigError(f"quote.queue_reserved_compat: must be 0..quote.queue_max-1, got "
                          f"{cfg.quote.queue_reserved_compat}")
    if cfg.serve.connections_reserved_for_new_callers < 0:
        raise ConfigError(f"serve.connections_reserved_for_new_callers: must be >= 0, "
                          f"got {cfg.serve.connections_reserved_for_new_callers}")
    if cfg.serve.requests_per_caller_per_s < 0:
        raise ConfigError(f"serve.requests_per_caller_per_s: must be >= 0, got {cfg.serve.requests_per_caller_per_s}")
    for key in ("connections_share_containers", "connections_share_host", "max_active_requests"):
        if getattr(cfg.serve, key) < 0:
            raise ConfigError(f"serve.{key}: must be >= 0, got {getattr(cfg.serve, key)}")
    if cfg.serve.listen_backlog <= 0:
        raise ConfigError(f"serve.listen_backlog: must be > 0, got {cfg.serve.listen_backlog}")
    if cfg.serve.max_active_requests_per_caller < 0:
        raise ConfigError(f"serve.max_active_requests_per_caller: must be >= 0, "
                          f"got {cfg.serve.max_active_requests_per_caller}")
    if cfg.serve.relay_rate_per_s < 0:
        raise ConfigError(f"serve.relay_rate_per_s: must be >= 0, got {cfg.serve.relay_rate_per_s}")
    if cfg.quote.retries < 0:
        raise ConfigError(f"quote.retries: must be >= 0, got {cfg.quote.retries}")
    if not 0 <= cfg.serve.socket_mode <= 0o777:
        raise ConfigError(f"serve.socket_mode: must be a file mode (0..0o777), got {cfg.serve.socket_mode!r}")
    if cfg.boot.rtmr3_scheme not in RTMR3_SCHEME_FILES:
        raise ConfigError(f"boot.rtmr3_scheme: must be one of {', '.join(map(repr, RTMR3_SCHEME_FILES))}, "
                          f"got {cfg.boot.rtmr3_scheme!r}")
    for key in ("validator_url", "tdx_base_url", "validator_base_url", "legacy_tdx_base_url"):
        url = getattr(cfg.boot, key)
        if (url or key != "validator_url") and not url.startswith(("https://", "http://")):
            raise ConfigError(f"boot.{key}: must be an http(s) URL, got {url!r}")
    for pin in cfg.boot.tls_pin_spki:
        if not isinstance(pin, str) or len(pin) != 64 or any(c not in "0123456789abcdefABCDEF" for c in pin):
            raise ConfigError(f"boot.tls_pin_spki: {pin!r} is not 64 hex characters (SHA-256 of an SPKI)")
    if cfg.boot.luks_data_offset < 8192 or cfg.boot.luks_data_offset % 4096:
        raise ConfigError(f"boot.luks_data_offset: must be a multiple of 4096 of at least 8192, "
                          f"got {cfg.boot.luks_data_offset!r}")
    for pcr in cfg.tpm.pcrs:
        if not 0 <= pcr <= 23:
            raise ConfigError(f"tpm.pcrs: must be PCR indexes 0..23, got {pcr}")


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build the configuration from defaults, the TOML file, the environment and ``--set`` overrides.

    ``path`` None means ``$CHUTES_ATTEST_CONFIG`` or the default path, and a missing default file is fine
    (defaults apply); an explicitly named file that is missing is an error.
    """
    env = os.environ if environ is None else environ
    cfg = AgentConfig()
    explicit = path is not None or CONFIG_PATH_ENV in env
    file_path = Path(path) if path is not None else Path(env.get(CONFIG_PATH_ENV, str(DEFAULT_PATH)))
    if file_path.exists() or explicit:
        try:
            data = tomllib.loads(file_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{file_path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file_path}: invalid TOML: {exc}") from None
        _apply_mapping(cfg, data, str(file_path))
    sections = _sections()
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_PATH_ENV:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in sections:
            continue  # other CHUTES_ATTEST_* variables (e.g. test knobs) are not config
        _apply(cfg, section, key, value, f"environment {name}", textual=True)
    for item in overrides:
        section, key, value = _split_dotted(item, "--set")
        _apply(cfg, section, key, value, f"--set {item}", textual=True)
    _validate(cfg)
    return cfg


def to_dict(cfg: AgentConfig) -> dict[str, Any]:
    """Plain-data view (for ``chutes-attest config show``)."""
    return dataclasses.asdict(cfg)


def key_docs(source: str | None = None) -> dict[str, str]:
    """Each key's documentation: the ``#:`` comment lines above its field in this file (or in ``source``),
    as ``{"section.key": text}`` (lines kept). ``chutes-attest config`` prints them above each key;
    tests/unit/test_config.py fails naming any key without one. Empty when the source is not installed."""
    import ast

    if source is None:
        try:
            source = Path(__file__).read_text()
        except OSError:  # pragma: no cover - a byte-code-only install: values without comments
            return {}
    lines = source.splitlines()
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    out: dict[str, str] = {}
    for section, typ in _sections().items():
        node = classes.get(typ.__name__)
        for stmt in node.body if node is not None else ():
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc: list[str] = []
            i = stmt.lineno - 2
            while i >= 0 and lines[i].lstrip().startswith("#:"):
                doc.insert(0, lines[i].lstrip()[2:].strip())
                i -= 1
            if doc:
                out[f"{section}.{stmt.target.id}"] = "\n".join(doc)
    return out
