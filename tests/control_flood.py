"""Load generators for the control-plane load tests, run as separate processes (so that
their threads do not compete with the event loop under test for the GIL).

``python tests/control_flood.py flood SOCKET CONNECTIONS SECONDS COMMAND``
    every connection pipelines 32 requests, reads the 32 replies, and again, until the
    time is up; prints ``{"answered": N}``.
``python tests/control_flood.py ping HOST PORT SECONDS INTERVAL``
    a UDP datagram every INTERVAL seconds to an echo, answers collected by a second
    thread; prints ``{"sent": N, "lost": N, "rtt_avg": s, "rtt_max": s}`` (a datagram
    not back within 2 s of the end counts as lost).
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time

PIPELINE = 32


def flood(path: str, connections: int, seconds: float, command: str) -> None:
    line = json.dumps({"command": command}).encode() + b"\n"
    counts = [0] * connections
    deadline = time.monotonic() + seconds

    def worker(k: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.settimeout(max(1.0, seconds + 5))
            f = s.makefile("rb")
            try:
                while time.monotonic() < deadline:
                    s.sendall(line * PIPELINE)
                    for _ in range(PIPELINE):
                        if not f.readline():
                            return
                        counts[k] += 1
                        if time.monotonic() >= deadline:
                            return
            except OSError:
                return

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"answered": sum(counts)}))


def ping(host: str, port: int, seconds: float, interval: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sent: dict[int, float] = {}
    rtts: dict[int, float] = {}
    done = threading.Event()

    def receive() -> None:
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                data = sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            (seq,) = struct.unpack("!I", data[:4])
            if seq in sent and seq not in rtts:
                rtts[seq] = time.monotonic() - sent[seq]

    receiver = threading.Thread(target=receive)
    receiver.start()
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < seconds:
        sent[seq] = time.monotonic()
        sock.send(struct.pack("!I", seq))
        seq += 1
        time.sleep(max(0.0, start + seq * interval - time.monotonic()))
    grace = time.monotonic() + 2.0
    while len(rtts) < len(sent) and time.monotonic() < grace:
        time.sleep(0.01)
    done.set()
    receiver.join()
    values = list(rtts.values())
    print(
        json.dumps(
            {
                "sent": len(sent),
                "lost": len(sent) - len(values),
                "rtt_avg": sum(values) / len(values) if values else None,
                "rtt_max": max(values) if values else None,
            }
        )
    )


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "flood":
        flood(rest[0], int(rest[1]), float(rest[2]), rest[3])
    elif mode == "ping":
        ping(rest[0], int(rest[1]), float(rest[2]), float(rest[3]))
    else:
        sys.exit(f"unknown mode {mode!r}")
