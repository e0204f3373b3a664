"""Inner-packet header checks (issue 10 item 9): consistent packets pass, each lie is named,
and the fast check agrees with a slow, obviously-correct reference on random input."""

from __future__ import annotations

import random
import struct

import pytest

from secureiod.daemon.inner import (
    INNER_BAD_HEADER_LENGTH,
    INNER_BAD_LENGTH,
    INNER_BAD_VERSION,
    INNER_DROP_REASONS,
    INNER_TRUNCATED,
    inner_packet_problem,
)

VNET = b"\x01" * 10  # stands in for a virtio-net header: its content must not matter


def ipv4(payload: bytes = b"x" * 8, options: bytes = b"", total: int | None = None) -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    length = 20 + len(options) + len(payload) if total is None else total
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, 0, 64, 17, 0, bytes(4), bytes(4)
    )
    return header + options + payload


def ipv6(payload: bytes = b"y" * 8, payload_length: int | None = None) -> bytes:
    plen = len(payload) if payload_length is None else payload_length
    return struct.pack("!IHBB16s16s", 6 << 28, plen, 17, 64, bytes(16), bytes(16)) + payload


def reference(packet: bytes, offset: int = 0) -> str | None:
    """The rules written out plainly, with struct and slices: slow but easy to check."""
    ip = packet[offset:] if offset <= len(packet) else b""
    if len(ip) == 0:
        return INNER_TRUNCATED
    version = ip[0] // 16
    if version == 4:
        if len(ip) < 20:
            return INNER_TRUNCATED
        ihl_words = ip[0] % 16
        (total,) = struct.unpack("!H", ip[2:4])
        if ihl_words < 5 or ihl_words * 4 > total:
            return INNER_BAD_HEADER_LENGTH
        if total != len(ip):
            return INNER_BAD_LENGTH
        return None
    if version == 6:
        if len(ip) < 40:
            return INNER_TRUNCATED
        (payload_length,) = struct.unpack("!H", ip[4:6])
        if payload_length + 40 != len(ip):
            return INNER_BAD_LENGTH
        return None
    return INNER_BAD_VERSION


@pytest.mark.parametrize(
    "packet",
    [
        ipv4(),
        ipv4(b""),
        ipv4(options=b"\x01" * 40),  # IHL 15, the largest header
        ipv4(b"z" * 1400, options=b"\x94\x04\x00\x00"),  # router alert
        ipv4(b"z" * (65535 - 20)),
        ipv6(),
        ipv6(b""),  # a bare header (next header "no next header" in real life)
        ipv6(b"z" * 65535),
    ],
)
@pytest.mark.parametrize("offset", [0, 10])
def test_consistent_packets_pass(packet: bytes, offset: int) -> None:
    data = VNET + packet if offset else packet
    assert inner_packet_problem(data, offset) is None
    assert inner_packet_problem(memoryview(data), offset) is None
    assert inner_packet_problem(bytearray(data), offset) is None


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", INNER_TRUNCATED),
        (b"\x45", INNER_TRUNCATED),
        (ipv4()[:19], INNER_TRUNCATED),
        (ipv6()[:39], INNER_TRUNCATED),
        (b"\x00" * 40, INNER_BAD_VERSION),
        (b"\x55" + ipv4()[1:], INNER_BAD_VERSION),
        (b"\xf0" + ipv6()[1:], INNER_BAD_VERSION),
        (b"\x44" + ipv4()[1:], INNER_BAD_HEADER_LENGTH),  # IHL 4 < 5
        (b"\x40" + ipv4()[1:], INNER_BAD_HEADER_LENGTH),  # IHL 0
        (ipv4(b"", options=b"\x01" * 8, total=24), INNER_BAD_HEADER_LENGTH),  # 28 > 24
        (ipv4(b"a" * 100)[:60], INNER_BAD_LENGTH),  # total says 128, 60 arrived
        (ipv4(b"a" * 100, total=60), INNER_BAD_LENGTH),  # total says 60, 120 arrived
        (ipv4(total=0), INNER_BAD_HEADER_LENGTH),
        (ipv4(b"a" * 10) + b"\x00", INNER_BAD_LENGTH),  # trailing byte
        (ipv6(b"a" * 100)[:90], INNER_BAD_LENGTH),
        (ipv6(b"a" * 10, payload_length=100), INNER_BAD_LENGTH),
        (ipv6(b"a" * 100, payload_length=0), INNER_BAD_LENGTH),  # jumbogram form
        (ipv6(b"a" * 100, payload_length=99), INNER_BAD_LENGTH),
    ],
)
@pytest.mark.parametrize("offset", [0, 10])
def test_each_lie_is_named(packet: bytes, reason: str, offset: int) -> None:
    data = VNET + packet if offset else packet
    assert reason in INNER_DROP_REASONS
    assert reference(data, offset) == reason  # the reference agrees with the table
    assert inner_packet_problem(data, offset) == reason
    assert inner_packet_problem(memoryview(data), offset) == reason


def test_offset_beyond_the_data_is_truncated() -> None:
    assert inner_packet_problem(b"\x45" * 5, 10) == INNER_TRUNCATED
    assert inner_packet_problem(VNET, 10) == INNER_TRUNCATED


def test_memoryview_slice_of_a_larger_buffer() -> None:
    buf = bytearray(b"\xee" * 7 + VNET + ipv4(b"q" * 30) + b"\xee" * 5)
    view = memoryview(buf)[7 : len(buf) - 5]
    assert inner_packet_problem(view, 10) is None


def _random_packet(rng: random.Random) -> tuple[bytes, int]:
    """Mostly near-valid packets (random lengths, IHLs and truncations), so every branch is
    hit often; some plain random bytes."""
    offset = rng.choice((0, 10))
    kind = rng.random()
    if kind < 0.4:
        payload = rng.randbytes(rng.randrange(0, 200))
        ihl = rng.randrange(16)
        options = rng.randbytes(max(0, ihl - 5) * 4)
        total = 20 + len(options) + len(payload)
        total = rng.choice((total, total, rng.randrange(65536), total + rng.randrange(-3, 4)))
        total &= 0xFFFF
        pkt = bytearray(ipv4(payload, options, total))
        pkt[0] = 0x40 | ihl
        data = bytes(pkt)
    elif kind < 0.8:
        payload = rng.randbytes(rng.randrange(0, 200))
        plen = rng.choice((len(payload), len(payload), 0, rng.randrange(65536)))
        data = ipv6(payload, plen)
    else:
        data = rng.randbytes(rng.randrange(0, 80))
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    prefix = rng.randbytes(offset) if rng.random() < 0.95 else rng.randbytes(rng.randrange(11))
    return prefix + data, offset


def test_agrees_with_reference_on_random_input() -> None:
    rng = random.Random(0x5EC10)
    seen: set[str | None] = set()
    for _ in range(40_000):
        data, offset = _random_packet(rng)
        expected = reference(data, offset)
        assert inner_packet_problem(data, offset) == expected, (data.hex(), offset)
        assert inner_packet_problem(memoryview(data), offset) == expected
        seen.add(expected)
    # The generator really exercises every outcome, so the comparison means something.
    assert seen == {None, *INNER_DROP_REASONS}
