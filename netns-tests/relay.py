#!/usr/bin/env python3
"""A reordering UDP relay between two daemons, for ``test_stress.py``.

Runs in the middle namespace of a chain A <-> relay <-> B. It owns one UDP socket per side:
``--left LISTEN=PEER`` receives what A sends to LISTEN and sends B's datagrams back to A at
PEER, from LISTEN; ``--right`` the same toward B. So each daemon has the relay's address on
its own link as the other peer's endpoint and sees every datagram of the peer come from
exactly that address: the addresses stay consistent, nothing roams.

Every datagram is forwarded once, unchanged. A fraction ``--reorder`` of them (chosen at
random) is held back for a uniformly random ``--delay-min``..``--delay-max`` seconds while
later datagrams pass, so it arrives out of order. Loss is not this program's business (the
test drops with nftables).

Bounded: the relay exits by itself after ``--timeout`` s, and on SIGTERM/SIGINT or when
stdin closes. It prints ``ready`` once its sockets are bound, and its counters as one JSON
line on exit: per direction ``received``, ``forwarded``, ``held`` (delayed on purpose),
``reordered`` (sent after a datagram that arrived later than it, i.e. really overtaken),
``max_displacement`` (the most datagrams that overtook one held datagram),
``beyond_window`` (held datagrams overtaken by ``--window`` or more later ones: a receiver
with a replay window of that size must refuse them as too old) and ``send_errors`` (sends
refused, e.g. EPERM from an nftables drop rule in this namespace's output).
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import os
import random
import selectors
import signal
import socket
import sys
import time
from typing import Any

BATCH = 64
BUFSIZE = 1 << 16
SOCKBUF = 8 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    ipaddress.ip_address(host)  # an address, never a name: nothing is resolved
    return host, int(port)


def _pair(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    listen, sep, peer = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LISTEN=PEER")
    return _addr(listen), _addr(peer)


class Direction:
    """Datagrams received on ``rx`` and sent to ``dst`` through ``tx``."""

    def __init__(
        self, name: str, rx: socket.socket, tx: socket.socket, dst: tuple[str, int], window: int
    ) -> None:
        self.name, self.rx, self.tx, self.dst, self.window = name, rx, tx, dst, window
        self.seq = 0  # arrival number of the next datagram
        self.highest_sent = -1  # highest arrival number forwarded so far
        self.stats = {
            "received": 0,
            "forwarded": 0,
            "held": 0,
            "reordered": 0,
            "max_displacement": 0,
            "beyond_window": 0,
            "send_errors": 0,
        }

    def send(self, seq: int, data: bytes) -> None:
        # displacement counts every later datagram sent (or attempted: one an nftables
        # rule drops on its way out still took its PacketID) before this one
        if seq < self.highest_sent:
            displacement = self.highest_sent - seq
            self.stats["reordered"] += 1
            self.stats["max_displacement"] = max(self.stats["max_displacement"], displacement)
            if displacement >= self.window:
                self.stats["beyond_window"] += 1
        else:
            self.highest_sent = seq
        try:
            self.tx.sendto(data, self.dst)
        except OSError:  # EPERM: dropped by an nftables rule in this namespace's output
            self.stats["send_errors"] += 1
            return
        self.stats["forwarded"] += 1


def _socket(listen: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # *BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKBUF)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
    if family == socket.AF_INET:
        # forward the daemons' datagrams as they are: no fragmentation here either
        sock.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO
    sock.bind(listen)
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--left", type=_pair, required=True, metavar="LISTEN=PEER")
    parser.add_argument("--right", type=_pair, required=True, metavar="LISTEN=PEER")
    parser.add_argument("--reorder", type=float, default=0.10)
    parser.add_argument("--delay-min", type=float, default=0.001)
    parser.add_argument("--delay-max", type=float, default=0.005)
    parser.add_argument("--window", type=int, default=256, help="replay window to compare with")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    left = _socket(args.left[0])
    right = _socket(args.right[0])
    to_right = Direction("left->right", left, right, args.right[1], args.window)
    to_left = Direction("right->left", right, left, args.left[1], args.window)
    by_sock = {left.fileno(): to_right, right.fileno(): to_left}

    stop = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sel = selectors.DefaultSelector()
    for sock in (left, right):
        sel.register(sock, selectors.EVENT_READ)
    try:
        os.set_blocking(0, False)
        sel.register(0, selectors.EVENT_READ)
    except (OSError, ValueError):
        pass  # /dev/null or closed: rely on the timeout and signals

    held: list[tuple[float, int, int, Direction, bytes]] = []  # (due, tiebreak, seq, dir, data)
    tiebreak = 0
    deadline = time.monotonic() + args.timeout
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        if now >= deadline:
            break
        while held and held[0][0] <= now:
            _, _, seq, d, data = heapq.heappop(held)
            d.send(seq, data)
        wait = deadline - now
        if held:
            wait = min(wait, max(0.0, held[0][0] - now))
        for key, _ in sel.select(wait):
            if key.fd == 0:
                try:
                    chunk = os.read(0, 4096)
                except BlockingIOError:
                    continue
                if not chunk:  # stdin closed: the test is done with us
                    stop = True
                continue
            d = by_sock[key.fd]
            for _ in range(BATCH):
                try:
                    data, _src = d.rx.recvfrom(BUFSIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                seq = d.seq
                d.seq += 1
                d.stats["received"] += 1
                if rng.random() < args.reorder:
                    d.stats["held"] += 1
                    due = time.monotonic() + rng.uniform(args.delay_min, args.delay_max)
                    tiebreak += 1
                    heapq.heappush(held, (due, tiebreak, seq, d, data))
                else:
                    d.send(seq, data)
    # whatever is still held goes out, then the counters
    while held:
        _, _, seq, d, data = heapq.heappop(held)
        d.send(seq, data)
    print(json.dumps({to_right.name: to_right.stats, to_left.name: to_left.stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
