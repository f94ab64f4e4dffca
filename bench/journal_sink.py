"""A stand-in for journald's native socket, for benchmarks: counts the entries a service sends.

    python bench/journal_sink.py SOCKET_PATH OUT_JSON

Binds a datagram socket at SOCKET_PATH (the service sees it as /run/systemd/journal/socket through a
private mount namespace, as tests/serve/test_journald.py does), decodes every entry of the journal native
protocol (``KEY=value`` lines, or ``KEY\\n<le64 size><bytes>\\n``; large entries arrive as a memfd), and
on SIGTERM writes ``{"entries": N, "by_event": {EVENT: N}, "samples": {EVENT: [MESSAGE, ...]}}`` to OUT_JSON.
Like journald it is a separate process, so reading the entries costs the service nothing but the send.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys
from collections import Counter

#: The private mount namespace that puts a sink's socket directory at /run/systemd/journal for the command
#: after it only (``[*NS_PREFIX, SINK_DIR, argv...]``; needs root and ``unshare``).
NS_PREFIX = ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal && '
             'mount --bind "$0" /run/systemd/journal && exec "$@"']


def decode_native(data: bytes) -> dict[str, str]:
    """One journal native-protocol datagram: KEY=value lines, or KEY\\n<le64 size><bytes>\\n (strict:
    a binary field must end in its newline, and every value must be UTF-8)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            size = int.from_bytes(data[nl + 1: nl + 9], "little")
            v = data[nl + 9: nl + 9 + size]
            if data[nl + 9 + size: nl + 10 + size] != b"\n":
                raise ValueError(f"journal field {k!r}: binary value not followed by a newline")
            i = nl + 10 + size
        out[k.decode()] = v.decode()
    return out


def receive(sock: socket.socket) -> dict[str, str] | None:
    """The next entry on a bound journal socket (a large one arrives as a sealed memfd); None on timeout."""
    try:
        data, anc, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
    except (TimeoutError, InterruptedError):
        return None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
            for fd in fds:
                with os.fdopen(fd, "rb") as f:
                    data = f.read()
    return decode_native(data)


def main() -> int:
    path, out_path = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    by_event: Counter[str] = Counter()
    samples: dict[str, list[str]] = {}
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sock.settimeout(0.2)
    print("ready", flush=True)
    while not stopping:
        entry = receive(sock)
        if entry is None:
            continue
        event = entry.get("EVENT", "?")
        by_event[event] += 1
        kept = samples.setdefault(event, [])
        if len(kept) < 5:
            kept.append(entry.get("MESSAGE", ""))
    with open(out_path, "w") as f:
        json.dump({"entries": sum(by_event.values()), "by_event": dict(by_event), "samples": samples}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
