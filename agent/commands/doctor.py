"""Check this VM's attestation prerequisites and say what is wrong, one line per check.

The TEE (Intel TDX or AMD SEV-SNP: pinned by ``quote.tee`` or probed as the boot does, and how), its guest
module and device (tdx_guest / sev_guest), the configfs-tsm provider, a real quote through configfs (QGS
answering) or, on SEV-SNP, a real report with its fields and a local verification (VCEK/VLEK from the host's
certificate table or ``quote.snp_vek_file``; without one it says so: nothing is ever fetched),
NVML, GPU confidential-computing mode, the optional vTPM, the service identity (the boot's CA-signed leaf on
1.4.0+, else the self-signed pair, and why), both service sockets and the node-wide load figures (every
caller's requests, rate limits, quotes, nonces, connections) that only the compat socket serves. A v5 quote
is flagged: the validator reads v4 offsets only, so the compat socket refuses it unless ``quote.allow_v5``.
"""

from __future__ import annotations

import argparse
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.cli import EXIT_OK, EXIT_UNAVAILABLE, add_json_flag
from agent.config import AgentConfig


@dataclass
class Check:
    name: str
    status: str  # "ok" | "fail" | "warn" | "skip"
    detail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-quote", action="store_true", help="do not request a test quote")
    add_json_flag(parser)


def check_tdx_guest(sysfs: str = "/sys", dev: str = "/dev") -> Check:
    loaded = Path(sysfs, "module", "tdx_guest").exists()
    device = Path(dev, "tdx_guest")
    if device.exists():
        return Check("tdx_guest", "ok", f"{device} present" + (" (module loaded)" if loaded else " (built in)"))
    if loaded:
        return Check("tdx_guest", "fail", f"module tdx_guest loaded but {device} missing (udev/devtmpfs?)")
    return Check("tdx_guest", "fail", f"no {device} and module tdx_guest not loaded: not a TDX guest, or "
                                      "run 'modprobe tdx_guest'")


def check_sev_guest(sysfs: str = "/sys", dev: str = "/dev/sev-guest") -> Check:
    loaded = Path(sysfs, "module", "sev_guest").exists()
    device = Path(dev)
    if device.exists():
        return Check("sev_guest", "ok", f"{device} present" + (" (module loaded)" if loaded else " (built in)"))
    if loaded:
        return Check("sev_guest", "fail", f"module sev_guest loaded but {device} missing (udev/devtmpfs?)")
    return Check("sev_guest", "fail", f"no {device} and module sev_guest not loaded: not an SEV-SNP guest, or run "
                                      "'modprobe sev-guest'")


def resolve_tee(cfg: AgentConfig) -> tuple[str | None, Check]:
    """(the TEE or None, the ``tee`` check): pinned by ``quote.tee``, probed like the boot (TDX device, then
    SEV device), or what the simulated source makes."""
    from agent.evidence.own_quote import TDX, TEE_NAMES, TEES, tee_resolution

    q = cfg.quote
    if q.source == "simulated":
        tee = q.tee if q.tee in TEES else TDX
        how = f'quote.source = "simulated", quote.tee = "{q.tee}"'
        return tee, Check("tee", "warn", f"{TEE_NAMES[tee]} ({how}: evidence is NOT hardware)")
    from agent.errors import AgentError
    from agent.evidence.tee import resolve_tee as probe

    try:
        tee = probe(q)
    except AgentError as exc:
        return None, Check("tee", "fail", str(exc))
    return tee, Check("tee", "ok", f"{TEE_NAMES.get(tee, tee)} ({tee_resolution(q, tee)})")


def check_guest_device(cfg: AgentConfig, tee: str | None) -> Check:
    """The guest device of the TEE in effect (the TDX one when none was found)."""
    if tee == "snp":
        return check_sev_guest(dev=cfg.quote.sev_device)
    device = Path(cfg.quote.tdx_device)
    return check_tdx_guest(dev=str(device.parent)) if device.name == "tdx_guest" else check_tdx_guest()


def check_tsm(cfg: AgentConfig) -> Check:
    root = Path(cfg.quote.configfs_root)
    if cfg.quote.source == "simulated":
        return Check("tsm", "warn", "quote.source=simulated: configfs-tsm not used (quotes are NOT hardware)")
    if not root.is_dir():
        parent = root.parent
        if not Path("/sys/kernel/config").is_dir() or not any(Path("/sys/kernel/config").iterdir()):
            return Check("tsm", "fail", "configfs not mounted at /sys/kernel/config "
                                        "(mount -t configfs none /sys/kernel/config)")
        return Check("tsm", "fail", f"{root} missing ({parent} exists? {parent.is_dir()}): kernel without "
                                    "CONFIG_TSM_REPORTS or tdx_guest not loaded")
    if not os.access(root, os.W_OK):
        return Check("tsm", "fail", f"{root} not writable by uid {os.getuid()}")
    return Check("tsm", "ok", f"{root} present and writable (provider checked on the test quote)")


def check_quote(cfg: AgentConfig, tee: str | None = "tdx") -> Check:
    if tee == "snp":
        return check_snp_report(cfg)
    from agent.evidence.base import EvidenceError
    from agent.evidence.sources import make_quote_source
    from agent.quote import parse_quote

    rd = os.urandom(64)
    started = time.monotonic()
    try:
        source = make_quote_source(cfg)
        raw = source.get_quote(rd)
        q = parse_quote(raw)
    except EvidenceError as exc:
        return Check("quote", "fail", f"no quote: {exc}")
    except Exception as exc:
        return Check("quote", "fail", f"quote does not parse: {type(exc).__name__}: {exc}")
    took = time.monotonic() - started
    if bytes(q.report_data) != rd:
        return Check("quote", "fail", "quote carries a different report_data than requested")
    sim = " (SIMULATED)" if getattr(source, "name", "") == "simulated" else ""
    debug = "; TD DEBUG bit set: validators will refuse it" if q.debug else ""
    detail = f"{len(raw)}-byte v{q.version} quote in {took:.2f}s from {getattr(source, 'name', '?')}{sim}{debug}"
    if q.version != 4:
        if not cfg.quote.allow_v5:
            return Check("quote", "fail", f"{detail}; the validator reads v4 quotes only, so the compat socket "
                                          "refuses every quote (quote.allow_v5 = false)")
        return Check("quote", "warn", f"{detail}; served on the compat socket because quote.allow_v5 = true, "
                                      "but the validator reads v4 offsets only")
    return Check("quote", "warn" if (sim or debug) else "ok", detail)


def _snp_vek(cfg: AgentConfig) -> tuple[bytes | None, str]:
    """(``quote.snp_vek_file`` bytes or None, what to say about it)."""
    path = cfg.quote.snp_vek_file
    if not path:
        return None, "quote.snp_vek_file is unset"
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20), f"VCEK/VLEK from {path}"
    except OSError as exc:
        return None, f"quote.snp_vek_file {path}: {exc.strerror}"


def check_snp_report(cfg: AgentConfig) -> Check:
    """A real SEV-SNP report through the configured source, its fields, the own-evidence policy, and a local
    verification (signature, VCEK/VLEK chain to AMD's pinned ARK, TCB, hwID, DEBUG, VMPL, REPORT_DATA) with the
    VCEK from the host's certificate table (auxblob) or ``quote.snp_vek_file``. Nothing is ever fetched."""
    import warnings

    from agent.evidence.base import EvidenceError
    from agent.evidence.own_quote import OwnEvidenceError, check_own_evidence
    from agent.evidence.sources import make_quote_source
    from agent.quote.snp_parser import parse_snp_report
    from agent.quote.snp_verify import verify_snp_report

    rd = os.urandom(64)
    started = time.monotonic()
    try:
        source = make_quote_source(cfg)
        if hasattr(source, "get_evidence"):
            ev = source.get_evidence(rd)
            raw, aux = bytes(ev.raw), bytes(ev.aux or b"")
        else:
            raw, aux = source.get_quote(rd), b""
        report = parse_snp_report(raw)
    except EvidenceError as exc:
        return Check("quote", "fail", f"no SEV-SNP report: {exc}")
    except Exception as exc:
        return Check("quote", "fail", f"SEV-SNP report does not parse: {type(exc).__name__}: {exc}")
    took = time.monotonic() - started
    name = getattr(source, "name", "?")
    simulated = name == "simulated" or cfg.quote.source == "simulated"
    fields = (f"{len(raw)}-byte SEV-SNP v{report.version} report in {took:.2f}s from {name}"
              f"{' (SIMULATED)' if simulated else ''}: {report.product or 'product unknown'}, "
              f"{report.signing_key_name}, POLICY 0x{report.policy:x}, VMPL {report.vmpl}, firmware "
              f"{report.current_firmware}, REPORTED_TCB {bytes(report.reported_tcb).hex()}, MEASUREMENT "
              f"{bytes(report.measurement).hex()[:24]}…, CHIP_ID {bytes(report.chip_id).hex()[:16]}…")
    try:
        check_own_evidence(raw, rd, tee="snp", refusal="validators will refuse it")
    except OwnEvidenceError as exc:
        return Check("quote", "fail", f"{fields}; {exc.message}")
    vek, vek_said = _snp_vek(cfg)
    arks = chain = None
    against = "AMD's pinned ARK"
    if simulated:  # quote.source = "simulated" only: its own simulated AMD chain, said so on the line
        from agent.sim.snp_sim import sim_kds

        kds = sim_kds(cfg.quote.simulated_state_dir)
        arks, chain = list(kds.arks), kds.chain_pem
        against = "the SIMULATED AMD root (not hardware)"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*serial number.*")
            result = verify_snp_report(report, vek=vek, cert_table=aux or None, chain_pem=chain,
                                       trusted_arks=arks, expected_report_data=rd)
    except (ValueError, EvidenceError) as exc:
        return Check("quote", "fail", f"{fields}; local verification could not run: {exc}")
    if result.vek_source is None:
        where = "the host's certificate table (auxblob) is empty" if not aux else "the auxblob has no VCEK/VLEK"
        return Check("quote", "warn", f"{fields}; local verification not possible: no VCEK available ({where}, "
                                      f"{vek_said}); nothing is fetched: AMD's KDS is never contacted by this agent "
                                      "(the validator fetches the VCEK itself)")
    if not result.ok:
        bad = ", ".join(f"{c.name}: {c.detail}" for c in result.failed())
        return Check("quote", "fail", f"{fields}; local verification FAILED against {against} "
                                      f"(VEK from {result.vek_source}): {bad}")
    return Check("quote", "warn" if simulated else "ok",
                 f"{fields}; locally verified against {against}: {len(result.checks)} checks passed (VEK from "
                 f"{result.vek_source}, chain {result.chain_source}); not checked: {len(result.not_checked)} "
                 "item(s) (the launch digest against published values, revocation, minimum TCB)")


def check_gpus(cfg: AgentConfig) -> list[Check]:
    if not cfg.gpu.enabled:
        return [Check("nvml", "skip", "gpu.enabled=false"), Check("cc_mode", "skip", "gpu.enabled=false")]
    import asyncio

    from agent.evidence.base import EvidenceError
    from agent.evidence.gpu_sources import make_gpu_source

    try:
        src = make_gpu_source(cfg)
        assert src is not None  # None only when gpu.enabled is false, answered above
        devices = asyncio.run(src.devices(None))
    except (EvidenceError, ValueError, OSError) as exc:
        return [Check("nvml", "fail", f"NVML unavailable: {exc}"), Check("cc_mode", "skip", "needs NVML")]
    names = sorted({d.get("name", "?") for d in devices})
    emu = " (EMULATED)" if cfg.gpu.emulate else ""
    out = [Check("nvml", "ok" if devices and not emu else ("warn" if devices else "fail"),
                 f"{len(devices)} GPU(s): {', '.join(names) or 'none'}{emu}")]
    try:
        cc = src.cc_state() if hasattr(src, "cc_state") else None
    except EvidenceError as exc:
        out.append(Check("cc_mode", "fail", f"cannot read CC state: {exc}"))
        return out
    if cc is None:
        out.append(Check("cc_mode", "skip", "source does not report CC state"))
    elif cc["dev_tools_mode"]:
        out.append(Check("cc_mode", "fail", "CC DevTools mode is on: GPUs are debuggable, evidence refused"))
    elif cc["cc_feature"] or cc["multi_gpu_mode"] == "protected_pcie":
        out.append(Check("cc_mode", "ok", f"CC on (environment={cc['environment']}, "
                                          f"multi_gpu_mode={cc['multi_gpu_mode']})"))
    else:
        out.append(Check("cc_mode", "fail", "GPU confidential computing is off: enable CC mode on the host "
                                            "(nvidia-smi conf-compute -scc / nvidia_gpu_tools.py)"))
    return out


def check_cert(cfg: AgentConfig) -> Check:
    """Which identity report_data binds, and why: the boot hand-off leaf (1.4.0+) or the self-signed pair."""
    from agent.evidence.service_identity import HandoffIdentityError, ServiceCertError, load_identity

    try:
        cert = load_identity(cfg.serve, create=False)
    except HandoffIdentityError as exc:
        return Check("service_cert", "fail", f"boot hand-off identity refused, the service will not start: {exc}")
    except ServiceCertError as exc:
        return Check("service_cert", "fail", f"{exc} ('chutes-attest serve' creates it on first start)")
    return Check("service_cert", "ok", f"{cert.source}: {cert.why}; SPKI sha256 {cert.spki_sha256.hex()[:16]}…")


def _unix_get(path: str, route: str, limit: int) -> tuple[int, bytes]:
    """One ``GET route`` over the unix socket at ``path``: (status, at most ``limit`` body bytes)."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("localhost", timeout=5)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(path)
        conn.sock = s
        conn.request("GET", route)
        resp = conn.getresponse()
        return resp.status, resp.read(limit)
    finally:
        conn.close()


def check_socket(name: str, path: str, route: str) -> Check:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(f"{name}_socket", "fail", f"{path} missing: is chutes-attest.socket/.service running?")
    if not stat.S_ISSOCK(st.st_mode):
        return Check(f"{name}_socket", "fail", f"{path} exists but is not a socket")
    try:
        status, body = _unix_get(path, route, 200)
    except OSError as exc:
        return Check(f"{name}_socket", "fail", f"{path}: {exc.strerror or exc}")
    mode = stat.filemode(st.st_mode)
    if status != 200:
        return Check(f"{name}_socket", "fail", f"{path} GET {route} -> HTTP {status} {body[:80]!r}")
    return Check(f"{name}_socket", "ok", f"{path} ({mode}) answers GET {route}")


def summarize_node_status(doc: dict[str, Any]) -> tuple[str, str]:
    """(status, one line) from the compat socket's node-wide ``/status``: every caller's load in figures."""
    counters = doc.get("counters") or {}
    requests = counters.get("requests") or {}
    limited = counters.get("rate_limited") or {}
    quotes = counters.get("quotes") or {}
    conns = counters.get("connections") or {}
    rint = doc.get("rint") or {}
    queue = doc.get("queue") or {}
    total = sum(v for v in requests.values() if isinstance(v, int))
    errors = sum(v for k, v in requests.items() if isinstance(v, int) and k.rsplit(" ", 1)[-1][:1] == "5")
    open_conns = sum(c.get("open", 0) for c in conns.values() if isinstance(c, dict))
    refused = sum(c.get("refused", 0) for c in conns.values() if isinstance(c, dict))
    line = (f"{total} requests ({errors} 5xx), rate-limited {sum(limited.values())}, quotes ok {quotes.get('ok', 0)}"
            f" failed {quotes.get('failed', 0)} v5-refused {quotes.get('v5_refused', 0)}, queue depth "
            f"{queue.get('depth', 0)}, rint nonces {rint.get('live_nonces', 0)}/{rint.get('cap', '?')}, "
            f"connections open {open_conns} refused {refused}")
    warn = quotes.get("failed", 0) or quotes.get("v5_refused", 0) or rint.get("refused_full", 0)
    return ("warn" if warn else "ok"), line


def check_node_status(cfg: AgentConfig) -> Check:
    """Node-wide figures (all callers) from the compat socket; chute containers only ever see their own."""
    import json

    path = cfg.serve.compat_socket
    try:
        status, body = _unix_get(path, "/status", 1 << 20)
        doc = json.loads(body)
    except (OSError, ValueError) as exc:
        return Check("service_load", "skip", f"no node-wide status from {path}: {exc}")
    if status != 200 or not isinstance(doc, dict):
        return Check("service_load", "fail", f"{path} GET /status -> HTTP {status}")
    verdict, line = summarize_node_status(doc)
    return Check("service_load", verdict, line)


def check_tpm(cfg: AgentConfig) -> Check:
    """A vTPM is optional: absent is fine (skip), present-but-broken is a failure."""
    from agent.evidence.tpm import tpm_status

    st = tpm_status(cfg)
    if st.get("error"):
        return Check("tpm", "fail", f"{st.get('tcti') or 'TPM'}: {st['error']}")
    if not st.get("present"):
        return Check("tpm", "skip", "no TPM (tpm.mode=off, no /dev/tpmrm0 and no tpm.tcti): evidence has tpm=null")
    ek = "EK certificate present" if st.get("ek_certificate") else "no EK certificate in NV"
    return Check("tpm", "ok", f"{st.get('tcti')}: {st.get('manufacturer') or '?'} firmware {st.get('firmware') or '?'}"
                              f", {ek}")


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    import json

    tee, tee_check = resolve_tee(cfg)
    checks: list[Check] = [tee_check, check_guest_device(cfg, tee), check_tsm(cfg)]
    checks.append(Check("quote", "skip", "--skip-quote") if args.skip_quote else check_quote(cfg, tee))
    checks += check_gpus(cfg)
    checks.append(check_tpm(cfg))
    checks.append(check_cert(cfg))
    checks.append(check_socket("compat", cfg.serve.compat_socket, "/health"))
    checks.append(check_socket("chute", cfg.serve.chute_socket, "/v1/health"))
    checks.append(check_node_status(cfg))
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{c.status.upper():4}  {c.name:13} {c.detail}")
    return EXIT_UNAVAILABLE if failed else EXIT_OK
