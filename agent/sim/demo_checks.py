"""What the demo checks and prints: the boot's results on the real images, every route over the real sockets.

Kept apart from the orchestration (:mod:`agent.sim.demo`) so each check reads as one assertion about a
real value: which key opens the LUKS2 image, which certificate the quote's report_data binds, what
RTMR3 the quote carries (on SEV-SNP: the report's MEASUREMENT and the rootfs digest file). No check prints a
secret: keys are only tried against the images.
"""

from __future__ import annotations

import base64
import json
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

if TYPE_CHECKING:
    from agent.sim.demo import DemoPaths, DemoRig

Check = tuple[str, bool, str]
#: How the summary names each generation (reference §1).
GENERATION_NAMES = {"1.2": "≤1.2 (boot_token)", "1.3": "1.3.x (luks/attest)", "1.4": "1.4.0 (VM root CA, provision)"}
SIGNING_KEY_FILES = ("cosign/chutes.pub", "cosign/dockerhub.pub", "helm-pubkey.gpg")


def launch_token(url: str, config_id: str) -> str:
    """A launch JWT shaped like the validator's (ES256, ``url`` claim); signed by a throw-away key."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"iss": "chutes", "sub": config_id, "iat": now, "exp": now + 12600,
                             "url": url, "env_type": "tee"}).encode())
    key = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def served_cert_path(p: DemoPaths, generation: str) -> Path:
    """The certificate whose SPKI the service must bind: the boot's CA-signed leaf on 1.4.0, else self-signed."""
    return p.proxy_leaf if generation == "1.4" else p.self_signed_cert


# ── after the boot: the real images and the hand-off ─────────────────────────

@dataclass
class KeyState:
    """Which of the keys the demo knows opens the root image (tried with ``--test-passphrase``)."""

    build: bool
    rotated: bool
    #: ``--fail wrong-key``: the key the image was made with instead (the validator never held it).
    wrong: bool = False

    def describe(self) -> str:
        opens = [n for n, ok in (("the build passphrase", self.build), ("the validator's rotated key", self.rotated),
                                 ("only the image's own key, which the validator never held (--fail wrong-key)",
                                  self.wrong)) if ok]
        return " and ".join(opens) if opens else "NEITHER key (a half-rotated disk)"


def root_key_state(rig: DemoRig) -> KeyState:
    """The build passphrase vs the key the validator stored after a confirmed rotation (none before)."""
    from agent.boot.cryptsetup import Cryptsetup

    cs = Cryptsetup()
    root = str(rig.paths.root_image)
    stored = rig.v.vm(rig.vm).root_stored
    wrong = rig.image_key is not rig.build_key and cs.test_key(root, rig.image_key)
    return KeyState(cs.test_key(root, rig.build_key), stored is not None and cs.test_key(root, stored), wrong)


def boot_checks(rig: DemoRig, status: dict[str, Any]) -> list[Check]:
    """What a successful boot of this generation must have left on the images and in the hand-off dir."""
    from agent.boot.cryptsetup import Cryptsetup

    cs = Cryptsetup()
    p, gen, out = rig.paths, rig.generation, []
    out.append(("boot generation", status.get("generation") == gen,
                f"validator answered as {status.get('generation')}, demo validator serves {gen}"))
    keys = root_key_state(rig)
    if gen == "1.4":
        token = cs.token_exists(str(p.root_image), 15)
        out.append(("root rotation on root.img", not keys.build and keys.rotated and not token,
                    f"build passphrase opens it: {keys.build}; the validator's rotated key: {keys.rotated}; "
                    f"first-boot token 15 present: {token}"))
    else:
        out.append(("root.img unlocked with the build passphrase", keys.build,
                    f"build passphrase opens it: {keys.build} (no rotation before 1.4.0)"))
    for label, image in (("storage", p.storage_image), ("tdx-cache", p.tdx_cache_image)):
        key = rig.v.volume_key(rig.vm, label)
        ok = key is not None and cs.is_luks(str(image)) and cs.test_key(str(image), key)
        out.append((f"{label} volume", ok, f"{image.name} is LUKS2 and opens with the validator's key: {ok}"))
    out.append(("TEE", status.get("tee") == rig.tee,
                f"boot resolved {status.get('tee')} ({status.get('tee_resolved')}), the demo guest is {rig.tee}"))
    if gen in ("1.3", "1.4") and rig.tee == "snp":
        out.append(_rootfs_digest_check(rig, status))
    elif gen in ("1.3", "1.4"):
        value = rig.mr_state.rtmr(3).hex()
        ok = value == rig.predicted_rtmr3 == (status.get("rtmr3") or {}).get("value")
        out.append(("RTMR3 rootfs chain", ok,
                    f"emulated RTMR3 {value[:16]}… == `chutes-attest rtmr3 predict` {rig.predicted_rtmr3[:16]}…"))
        out.append(("cert-hash removed, luks-quote-nonce kept",
                    not (p.handoff / "cert-hash").exists() and _mode(p.handoff / "luks-quote-nonce") == 0o600,
                    "hand-off as reference §7"))
    if gen == "1.2":
        token_file = p.handoff / "boot-token"
        out.append(("boot-token hand-off", token_file.is_file() and _mode(token_file) == 0o600,
                    f"{token_file.relative_to(p.work)} 0600"))
    if gen == "1.4":
        out += _checks_14(rig)
    return out


def _rootfs_digest_check(rig: DemoRig, status: dict[str, Any]) -> Check:
    """SEV-SNP: the digest file the boot left for rootfs-verify == SHA-384 of ``rtmr3 predict --list``, 0444."""
    path = rig.paths.rootfs_digest
    text = path.read_text() if path.is_file() and not path.is_symlink() else ""
    ok = (text == rig.predicted_list_digest + "\n" and _mode(path) == 0o444
          and (status.get("rootfs") or {}).get("digest") == rig.predicted_list_digest)
    return ("SEV-SNP rootfs digest", ok,
            f"{path.relative_to(rig.paths.work)} (0444) = `rtmr3 predict --list | sha384` "
            f"{rig.predicted_list_digest[:16]}…: {ok}")


def _checks_14(rig: DemoRig) -> list[Check]:
    from cryptography.hazmat.primitives.serialization import Encoding

    p, out = rig.paths, []
    ca_pem = p.vm_root_ca.read_bytes()
    stored = rig.v.stored_ca(rig.vm)
    ok = stored is not None and stored.public_bytes(Encoding.PEM) == ca_pem and not (p.vm_root_ca.parent /
                                                                                     "ca.key").exists()
    out.append(("VM root CA", ok, "validator stored the /provision client CA == vm-root-ca/ca.crt; ca.key deleted"))
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate(p.proxy_leaf.read_bytes())
    try:
        leaf.verify_directly_issued_by(ca)
        issued = True
    except (ValueError, TypeError, InvalidSignature):
        issued = False
    out.append(("proxy TLS leaf", issued and _mode(p.proxy_leaf.with_name("server.key")) == 0o640,
                f"{leaf.subject.rfc4514_string()} issued by {ca.subject.rfc4514_string()}, key 0640"))
    auth = rig.v.vm_auth_key(rig.vm)
    env = p.handoff / "validator-auth.env"
    ok = auth is not None and env.read_text() == f"ALLOWED_VALIDATORS={auth.ss58}\n" and _mode(env) == 0o600
    out.append(("validator-auth.env", ok, f"ALLOWED_VALIDATORS = this boot's vm_auth_ss58, 0600: {ok}"))
    keys = [p.handoff / "signing-keys" / n for n in SIGNING_KEY_FILES]
    out.append(("signing keys", all(k.is_file() for k in keys),
                f"{sum(k.is_file() for k in keys)}/3 verified against the simulated root signing key"))
    return out


def handoff_listing(p: DemoPaths) -> list[str]:
    """``mode path`` of every hand-off file (never contents)."""
    if not p.handoff.is_dir():
        return []
    return [f"{_mode(f):04o} {f.relative_to(p.work)}" for f in sorted(p.handoff.rglob("*"))
            if f.is_file() and not f.is_socket()]


# ── the service: every route over the real sockets ───────────────────────────

def curl_lines(p: DemoPaths, vm: str, token: str) -> list[str]:
    nonce = secrets.token_hex(32)
    compat, chute = p.compat_socket, p.chute_socket
    return [
        "# compat socket (what the node's attestation proxy calls)",
        f"curl -s --unix-socket {compat} http://localhost/health",
        f"curl -s --unix-socket {compat} 'http://localhost/attest?nonce={nonce}'",
        f"curl -s --unix-socket {compat} http://localhost/devices",
        f"curl -s --unix-socket {compat} 'http://localhost/tdx/quote?nonce={nonce}'",
        f"curl -s --unix-socket {compat} 'http://localhost/nvtrust/evidence?name={vm}&nonce={nonce}'",
        "# chute socket (what chute containers call)",
        f"curl -s --unix-socket {chute} http://localhost/v1/health",
        f"curl -s --unix-socket {chute} http://localhost/v1/status",
        f"curl -s --unix-socket {chute} 'http://localhost/v1/evidence?nonce={nonce}'",
        f"curl -s --unix-socket {chute} http://localhost/v1/devices",
        f"curl -s --unix-socket {chute} -X POST http://localhost/v1/rint/nonce",
        f"curl -s --unix-socket {chute} -H 'Authorization: {token}' http://localhost/v1/rint/validator-nonce",
        f"curl -s --unix-socket {chute} -X POST -H 'Content-Type: application/json' "
        "-d '{\"symmetric_key\": \"00112233445566778899aabbccddeeff\", \"proto\": \"tcp\", \"port\": 8080}' "
        "http://localhost/v1/symkey/respond",
    ]


async def self_test(rig: DemoRig, token: str) -> list[Check]:
    """Call every route over the real sockets and check the answers (``--once``)."""
    import aiohttp

    from agent.evidence.report_data import spki_sha256
    from agent.quote import Quote
    from agent.quote.kind import parse_evidence
    from agent.quote.snp_parser import SnpReport

    p, gen, snp = rig.paths, rig.generation, rig.tee == "snp"
    results: list[Check] = []
    nonce = secrets.token_hex(32)
    cert_path = served_cert_path(p, gen)
    cert_hash = spki_sha256(cert_path.read_bytes())
    runtime_rtmr3 = rig.predicted_rtmr3 if gen != "1.2" else "00" * 48

    def bound(quote_b64: str) -> bool:
        """A TDX quote or SEV-SNP report (told apart by its bytes) whose REPORTDATA is nonce ‖ SPKI hash."""
        ev = parse_evidence(base64.b64decode(quote_b64))
        return bytes(ev.report_data) == bytes.fromhex(nonce) + cert_hash

    async def call(sock: Path, method: str, route: str, **kw: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s, \
                s.request(method, f"http://localhost{route}", **kw) as r:
            return r.status, await r.json(content_type=None)

    st, body = await call(p.compat_socket, "GET", "/health")
    results.append(("compat /health", st == 200 and body == "pong", f"{st} {body!r}"))
    st, body = await call(p.compat_socket, "GET", f"/attest?nonce={nonce}")
    # kept for inspection (public evidence only): the quote, its nonce and the GPU reports
    p.attest_record.write_text(json.dumps({"nonce": nonce, "status": st, "body": body}))
    key = "snp_quote" if snp else "tdx_quote"
    quote = parse_evidence(base64.b64decode(body[key])) if st == 200 and key in body else None
    ok = (st == 200 and set(body) == {key, "nvtrust_evidence"} and bound(body[key])
          and len(json.loads(body["nvtrust_evidence"])) == 8)
    results.append(("compat /attest", ok, f"{st}, exactly one quote key {key!r}, bound to nonce, "
                                          "8 GPU evidence entries"))
    if gen == "1.4":
        detail = (f"report_data[32:] = SHA-256(SPKI) of the CA-signed leaf {cert_path.relative_to(p.work)}; "
                  f"self-signed fallback {'absent' if not p.self_signed_cert.exists() else 'PRESENT'}")
        ok = quote is not None and quote.report_data[32:] == cert_hash and not p.self_signed_cert.exists()
        results.append(("compat /attest binds the CA-signed proxy leaf", ok, detail))
    else:
        ok = quote is not None and quote.report_data[32:] == cert_hash and not p.proxy_leaf.exists()
        results.append(("compat /attest binds the self-signed service cert", ok,
                        f"no boot hand-off leaf before 1.4.0: {cert_path.relative_to(p.work)}"))
    if snp:
        report = quote if isinstance(quote, SnpReport) else None
        value = bytes(report.measurement).hex() if report is not None else "?"
        ok = report is not None and len(report.raw) == 1184 and value == rig.snp_measurement
        results.append(("SNP report MEASUREMENT = the registered launch digest", ok,
                        f"{value[:16]}… (1184-byte report; no RTMR3 on SEV-SNP)"))
    else:
        tdq = quote if isinstance(quote, Quote) else None
        ok = tdq is not None and tdq.rtmr3.hex() == runtime_rtmr3
        how = "left by the boot's rootfs chain" if gen != "1.2" else "zero: no rootfs chain before 1.3"
        results.append(("quote RTMR3 = the registered runtime value", ok,
                        f"{tdq.rtmr3.hex()[:16] if tdq else '?'}… ({how})"))
    st, body = await call(p.compat_socket, "GET", "/devices")
    results.append(("compat /devices", st == 200 and len(body) == 8, f"{st} {len(body)} GPUs"))
    for route in ("/tdx/quote", "/quote"):  # both return bare base64 of whichever TEE this is
        st, body = await call(p.compat_socket, "GET", f"{route}?nonce={nonce}")
        results.append((f"compat {route}", st == 200 and isinstance(body, str) and bound(body), f"{st}"))
    st, body = await call(p.compat_socket, "GET", f"/nvtrust/evidence?name={rig.vm}&nonce={nonce}")
    ok = st == 200 and isinstance(body, str) and len(json.loads(body)) == 8
    results.append(("compat /nvtrust/evidence", ok, f"{st}, 8 GPU evidence entries"))
    st, body = await call(p.compat_socket, "GET", "/attest?nonce=abc")
    results.append(("compat /attest bad nonce", st == 400, f"{st} {body}"))
    st, body = await call(p.chute_socket, "GET", "/v1/status")
    boot = (body.get("boot") or {}) if isinstance(body, dict) else {}
    results.append(("chute /v1/status", st == 200 and boot.get("outcome") == "unlocked"
                    and boot.get("generation") == gen,
                    f"{st} boot={boot.get('outcome')} generation={boot.get('generation')}"))
    st, body = await call(p.chute_socket, "GET", f"/v1/evidence?nonce={nonce}")
    ok = st == 200 and body.get("tee") == rig.tee and bound(body["quote"]) and len(body["gpu_evidence"]) == 8
    results.append(("chute /v1/evidence", ok, f"{st}, tee={body.get('tee') if isinstance(body, dict) else '?'}, "
                                              "quote bound to nonce, 8 GPU evidence entries"))
    st, body = await call(p.chute_socket, "POST", "/v1/rint/nonce")
    results.append(("chute /v1/rint/nonce", st == 200 and len(body.get("nonce", "")) == 32, f"{st} {body}"))
    st, body = await call(p.chute_socket, "GET", "/v1/rint/validator-nonce", headers={"Authorization": token})
    results.append(("chute /v1/rint/validator-nonce (relay)", st == 200, f"{st}"))
    key = "00112233445566778899aabbccddeeff"
    st, body = await call(p.chute_socket, "POST", "/v1/symkey/respond",
                          json={"symmetric_key": key, "proto": "tcp", "port": 8080})
    answer = body.get("response", "") if isinstance(body, dict) else ""
    st2, body2 = await call(p.chute_socket, "POST", "/v1/symkey/verify",
                            json={"symmetric_key": key, "response": answer, "proto": "tcp", "port": 8080})
    results.append(("chute /v1/symkey respond+verify", st == 200 and st2 == 200 and body2.get("valid") is True,
                    f"{st}/{st2} {body2}"))
    return results


def print_checks(results: list[Check]) -> bool:
    for name, ok, detail in results:
        print(f"demo: {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return all(ok for _, ok, _ in results)


# ── the summary ──────────────────────────────────────────────────────────────

def summary_lines(generation: str, status: dict[str, Any] | None, phases: dict[str, float],
                  checks: list[Check]) -> list[str]:
    """Which generation ran, the boot's stages (from its boot-status.json) and the demo's own phases."""
    out = ["", "demo: ── summary (everything below ran against SIMULATED hardware and a SIMULATED validator) ──",
           f"demo: generation: {GENERATION_NAMES[generation]}, served by the faithful validator; the agent ran "
           f"with boot.protocol = auto and took the steps from the answer: "
           f"{(status or {}).get('generation') or 'no answer classified'}"]
    if status:
        out.append(f"demo: TEE: {status.get('tee')} ({status.get('tee_resolved')})")
        out.append(f"demo: boot outcome={status.get('outcome')} reason={status.get('reason')}")
        out.append("demo: boot stages (ms, from the hand-off dir's boot-status.json; wait = network/quote/keygen):")
        for rec in status.get("stages", []):
            waits = rec.get("waits_ms") or {}
            wait = ", ".join(f"{k} {v:.1f}" for k, v in waits.items() if v)
            line = f"demo:   {rec['stage']:<20} {rec['duration_ms']:9.1f}  {rec['result']:<7}"
            if wait:
                line += f" wait: {wait}"
            if rec.get("detail"):
                line += f"  {rec['detail'][:90]}"
            out.append(line.rstrip())
        t = status.get("timings") or {}
        order = sorted(t, key=lambda k: (k != "total_ms", not k.endswith("_wait_ms"), k))
        out.append("demo: boot totals (ms): " + ", ".join(f"{k.removesuffix('_ms')} {t[k]:.1f}" for k in order))
    out.append("demo: demo phases (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    if checks:
        passed = sum(ok for _, ok, _ in checks)
        out.append(f"demo: checks: {passed} PASS, {len(checks) - passed} FAIL")
    return out
