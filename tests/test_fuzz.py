"""Hostile datagrams only ever raise the library's own exceptions.

100 000 random and mutated datagrams go through every parser a network input reaches:
the packet opener (with session, aux and clear keys), message splitting, and the
key-exchange, negotiation and fragment decoders. Anything but ``SecureioError`` — an
IndexError, struct.error, ValueError, OverflowError — fails the test. Then the same kind
of input through the demultiplexer and live sessions, where it must also move nothing.
"""

from __future__ import annotations

import contextlib
import random

from captures import load_capture

from secureiod.secureio import (
    FragmentHeader,
    KeyExchangeMessage,
    PacketKey,
    SecureioError,
    decode_negotiation,
    iter_messages,
    open_packet,
)

ROUNDS = 100_000


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 40))
        elif op == 3 and len(data) > 9:
            pos = rng.randrange(len(data) - 4)
            data[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"])
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 120)))
    return bytes(data)


def _parse_all(payload: bytes) -> None:
    for parser in (KeyExchangeMessage.decode, decode_negotiation, FragmentHeader.decode):
        with contextlib.suppress(SecureioError):
            parser(payload)
    with contextlib.suppress(SecureioError):
        for _ in iter_messages(payload):
            pass


def test_fuzz_open_and_parse() -> None:
    rng = random.Random(0x5EC10)
    caps = [load_capture(n) for n in ("cap_nopsk.json", "cap_psk.json", "cap_negotiation.json")]
    seeds = [p for c in caps for p in c.packets]
    clear = PacketKey.clear()
    opened_count = 0
    for i in range(ROUNDS):
        base = rng.choice(seeds)
        data = _mutate(rng, base.data) if i % 4 else rng.randbytes(rng.randint(0, 300))
        keys = [base.session_key, base.fallback, clear]
        try:
            opened = open_packet(data, keys, base.packet_id_mask)
        except SecureioError:
            pass
        else:
            opened_count += 1
            _parse_all(opened.messages)
        if i % 10 == 0:
            _parse_all(data)
    # Mutations must essentially never produce an authentic packet; unchanged ones can.
    assert opened_count < ROUNDS // 100


def test_forged_clear_packets_with_wild_lengths() -> None:
    """Clear packets are authentic to anyone: their contents must still parse safely."""
    from secureiod.secureio import seal

    rng = random.Random(7)
    clear = PacketKey.clear()
    for _ in range(5000):
        body = rng.randbytes(rng.randint(0, 200))
        data = seal(clear, rng.randint(1, 2**64 - 1), body)
        opened = open_packet(data, [clear])
        assert opened.messages == body
        _parse_all(opened.messages)


def test_fuzz_through_the_demultiplexer_moves_nothing() -> None:
    """Mutated and replayed copies of a live peer's datagrams, from random addresses, into a
    demultiplexer of established sessions: nothing raises, no endpoint moves, the address
    map stays as it was, and the real traffic still gets through afterwards."""
    from wire_double import ADDR_A, Link

    from secureiod.secureio import MessageType
    from secureiod.secureio.demux import Demultiplexer
    from secureiod.secureio.events import PathChanged
    from secureiod.secureio.identity import Identity
    from secureiod.secureio.session import Session, SessionOptions

    id_a, id_b = Identity.from_seed(b"\x0a" * 32), Identity.from_seed(b"\x0b" * 32)
    opt = SessionOptions(send_delay=0)
    a = Session(id_a, id_b.public_key, created_at_ns=1, options=opt)
    b = Session(id_b, id_a.public_key, created_at_ns=2, options=opt)
    link = Link(a, b)
    link.start()
    link.run_until(lambda: a.is_established and b.is_established)
    for i in range(30):
        a.write_message(MessageType.READ_WRITE, b"m%d" % i, link.now)
        link.pump()
        link.run(0.01)
    # A small cheap-check budget, so the flood also runs into it (rate_limited below).
    demux: Demultiplexer[str] = Demultiplexer(key_checks_per_second=5_000.0)
    demux.add("a", b)
    for n in range(3):  # idle peers that trial decryption also asks
        other = Identity.from_seed(bytes([0x20 + n]) * 32)
        demux.add(f"idle{n}", Session(id_b, other.public_key, created_at_ns=3 + n, options=opt))
    rng = random.Random(0xDE)
    seeds = link.a.sent
    now = link.now
    for i in range(20_000):
        base = rng.choice(seeds)
        data = base if i % 5 == 0 else _mutate(rng, base)
        src = (f"203.0.113.{rng.randrange(256)}", rng.randrange(1, 65536))
        demux.receive_datagram(data, src if i % 3 else ADDR_A, now + i * 1e-4)
    link.now = now + 2.0  # the two seconds of virtual time the flood took
    assert b.endpoint == ADDR_A and demux.owner_at(ADDR_A) == "a"
    assert all(demux.session(f"idle{n}").endpoint is None for n in range(3))
    assert b.is_established
    pending = []
    while (event := b.next_event()) is not None:
        pending.append(event)
    assert not any(isinstance(e, PathChanged) for e in pending)
    assert demux.stats.unknown_source > 0 and demux.stats.rate_limited > 0
    a.write_message(MessageType.READ_WRITE, b"after", link.now)
    link.pump()
    link.run(0.1)
    assert link.b.messages(MessageType.READ_WRITE)[-1:] == [b"after"]
