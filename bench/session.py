"""``make bench-session``: throughput of two Python sessions over UDP on 127.0.0.1.

Two ``secureiod.aio`` sessions in one event loop (one process, one core: the numbers are
for both ends together). For 64-byte and 1300-byte messages it sends for a fixed time
and counts what the receiver got, in two styles:

* sync: ``write()`` (queue and return), yielding to the loop every 64 messages, the way
  a streaming application writes;
* async: ``await write_message()`` for every message, which waits until the datagram
  carrying it was handed to the socket (one round through the loop per message).

Also the sans-IO core alone (no sockets): two ``Session`` objects passing datagrams in
memory, which is the protocol's own cost per message. Printed as a table; a benchmark,
not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from typing import Any

from secureiod.aio import SecureSession, connect, listen
from secureiod.secureio import MessageType
from secureiod.secureio.identity import Identity
from secureiod.secureio.session import Session, SessionOptions

RW = MessageType.READ_WRITE
SIZES = (64, 1300)


async def _pair() -> tuple[SecureSession, SecureSession]:
    alice, bob = Identity.generate(), Identity.generate()
    b = await listen(bob, alice.public_key, "127.0.0.1:0")
    a = await connect(alice, bob.public_key, ("127.0.0.1", b.local_address[1]))
    await a.wait_established(5)
    await b.wait_established(5)
    return a, b


async def _run_style(size: int, style: str, seconds: float) -> dict[str, Any]:
    a, b = await _pair()
    payload = b"x" * size
    received = 0

    def count(_: bytes) -> None:
        nonlocal received
        received += 1

    b.set_handler(RW, count)
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if style == "sync":
            for _ in range(64):
                a.write(payload)
            sent += 64
            await asyncio.sleep(0)
        else:
            await a.write_message(RW, payload)
            sent += 1
    # Let what is in flight arrive (bounded).
    settle = time.perf_counter() + 2.0
    while received < sent and time.perf_counter() < settle:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    await a.close()
    await b.close()
    return {
        "size": size,
        "style": style,
        "sent": sent,
        "received": received,
        "msgs_per_s": received / elapsed,
        "mb_per_s": received * size / elapsed / 1e6,
    }


def _sansio(size: int, seconds: float) -> dict[str, Any]:
    alice, bob = Identity.generate(), Identity.generate()
    opt = SessionOptions(send_delay=0)
    addr_a, addr_b = ("198.18.0.1", 5800), ("198.18.0.2", 5800)
    a = Session(alice, bob.public_key, created_at_ns=time.time_ns(), options=opt, endpoint=addr_b)
    b = Session(
        bob, alice.public_key, created_at_ns=time.time_ns() + 1, options=opt, endpoint=addr_a
    )
    now = 0.0
    a.start(now)
    b.start(now)
    for _ in range(50):  # handshake + negotiation in memory
        for src, dst, src_addr in ((a, b, addr_a), (b, a, addr_b)):
            for d, _ in src.datagrams_to_send(now):
                dst.receive_datagram(d, src_addr, now)
        now += 0.01
        a.handle_timer(now)
        b.handle_timer(now)
        if a.is_established and b.is_established:
            break
    payload = b"x" * size
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(256):
            a.write_message(RW, payload, now)
        for d, _ in a.datagrams_to_send(now):
            b.receive_datagram(d, ("198.18.0.1", 5800), now)
        while b.next_event() is not None:
            n += 1
    elapsed = time.perf_counter() - start
    return {
        "size": size,
        "style": "sans-IO",
        "msgs_per_s": n / elapsed,
        "mb_per_s": n * size / elapsed / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = []
    for size in SIZES:
        rows.append(_sansio(size, args.seconds))
        for style in ("sync", "async"):
            rows.append(asyncio.run(_run_style(size, style, args.seconds)))
    print(f"Python {platform.python_version()}, {platform.machine()}; both ends in one process\n")
    print("| message | style | messages/s | MB/s | delivered |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        delivered = f"{r['received']}/{r['sent']}" if "sent" in r else "-"
        print(
            f"| {r['size']} B | {r['style']} | {r['msgs_per_s']:,.0f} | {r['mb_per_s']:.1f} "
            f"| {delivered} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
