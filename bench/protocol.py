"""What does our own packet code cost per datagram?  (``make bench-protocol``)

``crypto_routes.py`` compares libraries; this script times the code the daemon actually
runs, ``secureiod.secureio.packet.seal`` and ``open_packet``, including its Python glue
(PacketKey lookups, memoryviews, exception-free fast path), so the numbers say how many
packets per second one core can push through the protocol layer:

* ``session``: the data path, one candidate key;
* ``rotation``: two candidates and the first is wrong, as while a new key is being rolled in
  and the peer still uses the other one; it shows what the header-first rejection saves;
* ``aux`` / ``clear``: key-exchange packets under the PSK-derived key or no key.

Each payload is one channel-0 message of 64, 1400 or 8000 bytes (message area = payload + 9).
Also timed: splitting an aggregated packet of 20 x 64-byte messages with ``iter_messages``
and ``ReplayWindow.accept`` (in order, reordered, and a rejected replay), the other per-packet
work of the receive path.  Numbers are medians of per-call times on this machine; they are
for comparison, never thresholds for a test.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Final

from benchlib import cpu_model, measure

from secureiod.secureio.packet import PacketClass, PacketKey, open_packet, seal
from secureiod.secureio.replay import ReplayWindow
from secureiod.secureio.wire import MessageType, encode_message, iter_messages

SIZES: Final = (64, 1400, 8000)
"""A small control packet, a full UDP-MTU data packet, a large aggregated/jumbo packet."""
AGGREGATED_COUNT: Final = 20
AGGREGATED_SIZE: Final = 64
OPEN_PID: Final = 1_000_003
"""Any realistic PacketID: ``open_packet`` is stateless, so one datagram is reopened."""
WARM_UP_S: Final = 0.5

CIPHER_KEY: Final = bytes(range(32))
OTHER_KEY: Final = bytes(range(32, 64))
SESSION_ID: Final = bytes(range(100, 116))
AUX_KEY: Final = bytes(range(64, 96))


@dataclass(frozen=True, slots=True)
class Case:
    """How a datagram is sealed and which candidate keys the receiver tries, in order."""

    name: str
    sealer: PacketKey
    candidates: tuple[PacketKey, ...]
    expect_class: PacketClass
    expect_index: int


def cases() -> list[Case]:
    session = PacketKey.session(CIPHER_KEY, SESSION_ID)
    wrong = PacketKey.session(OTHER_KEY, SESSION_ID)
    aux = PacketKey.aux(AUX_KEY)
    clear = PacketKey.clear()
    return [
        Case("session", session, (session,), PacketClass.SESSION, 0),
        Case("rotation (1st of 2 keys wrong)", session, (wrong, session), PacketClass.SESSION, 1),
        Case("aux", aux, (aux,), PacketClass.AUX, 0),
        Case("clear", clear, (clear,), PacketClass.CLEAR, 0),
    ]


def message_area(size: int) -> bytes:
    """One channel-0 message carrying ``size`` deterministic, non-constant bytes."""
    body = bytes((i * 167 + 13) & 0xFF for i in range(size))
    return encode_message(MessageType.channel(0), body)


def verify(case: Case, messages: bytes) -> bytes:
    """Seal once and check the receiver gets it back the expected way before timing.

    A benchmark that silently measured a failing path (an exception per packet, or the
    wrong candidate) would report nonsense; explicit raises survive ``python -O``.
    """
    datagram = seal(case.sealer, OPEN_PID, messages)
    opened = open_packet(datagram, case.candidates)
    if (opened.messages, opened.packet_class, opened.key_index) != (
        messages,
        case.expect_class,
        case.expect_index,
    ):
        raise AssertionError(f"{case.name}: open_packet did not return what was sealed")
    return datagram


# --- timing (same method as crypto_routes.measure, kept local so each script stands alone) --


def packet_ops(case: Case, messages: bytes) -> dict[str, Callable[[], object]]:
    """seal, open and seal+open closures; sealing uses a fresh PacketID every call."""
    datagram = verify(case, messages)
    sealer, candidates = case.sealer, case.candidates
    seal_ids, both_ids = count(1), count(1)

    def do_seal() -> object:
        return seal(sealer, next(seal_ids), messages)

    def do_open() -> object:
        return open_packet(datagram, candidates)

    def do_both() -> object:
        return open_packet(seal(sealer, next(both_ids), messages), candidates)

    return {"seal": do_seal, "open": do_open, "seal+open": do_both}


def reordered_ids() -> Iterator[int]:
    """3, 2, 5, 4, ...: every ID new but every other one arrives after its successor."""
    return (i ^ 1 for i in count(2))


def extra_ops() -> list[tuple[str, int, Callable[[], object]]]:
    """(label, items per call, op) for the receive path's non-crypto per-packet work."""
    aggregated = b"".join(
        encode_message(MessageType.channel(0), bytes([i]) * AGGREGATED_SIZE)
        for i in range(AGGREGATED_COUNT)
    )
    if len(list(iter_messages(aggregated))) != AGGREGATED_COUNT:
        raise AssertionError("iter_messages did not split the aggregated packet")

    in_order, in_order_ids = ReplayWindow(), count(1)
    shuffled, shuffled_ids = ReplayWindow(), reordered_ids()
    replayed = ReplayWindow()
    for pid in range(1, 1001):
        replayed.accept(pid)
    if replayed.accept(990):
        raise AssertionError("ReplayWindow accepted a replay")

    return [
        (
            f"iter_messages, {AGGREGATED_COUNT} x {AGGREGATED_SIZE} B aggregated packet",
            AGGREGATED_COUNT,
            lambda: list(iter_messages(aggregated)),
        ),
        ("ReplayWindow.accept, in order", 1, lambda: in_order.accept(next(in_order_ids))),
        ("ReplayWindow.accept, pairs swapped", 1, lambda: shuffled.accept(next(shuffled_ids))),
        ("ReplayWindow.accept, replay rejected", 1, lambda: replayed.accept(990)),
    ]


# --- reporting -------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for dist in ("cryptography", "blake3"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def packet_table(results: dict[str, dict[int, dict[str, float]]], repeats: int) -> str:
    lines = [
        f"µs per call (median of {repeats} batches); pkt/s = 1e6 / (seal+open µs); "
        "open (x) = open time relative to the session case",
        "",
        "| case | payload | seal µs | open µs | seal+open µs | pkt/s (seal+open) | open (x) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["session"]
    for name, by_size in results.items():
        for size, r in by_size.items():
            lines.append(
                f"| {name} | {size} B | {r['seal']:.2f} | {r['open']:.2f} | "
                f"{r['seal+open']:.2f} | {1e6 / r['seal+open']:,.0f} | "
                f"{r['open'] / base[size]['open']:.2f}x |"
            )
    return "\n".join(lines)


def extras_table(extras: dict[str, tuple[float, int]]) -> str:
    lines = ["| operation | µs per call | µs per item |", "|---|---:|---:|"]
    lines += [f"| {name} | {us:.2f} | {us / items:.3f} |" for name, (us, items) in extras.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--repeats", type=int, default=9, help="batches per median (9)")
    parser.add_argument(
        "--batch-ms", type=float, default=20.0, help="minimum duration of one batch (20 ms)"
    )
    args = parser.parse_args(argv)
    target_ns = int(args.batch_ms * 1e6)
    started = time.perf_counter()

    print("# secureio protocol layer")
    print()
    print(
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}"
    )
    print(f"- CPU: {cpu_model()}")
    versions = library_versions()
    for lib, version in versions.items():
        print(f"- {lib}: {version}")
    print()

    ops = {
        (case.name, size): packet_ops(case, message_area(size))
        for case in cases()
        for size in SIZES
    }
    extras_ops = extra_ops()

    # Warm caches and the CPU clock before the first timing, which otherwise reads high.
    warm_until = time.perf_counter() + WARM_UP_S
    while time.perf_counter() < warm_until:
        for by_kind in ops.values():
            by_kind["seal+open"]()

    results: dict[str, dict[int, dict[str, float]]] = {}
    for (name, size), by_kind in ops.items():
        results.setdefault(name, {})[size] = {
            kind: measure(op, args.repeats, target_ns) for kind, op in by_kind.items()
        }
    extras = {
        label: (measure(op, args.repeats, target_ns), items) for label, items, op in extras_ops
    }

    print(packet_table(results, args.repeats))
    print()
    print(extras_table(extras))
    print()
    print(f"({time.perf_counter() - started:.1f} s)")

    if args.json:
        report: dict[str, Any] = {
            "unit": "microseconds per call, median",
            "python": platform.python_version(),
            "cpu": cpu_model(),
            "versions": versions,
            "repeats": args.repeats,
            "batch_ms": args.batch_ms,
            "payload": "one channel-0 message; message area = payload + 9 bytes",
            "packets_us": {
                name: {str(size): r for size, r in by_size.items()}
                for name, by_size in results.items()
            },
            "extras_us": {
                label: {"per_call": us, "items": items} for label, (us, items) in extras.items()
            },
        }
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
