"""Runs INSIDE the stage-2 VM (oneshot unit): calls both sockets, checks journald and systemd, prints results.

Each result is one console line ``STAGE2-RESULT: {"check": ..., "ok": bool, ...}``; the host-side test
asserts on them. Uses only the stdlib plus the agent's own quote parser (what a client would use).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time

COMPAT = "/run/attestation-service/attestation.sock"
CHUTE = "/run/chutes-attest/chutes.sock"
SELF_SIGNED = "/etc/attestation-service/certs/server.crt"
#: 1.4.0 boot hand-off: the CA-signed proxy leaf is the service identity when present (≤1.3: self-signed)
HANDOFF_LEAF = "/run/chutes/proxy-tls/server.crt"
CERT = HANDOFF_LEAF if os.path.exists(HANDOFF_LEAF) else SELF_SIGNED
SIM_STATE = "/var/lib/chutes-attest/sim"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 300.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def get(sock: str, path: str) -> tuple[int, object]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, body.decode(errors="replace")


FAILURES: list[str] = []


def emit(check: str, ok: bool, **fields: object) -> None:
    if not ok:
        FAILURES.append(check)
    line = "STAGE2-RESULT: " + json.dumps({"check": check, "ok": bool(ok), **fields}, default=str)
    print(line, flush=True)


def spki_sha256() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    with open(CERT, "rb") as fh:
        cert = x509.load_pem_x509_certificate(fh.read())
    return hashlib.sha256(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).digest()


def check_quote(check: str, quote_b64: str, nonce: bytes) -> None:
    from agent.quote import parse_quote, verify_quote
    from agent.sim.quote_sim import load_or_create_sim_pki

    raw = base64.b64decode(quote_b64, validate=True)
    q = parse_quote(raw)
    rd = bytes(q.report_data)
    verified = verify_quote(q, load_or_create_sim_pki(SIM_STATE).root_ca_pem).ok
    cert_hash = spki_sha256()
    emit(
        check,
        rd[:32] == nonce and rd[32:] == cert_hash and verified,
        version=q.version,
        quote_len=len(raw),
        nonce_bound=rd[:32] == nonce,
        cert_bound=rd[32:] == cert_hash,
        signature_ok=verified,
        debug=q.debug,
    )


def systemctl_show(unit: str, props: str) -> dict[str, str]:
    out = subprocess.run(["systemctl", "show", unit, "-p", props], capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


#: What the service's unit binds into its view of /run/chutes (systemd/chutes-attest.service).
SERVICE_BINDS = ("boot-status.json", "proxy-tls", "vm-root-ca")
SERVICE_READS = ("boot-status.json", "proxy-tls/server.crt", "proxy-tls/server.key", "vm-root-ca/ca.crt")
SERVICE_USER = "chutes-attest"


def _as_service(path: str, pid: int | None) -> tuple[bool, str]:
    """Read ``path`` as the service's user (its groups too), inside the service's mount namespace when ``pid``."""
    argv = ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups", "cat", path]
    if pid is not None:
        argv = ["nsenter", f"--target={pid}", "--mount", "--", *argv]
    p = subprocess.run(argv, capture_output=True, text=True)
    return p.returncode == 0, (p.stderr.strip().rsplit(": ", 1)[-1] if p.returncode else "read")


def check_run_chutes(pid: int) -> None:
    """/run/chutes is 0700 root; the service, as its unprivileged user, sees exactly its binds there
    (TemporaryFileSystem= + BindReadOnlyPaths=), can read what it needs and nothing else, inside its
    namespace or outside it."""
    import pwd

    st = os.stat("/run/chutes")
    host_files = []
    for dirpath, _dirs, files in os.walk("/run/chutes"):
        host_files += [os.path.relpath(os.path.join(dirpath, f), "/run/chutes") for f in files]
    host_top = sorted(os.listdir("/run/chutes"))
    with open(f"/proc/{pid}/status") as fh:
        uids = next(ln.split()[1:] for ln in fh if ln.startswith("Uid:"))
    svc_uid = pwd.getpwnam(SERVICE_USER).pw_uid

    def ns_ls(rel: str) -> list[str]:
        p = subprocess.run(["nsenter", f"--target={pid}", "--mount", "--", "ls", "-A", f"/run/chutes/{rel}"],
                           capture_output=True, text=True)
        return sorted(p.stdout.split()) if p.returncode == 0 else [f"error: {p.stderr.strip()}"]

    ns_top = ns_ls("")
    ns_ca = ns_ls("vm-root-ca") if "vm-root-ca" in ns_top else []
    reads = {rel: _as_service(f"/run/chutes/{rel}", pid) for rel in SERVICE_READS if rel in host_files}
    others = sorted(f for f in host_files if f not in SERVICE_READS)
    inside = {rel: _as_service(f"/run/chutes/{rel}", pid) for rel in others}
    outside = {rel: _as_service(f"/run/chutes/{rel}", None) for rel in host_files}
    ok = (
        (st.st_mode & 0o777) == 0o700 and st.st_uid == 0
        and uids and all(int(u) == svc_uid for u in uids) and svc_uid != 0
        and ns_top == sorted(set(SERVICE_BINDS) & set(host_top))
        and ns_ca in ([], ["ca.crt"])
        and bool(reads) and all(r for r, _ in reads.values())
        and not any(r for r, _ in inside.values()) and not any(r for r, _ in outside.values())
    )
    emit("run_chutes_namespace", ok, host_mode=oct(st.st_mode & 0o777), host_uid=st.st_uid, host_entries=host_top,
         service_uids=uids, service_user_uid=svc_uid, ns_entries=ns_top, ns_vm_root_ca=ns_ca,
         service_reads={k: v[1] for k, v in reads.items()},
         denied_in_namespace={k: v[1] for k, v in inside.items()},
         denied_outside={k: v[1] for k, v in outside.items()})


def main() -> int:
    t0 = time.monotonic()
    sock_state = systemctl_show("chutes-attest.socket", "ActiveState,SubState,Listen")
    emit("socket_unit", sock_state.get("ActiveState") == "active", **sock_state)
    emit(
        "socket_paths",
        os.path.exists(COMPAT) and os.path.exists(CHUTE),
        compat=os.path.exists(COMPAT),
        chute=os.path.exists(CHUTE),
    )

    status, body = get(COMPAT, "/health")
    emit(
        "compat_health",
        status == 200 and body == "pong",
        status=status,
        body=body,
        first_request_s=round(time.monotonic() - t0, 2),
    )

    nonce = secrets.token_bytes(32)
    status, body = get(COMPAT, f"/tdx/quote?nonce={nonce.hex()}")
    if status == 200 and isinstance(body, str):
        check_quote("compat_tdx_quote", body, nonce)
    else:
        emit("compat_tdx_quote", False, status=status, body=body)

    nonce = secrets.token_bytes(32)
    status, body = get(COMPAT, f"/attest?nonce={nonce.hex()}")
    if status == 200 and isinstance(body, dict) and "tdx_quote" in body:
        check_quote("compat_attest", body["tdx_quote"], nonce)
        # for the validator-side check on the host: what the validator's API client receives
        print(f"STAGE2-ATTEST: {json.dumps({'nonce': nonce.hex(), 'tdx_quote': body['tdx_quote']})}", flush=True)
    else:
        emit("compat_attest", False, status=status, body=body)

    status, body = get(COMPAT, "/tdx/quote?nonce=not-hex")
    emit(
        "compat_bad_nonce",
        status == 400 and isinstance(body, dict) and "nonce" in json.dumps(body).lower(),
        status=status,
        body=body,
    )

    nonce = secrets.token_bytes(32)
    status, body = get(CHUTE, f"/v1/evidence?nonce={nonce.hex()}")
    if status == 200 and isinstance(body, dict):
        ok_doc = body.get("nonce") == nonce.hex() and body.get("report_data", "")[:64] == nonce.hex()
        emit("chute_evidence_doc", ok_doc, keys=sorted(body))
        check_quote("chute_evidence_quote", body["quote"], nonce)
    else:
        emit("chute_evidence_doc", False, status=status, body=body)

    status, body = get(CHUTE, "/v1/status")
    boot = body.get("boot") if isinstance(body, dict) else None
    emit(
        "chute_status",
        status == 200 and isinstance(body, dict),
        status=status,
        quote_source=body.get("quote_source") if isinstance(body, dict) else None,
        boot_outcome=boot.get("outcome") if isinstance(boot, dict) else boot,
    )

    if CERT == HANDOFF_LEAF:
        with open(HANDOFF_LEAF) as fh:
            for line in fh.read().splitlines():
                print(f"STAGE2-LEAF-PEM: {line}", flush=True)
        st = os.stat("/run/chutes/proxy-tls/server.key")
        emit(
            "handoff_identity",
            not os.path.exists(SELF_SIGNED) and (st.st_mode & 0o777) == 0o640,
            cert=CERT,
            self_signed_created=os.path.exists(SELF_SIGNED),
            key_mode=oct(st.st_mode & 0o777),
            key_gid=st.st_gid,
        )

    svc = systemctl_show(
        "chutes-attest.service",
        "ActiveState,SubState,Type,WatchdogUSec,WatchdogTimestampMonotonic,NRestarts,MainPID,User",
    )
    emit(
        "service_active_watchdog",
        svc.get("ActiveState") == "active"
        and svc.get("WatchdogUSec") not in (None, "0", "infinity")
        and svc.get("WatchdogTimestampMonotonic", "0") != "0",
        **svc,
    )
    if svc.get("MainPID", "0").isdigit() and int(svc["MainPID"]) > 0:
        check_run_chutes(int(svc["MainPID"]))
    else:
        emit("run_chutes_namespace", False, error=f"no MainPID: {svc.get('MainPID')!r}")

    out = subprocess.run(
        ["journalctl", "-o", "json", "--no-pager", "-u", "chutes-attest.service"], capture_output=True, text=True
    ).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    structured = [
        e for e in entries if e.get("MESSAGE_ID") and e.get("EVENT") and e.get("SYSLOG_IDENTIFIER") == "chutes-attest"
    ]
    events = sorted({e["EVENT"] for e in structured})
    sample = next(
        (e for e in structured if e["EVENT"].startswith("serve.request")), structured[0] if structured else {}
    )
    fields = sorted(k for k in sample if not k.startswith("_") and not k.startswith("__"))
    emit(
        "journald_fields",
        bool(structured),
        entries=len(entries),
        structured=len(structured),
        events=events,
        sample_event=sample.get("EVENT"),
        sample_fields=fields,
        sample_message_id=sample.get("MESSAGE_ID"),
    )
    return 1 if FAILURES else 0


def diagnostics() -> None:
    """On failure: the service's own log lines, so the host-side assertion message shows the cause."""
    out = subprocess.run(
        ["journalctl", "--no-pager", "-o", "cat", "-n", "60", "-u", "chutes-attest.service"],
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        print(f"STAGE2-DIAG: {line}", flush=True)


if __name__ == "__main__":
    try:
        rc = main()
    except Exception as exc:  # report, never hang the VM
        emit("guest_check_crashed", False, error=f"{type(exc).__name__}: {exc}")
        rc = 1
    if rc:
        diagnostics()
    print("STAGE2-DONE", flush=True)
    sys.exit(rc)
