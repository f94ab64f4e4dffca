"""Benchmark: a well-behaved container and the validator's compat path while a hostile container attacks.

One real ``chutes-attest serve`` process (simulated quote source, emulated GPUs, JSON logs to a file as
in production). Three client processes, each in its own cgroup v2 directory when run as root (so the
service sees three different callers, as it would three containers):

- probe "good": a well-behaved container, ``GET /v1/evidence`` on the chute socket, one keep-alive
  connection, paced (every ``--interval`` seconds), latency of each request recorded;
- probe "compat": the validator's path, ``GET /attest`` on the compat socket, paced the same way;
- "hostile": one container running every attack of issue 11 at once at full speed: all the connections
  it may hold (and more, refused) each pipelining ``/v1/evidence`` (into its queue share and rate limit),
  ``POST /v1/rint/nonce`` (its nonce share, rotating) and ``/v1/rint/validator-nonce`` (its relay limit)
  requests, plus connect-and-exit connections that land in the unidentified scope.

Condition "unloaded" runs both probes alone; "loaded" runs them again with the hostile container at full
speed; the two alternate (U, L, U, L) in the same run so drift in the machine's other load hits both.
Prints each probe's p50/p99 per condition, the loaded/unloaded p99 ratio (target <= 2x), and the
service's peak RSS against half of the unit's MemoryMax.

On a shared 2-core machine every process competes for the same cores. The hostile client runs as
SCHED_IDLE (BENCH_HOSTILE_SCHED=normal to change that): on a node its flood is fed by the container's own
CPUs, here it would otherwise take the service's CPU time, which no server-side measure can give back.
It still sends as fast as the machine lets it (tens of thousands of requests per segment). The quote
source and GPUs are emulated in Python on threads, so their work also competes for the GIL with the event
loop answering the flood, which hardware sources (kernel / driver calls) mostly do not.
BENCH_ATTACK=evidence,nonce,relay,churn picks a subset of the attacks; BENCH_KEEP_LOG=FILE keeps the service's
log (with CHUTES_ATTEST_SERVE_REQUEST_LOG=each: every request's server-side duration).

    python bench/bench_hostile_load.py [--seconds 24] [--interval 0.06] [--rounds 2] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _memory_max() -> int:
    m = re.search(r"^MemoryMax=(\d+)([KMG]?)\s*$", (REPO / "systemd/chutes-attest.service").read_text(), re.M)
    assert m
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2)]


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2" and os.access(parts[1], os.W_OK):
            return Path(parts[1])
    return None


def _join_cgroup(path: str) -> None:
    if path:
        Path(path, "cgroup.procs").write_text(str(os.getpid()))


# -- probe (a child process) ---------------------------------------------------------------------------

async def _probe(sock: str, target: str, seconds: float, interval: float) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(sock)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    end = time.monotonic() + seconds
    nxt = time.monotonic()
    while time.monotonic() < end:
        path = target.replace("NONCE", secrets.token_hex(32))
        t0 = time.perf_counter()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
        code = head.split(b" ", 2)[1].decode()
        statuses[code] = statuses.get(code, 0) + 1
        nxt += interval
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    writer.close()
    return {"lat": lat, "statuses": statuses}


def probe_main(sock: str, target: str, seconds: float, interval: float, cg: str) -> None:
    _join_cgroup(cg)
    print(json.dumps(asyncio.run(_probe(sock, target, seconds, interval))), flush=True)


# -- hostile (a child process) -------------------------------------------------------------------------

_ATTACKS = {
    "evidence": b"GET /v1/evidence?nonce=%s HTTP/1.1\r\nHost: x\r\n\r\n",
    "nonce": b"POST /v1/rint/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "relay": b"GET /v1/rint/validator-nonce HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n\r\n",
}
#: BENCH_ATTACK=evidence,nonce,relay,churn (default: all) picks the attacks, to see which one costs most.
_CHOSEN = os.environ.get("BENCH_ATTACK", "evidence,nonce,relay,churn").split(",")
_ATTACK = [v for k, v in _ATTACKS.items() if k in _CHOSEN] or [_ATTACKS["nonce"]]


class _Flood(asyncio.Protocol):
    """Pipelines batches of attack requests on one connection as fast as answers come back."""

    def __init__(self, counter: list[int], batch: int = 16) -> None:
        self.counter = counter
        self.batch = batch
        self.pending = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        out = []
        for i in range(self.batch):
            req = _ATTACK[i % len(_ATTACK)]
            out.append(req % secrets.token_hex(32).encode() if b"%s" in req else req)
        self.pending += self.batch
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        n = data.count(b"HTTP/1.1 ")
        self.pending -= n
        self.counter[0] += n
        if self.pending <= self.batch // 2:
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter[1] += 1


def _connect_and_exit(sock: str) -> None:
    """A child connects and exits; the parent keeps the socket (the unidentified-scope attack)."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            socket.send_fds(b, [b"x"], [s.fileno()])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    try:
        a.settimeout(1)
        socket.recv_fds(a, 1, 1)
    except OSError:
        pass
    a.close()
    b.close()


async def _hostile(sock: str, seconds: float, connections: int) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    counter = [0, 0]  # answers, connections lost
    end = loop.time() + seconds
    transports = []
    while loop.time() < end:
        want = connections if "churn" in _CHOSEN else min(connections, 32)
        while len([t for t in transports if not t.is_closing()]) < want and loop.time() < end:
            try:
                t, _ = await loop.create_unix_connection(lambda: _Flood(counter), sock)
                transports.append(t)
            except OSError:
                await asyncio.sleep(0.01)
            transports = [t for t in transports if not t.is_closing()]
        if "churn" in _CHOSEN:
            await loop.run_in_executor(None, _connect_and_exit, sock)
        await asyncio.sleep(0.05)
    for t in transports:
        t.close()
    return {"answers": counter[0], "connections_lost": counter[1]}


def hostile_main(sock: str, seconds: float, connections: int, cg: str) -> None:
    _join_cgroup(cg)
    if os.environ.get("BENCH_HOSTILE_SCHED", "idle") == "idle":
        # On a node the container's own CPUs feed its flood; on this shared box the attacker's client
        # would otherwise take the service's CPU time, which no server-side measure can give back.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    print(json.dumps(asyncio.run(_hostile(sock, seconds, connections))), flush=True)


# -- orchestration -------------------------------------------------------------------------------------

def _child(mode: str, *args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, f"--{mode}", *map(str, args)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _result(proc: subprocess.Popen[bytes]) -> dict:
    out, _ = proc.communicate(timeout=300)
    return json.loads(out.decode().strip().splitlines()[-1])


def _phase(tmp: Path, seconds: float, interval: float, cgs: dict[str, str], hostile: bool,
           server_pid: int, connections: int = 64) -> dict[str, object]:
    chute, compat = str(tmp / "chute.sock"), str(tmp / "compat.sock")
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kb(server_pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attacker = None
    if hostile:
        attacker = _child("hostile", chute, seconds + 3, connections, cgs["hostile"])
        time.sleep(1.5)  # the flood is at full speed before measuring
    good = _child("probe", chute, "/v1/evidence?nonce=NONCE", seconds, interval, cgs["good"])
    validator = _child("probe", compat, "/attest?nonce=NONCE", seconds, interval, cgs["compat"])
    g, v = _result(good), _result(validator)
    h = _result(attacker) if attacker is not None else None
    stop.set()
    sampler.join()
    return {"good": g, "compat": v, "hostile": h, "rss_peak_kb": peak[0]}


def _merge(parts: list[dict]) -> dict:
    """One phase's figures from several segments of the same condition."""
    out: dict = {"rss_peak_kb": max(p["rss_peak_kb"] for p in parts)}
    for probe in ("good", "compat"):
        statuses: dict[str, int] = {}
        for p in parts:
            for k, v in p[probe]["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        out[probe] = {"lat": [x for p in parts for x in p[probe]["lat"]], "statuses": statuses}
    hs = [p["hostile"] for p in parts if p["hostile"]]
    out["hostile"] = {k: sum(h[k] for h in hs) for k in hs[0]} if hs else None
    return out


def _summary(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(_pct(lat, 0.5) * 1000, 2), "p99_ms": round(_pct(lat, 0.99) * 1000, 2)}


def one_round(seconds: float, interval: float, connections: int = 64) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="bhl-"))
    os.chmod(tmp, 0o755)
    conf = tmp / "agent.toml"
    conf.write_text(f"""
[quote]
source = "simulated"
simulated_state_dir = "{tmp}/sim"
[gpu]
emulate = "h100x1"
[tpm]
mode = "off"
[serve]
compat_socket = "{tmp}/compat.sock"
chute_socket = "{tmp}/chute.sock"
cert_path = "{tmp}/certs/server.crt"
key_path = "{tmp}/certs/server.key"
socket_mode = 438
# the probes send ~16 evidence requests/s: above the default per-caller limit of 2/s, so raise it for
# every caller (the hostile container too: more of its flood reaches the quote queue and GPU evidence)
evidence_rate_per_s = 20.0
evidence_burst = 20
""")
    root = _cgroup2_root()
    cgs = {}
    for name in ("good", "compat", "hostile"):
        cgs[name] = ""
        if root is not None:
            d = root / f"bench-hostile-{name}-{secrets.token_hex(3)}"
            d.mkdir()
            cgs[name] = str(d)
    notify_path = str(tmp / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    with open(tmp / "serve.log", "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "agent.cli", "--config", str(conf), "--log-format", "json",
                                   "serve"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass

        def drain() -> None:  # keep reading STATUS= updates: a full notify socket blocks the service
            with contextlib.suppress(OSError):
                while notify.recv(4096):
                    pass

        notify.settimeout(None)
        threading.Thread(target=drain, daemon=True).start()
        _phase(tmp, 1.0, interval, cgs, False, server.pid)  # warm-up
        # Alternate unloaded/loaded segments so drift in what else the machine runs hits both alike.
        segments = [_phase(tmp, seconds / 2, interval, cgs, hostile, server.pid, connections)
                    for hostile in (False, True, False, True)]
        unloaded, loaded = _merge(segments[0::2]), _merge(segments[1::2])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack into the log
            time.sleep(2)
            server.kill()
            print("service did not stop within 60 s of SIGTERM; log tail:", file=sys.stderr)
            print((tmp / "serve.log").read_text()[-6000:], file=sys.stderr)
            raise
        finally:
            notify.close()
            for d in cgs.values():
                if d:
                    for _ in range(50):
                        try:
                            os.rmdir(d)
                            break
                        except OSError:
                            time.sleep(0.1)
    keep = os.environ.get("BENCH_KEEP_LOG")  # the service's log, for a look at what it did under load
    if keep:
        shutil.copyfile(tmp / "serve.log", keep)
    shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, object] = {"distinct_cgroups": root is not None}
    for probe in ("good", "compat"):
        u = _summary(unloaded[probe]["lat"])  # type: ignore[index]
        lo = _summary(loaded[probe]["lat"])  # type: ignore[index]
        out[probe] = {"unloaded": u, "loaded": lo, "statuses_loaded": loaded[probe]["statuses"],  # type: ignore[index]
                      "p99_ratio": round(lo["p99_ms"] / u["p99_ms"], 2) if u["p99_ms"] else None}
    out["hostile"] = loaded["hostile"]
    mm = _memory_max()
    out["rss_peak_mb"] = round(max(unloaded["rss_peak_kb"], loaded["rss_peak_kb"]) / 1024, 1)  # type: ignore[arg-type]
    out["rss_vs_half_memory_max"] = round(out["rss_peak_mb"] * 1024 * 1024 / (mm / 2), 3)  # type: ignore[operator]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=24.0, help="per condition (two segments each)")
    ap.add_argument("--interval", type=float, default=0.06, help="probe pacing (s between requests)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--connections", type=int, default=64, help="connections the hostile container keeps trying")
    ap.add_argument("--probe", nargs=5, metavar=("SOCK", "TARGET", "SECONDS", "INTERVAL", "CGROUP"))
    ap.add_argument("--hostile", nargs=4, metavar=("SOCK", "SECONDS", "CONNECTIONS", "CGROUP"))
    args = ap.parse_args()
    if args.probe:
        s, t, sec, iv, cg = args.probe
        probe_main(s, t, float(sec), float(iv), cg)
        return 0
    if args.hostile:
        s, sec, n, cg = args.hostile
        hostile_main(s, float(sec), int(n), cg)
        return 0
    ok = True
    for r in range(args.rounds):
        res = one_round(args.seconds, args.interval, args.connections)
        print(json.dumps({"round": r + 1, "load_avg": os.getloadavg(), **res}, indent=1))
        for probe in ("good", "compat"):
            ratio = res[probe]["p99_ratio"]  # type: ignore[index]
            print(f"round {r + 1}: {probe:6s} p99 unloaded {res[probe]['unloaded']['p99_ms']} ms, "  # type: ignore[index]
                  f"loaded {res[probe]['loaded']['p99_ms']} ms -> ratio {ratio}x (target <= 2x)")  # type: ignore[index]
            ok = ok and ratio is not None and ratio <= 2.0
        print(f"round {r + 1}: service RSS peak {res['rss_peak_mb']} MB = {res['rss_vs_half_memory_max']} of "
              f"MemoryMax/2 (target < 1)")
        ok = ok and res["rss_vs_half_memory_max"] < 1  # type: ignore[operator]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
