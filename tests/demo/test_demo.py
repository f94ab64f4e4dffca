"""The README's main job, end to end: `chutes-attest demo` boots a VM generation, serves, and every route answers.

Each run is the real CLI in a subprocess (root, FUSE, loop, cryptsetup, nginx). Besides the demo's own
PASS lines, the tests check what it left behind with independent tools: ``cryptsetup luksDump`` on the
images, ``debugfs`` on the config volume, the certificates with ``cryptography``, RTMR3 with
``chutes-attest rtmr3 predict``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from agent.evidence.report_data import spki_sha256
from agent.quote import parse_quote

pytestmark = pytest.mark.integration

#: Boot stages a 1.4.0 boot runs, in this order (reference §4.3), each with a timing in the summary.
STAGES_14 = ("config", "client_cert", "first_boot", "nonce", "quote", "attestation", "luks_header", "unlock",
             "first_boot_token", "root_confirm", "root_rotation", "handoff", "vm_root_ca", "rtmr3", "storage_quote",
             "storage_keys", "storage_confirm", "storage_volumes", "vm_tls", "validator_auth", "signing_keys")


def demo(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--work-dir", str(work), *args],
                          capture_output=True, text=True, timeout=600)


def luks_json(image: Path) -> dict[str, object]:
    res = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
                         capture_output=True, text=True, check=True)
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def passes(out: str) -> list[str]:
    return [line.removeprefix("demo: PASS ").split(":")[0] for line in out.splitlines()
            if line.startswith("demo: PASS ")]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def predict(root: Path, conf: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "agent.cli", "rtmr3", "predict", "--root", str(root),
                          "--measure-conf", str(conf)], capture_output=True, text=True, check=True)
    return res.stdout.strip()


@pytest.fixture(scope="module")
def run14(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("demo14") / "w"
    return work, demo(work, "--once")  # no --protocol: 1.4.0 is the default


Run = tuple[Path, subprocess.CompletedProcess[str]]


def test_default_demo_boots_14_rotates_the_root_and_serves(run14: Run) -> None:
    work, res = run14
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "demo: FAIL" not in out
    assert "READY" not in res.stderr  # readiness travels over NOTIFY_SOCKET, not stderr
    assert "curl -s --unix-socket" in out
    assert "SIMULATED" in out and "demo: generation: 1.4.0" in out
    for name in ("root rotation on root.img", "VM root CA", "proxy TLS leaf", "storage volume", "tdx-cache volume",
                 "RTMR3 rootfs chain", "validator-auth.env", "signing keys", "compat /health", "compat /attest",
                 "compat /attest binds the CA-signed proxy leaf", "quote RTMR3 = the registered runtime value",
                 "compat /devices", "compat /tdx/quote", "compat /nvtrust/evidence", "compat /attest bad nonce",
                 "chute /v1/status", "chute /v1/evidence", "chute /v1/rint/nonce",
                 "chute /v1/rint/validator-nonce (relay)", "chute /v1/symkey respond+verify"):
        assert name in passes(out), (name, out)
    assert f"demo: checks: {len(passes(out))} PASS, 0 FAIL" in out

    status = json.loads((work / "run" / "chutes" / "boot-status.json").read_text())
    assert status["outcome"] == "unlocked" and status["generation"] == "1.4"
    assert status["root_rotation"]["confirmed"] is True and status["root_rotation"]["killed"] == [0]
    # the summary shows every stage's timing, in the boot's order
    shown = [m.group(1) for m in re.finditer(r"^demo:   (\w+) +(\d+\.\d) ", out, re.M)]
    assert [s for s in shown if s in STAGES_14] == list(STAGES_14), shown


def test_14_images_and_handoff_checked_independently(run14: Run) -> None:
    work, res = run14
    assert res.returncode == 0
    # root: the build slot 0 is gone (killed after the confirmed rotation), token 15 removed
    root = luks_json(work / "root.img")
    assert list(root["keyslots"]) == ["1"] and root["tokens"] == {}  # type: ignore[call-overload]
    for label in ("storage", "tdx-cache"):
        meta = subprocess.run(["cryptsetup", "luksDump", str(work / f"{label}.img")], capture_output=True,
                              text=True, check=True).stdout
        assert re.search(rf"^Label:\s+{re.escape(label)}$", meta, re.M), meta
    run = work / "run" / "chutes"
    ca = x509.load_pem_x509_certificate((run / "vm-root-ca" / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((run / "proxy-tls" / "server.crt").read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert ca.public_key().key_size == 4096  # type: ignore[union-attr]
    assert not (run / "vm-root-ca" / "ca.key").exists() and not (run / "cert-hash").exists()
    assert mode(run / "proxy-tls" / "server.key") == 0o640 and mode(run / "validator-auth.env") == 0o600
    assert not (work / "certs" / "server.crt").exists()  # serve never fell back to a self-signed identity
    # the service's /attest quote: report_data = nonce ‖ SHA-256(SPKI of the CA-signed leaf), not of the CA
    attest = json.loads((work / "attest-once.json").read_text())
    quote = parse_quote(base64.b64decode(attest["body"]["tdx_quote"]))
    assert quote.report_data == bytes.fromhex(attest["nonce"]) + spki_sha256(leaf)
    assert spki_sha256(leaf) != spki_sha256(ca)
    # RTMR3: what the boot extended == the quote's == an independent prediction over the demo root
    status = json.loads((run / "boot-status.json").read_text())
    predicted = predict(work / "rootfs", work / "initramfs" / "etc" / "tdx-measure.conf")
    assert status["rtmr3"]["value"] == quote.rtmr3.hex() == predicted != "00" * 48
    # the simulated miner seed exists only on the config volume: never in the demo's output or other files
    seed = subprocess.run(["debugfs", "-R", "cat /miner-seed", str(work / "config.img")], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", seed)
    assert seed not in res.stdout + res.stderr
    for path in work.rglob("*"):
        if path.is_file() and path.name != "config.img" and path.stat().st_size < 50 << 20:
            assert seed.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("protocol", ["1.2", "1.3"])
def test_older_generation_boots_and_serves(tmp_path_factory: pytest.TempPathFactory, protocol: str) -> None:
    # a short directory: the demo's socket paths live under it (sun_path holds 107 bytes; the test's own
    # name plus xdist's worker directory would exceed it)
    work = tmp_path_factory.mktemp(f"d{protocol}") / "w"
    res = demo(work, "--once", "--protocol", protocol)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "demo: FAIL" not in out
    assert json.loads((work / "run" / "chutes" / "boot-status.json").read_text())["generation"] == protocol
    assert {"compat /attest binds the self-signed service cert", "root.img unlocked with the build passphrase",
            "storage volume", "chute /v1/status"} <= set(passes(out))
    run = work / "run" / "chutes"
    assert not (run / "vm-root-ca").exists() and not (run / "proxy-tls").exists()
    assert list(luks_json(work / "root.img")["keyslots"]) == ["0"]  # type: ignore[call-overload]
    if protocol == "1.2":
        assert "demo: generation: ≤1.2" in out
        assert mode(run / "boot-token") == 0o600
    else:
        assert "demo: generation: 1.3.x" in out and "RTMR3 rootfs chain" in passes(out)
        assert mode(run / "luks-quote-nonce") == 0o600


def test_fails_closed_on_tampered_header(tmp_path: Path) -> None:
    res = demo(tmp_path / "w", "--boot-only", "--fail", "cipher-null")
    assert res.returncode != 0
    assert "TDX-LUKS-UNLOCK-FAILED:" in res.stdout + res.stderr
    assert "cipher_null" in res.stdout + res.stderr
    assert "root.img opens with the build passphrase" in res.stdout
    assert not (tmp_path / "w" / "run" / "chutes" / "luks-quote-nonce").exists()


def test_refused_root_confirm_leaves_the_build_key(tmp_path: Path) -> None:
    work = tmp_path / "w"
    res = demo(work, "--boot-only", "--fail", "root-confirm")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "TDX-LUKS-UNLOCK-FAILED: root_rotation:" in res.stderr
    assert "root.img opens with the build passphrase; vm-root-ca/ca.key absent" in res.stdout
    assert list(luks_json(work / "root.img")["keyslots"]) == ["0"]  # type: ignore[call-overload]  # root_next removed
    assert "demo: boot outcome=failed" in res.stdout and "demo: generation: 1.4.0" in res.stdout


def test_tampered_rootfs_fails_the_rtmr3_chain(tmp_path: Path) -> None:
    res = demo(tmp_path / "w", "--boot-only", "--fail", "rtmr3", "--protocol", "1.3")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "RTMR3-MEASURE-FAILED: rtmr3: /etc/chutes/agent.conf" in res.stderr


def test_impossible_combinations_are_usage_errors(tmp_path: Path) -> None:
    for args, text in ((("--fail", "root-confirm", "--protocol", "1.2"), "only with --protocol 1.4"),
                       (("--quote", "simulated"), "only with --protocol 1.2")):
        res = demo(tmp_path / "w", "--boot-only", *args)
        assert res.returncode == 2 and text in res.stderr, res.stderr
    assert not (tmp_path / "w").exists()


def test_cli_lists_match_the_simulation() -> None:
    from agent.commands import demo as cmd
    from agent.sim import demo as sim

    assert cmd.FAIL_MODES == sim.FAIL_MODES and cmd.PROTOCOLS == sim.PROTOCOLS and cmd.TEES == sim.TEES


# --- AMD SEV-SNP (issue 19): `demo --tee snp` ------------------------------------------------------------

#: A 1.4.0 boot on SEV-SNP: the TEE after the network, no rtmr3 stage, the rootfs digest step instead.
STAGES_14_SNP = ("config", "network", "tee", "client_cert", "first_boot", "nonce", "quote", "self_check",
                 "attestation", "luks_header", "unlock", "first_boot_token", "root_confirm", "root_rotation",
                 "handoff", "vm_root_ca", "rootfs", "storage_quote", "self_check", "storage_keys", "storage_confirm",
                 "storage_volumes", "vm_tls", "validator_auth", "signing_keys")


@pytest.fixture(scope="module")
def run_snp(tmp_path_factory: pytest.TempPathFactory) -> Run:
    work = tmp_path_factory.mktemp("demosnp") / "w"
    return work, demo(work, "--tee", "snp", "--once")


def test_snp_demo_boots_serves_and_passes_every_route(run_snp: Run) -> None:
    from agent.quote.kind import evidence_kind
    from agent.quote.snp_parser import parse_snp_report

    work, res = run_snp
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "demo: FAIL" not in out and "SIMULATED AMD SEV-SNP VM" in out
    for name in ("TEE", "SEV-SNP rootfs digest", "root rotation on root.img", "VM root CA", "storage volume",
                 "compat /attest", "compat /attest binds the CA-signed proxy leaf",
                 "SNP report MEASUREMENT = the registered launch digest", "compat /tdx/quote", "compat /quote",
                 "compat /nvtrust/evidence", "chute /v1/evidence", "chute /v1/status",
                 "chute /v1/symkey respond+verify"):
        assert name in passes(out), (name, out)
    assert "RTMR3 rootfs chain" not in passes(out)
    assert f"demo: checks: {len(passes(out))} PASS, 0 FAIL" in out
    status = json.loads((work / "run" / "chutes" / "boot-status.json").read_text())
    assert status["tee"] == "snp" and status["outcome"] == "unlocked" and "rtmr3" not in status
    shown = [m.group(1) for m in re.finditer(r"^demo:   (\w+) +(\d+\.\d) ", out, re.M)]
    assert [s for s in shown if s in STAGES_14_SNP] == list(STAGES_14_SNP), shown
    # independently: the /attest answer carried exactly snp_quote, a 1184-byte report bound to the leaf
    attest = json.loads((work / "attest-once.json").read_text())
    assert set(attest["body"]) == {"snp_quote", "nvtrust_evidence"}
    raw = base64.b64decode(attest["body"]["snp_quote"])
    assert len(raw) == 1184 and evidence_kind(raw) == "snp"
    leaf = x509.load_pem_x509_certificate((work / "run" / "chutes" / "proxy-tls" / "server.crt").read_bytes())
    assert parse_snp_report(raw).report_data == bytes.fromhex(attest["nonce"]) + spki_sha256(leaf)
    # the rootfs digest file, against an independent model of the next list digest over the demo root (its list
    # names /etc and /usr): every regular file once, byte-wise path order, "<sha384> <path>\n", SHA-384 of that
    root = work / "rootfs"
    files = sorted(b"/" + bytes(p.relative_to(root)) for top in ("etc", "usr") for p in (root / top).rglob("*")
                   if p.is_file() and not p.is_symlink())
    text = b"".join(hashlib.sha384((root / f[1:].decode()).read_bytes()).hexdigest().encode() + b" " + f + b"\n"
                    for f in files)
    digest = work / "run" / "sek8s" / "rootfs-digest"
    assert digest.read_text() == hashlib.sha384(text).hexdigest() + "\n" and mode(digest) == 0o444


def test_snp_tampered_rootfs_fails_closed(tmp_path: Path) -> None:
    res = demo(tmp_path / "w", "--tee", "snp", "--boot-only", "--fail", "rtmr3")
    assert res.returncode == 3, res.stdout + res.stderr
    assert ("ROOTFS-MEASURE-FAILED: rootfs: SEV-SNP: root filesystem does not match the canonical manifest ("
            in res.stderr), res.stderr
    assert not (tmp_path / "w" / "run" / "sek8s" / "rootfs-digest").exists()
