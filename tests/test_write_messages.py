"""``Session.write_messages``: a TUN read's packets handed to a session in one call (issue
13, UDP 64 B). It is a shortcut, not a second set of rules: on twin sessions built from the
same seeds it must give exactly what ``write_message`` one payload at a time gives (bytes,
PacketIDs, counters, batch, timer, refusals), whatever the sizes, offsets and states."""

from __future__ import annotations

import random

import pytest
from identities import ID_A, ID_B
from test_lone_path import ADDR_B, RW, _session, _state
from test_write_run import _each, _same, _twins

from secureiod.secureio import MessageType


def _sizes(rng: random.Random, n: int, payload_size: int) -> list[int]:
    """Mostly small packets, some near the datagram's room, a few that need fragments."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.7:
            out.append(rng.randrange(1, 120))
        elif r < 0.9:
            out.append(rng.randrange(payload_size - 40, payload_size + 1))
        else:
            out.append(rng.randrange(payload_size + 1, 3 * payload_size))
    return out


@pytest.mark.parametrize("fragments", [True, False], ids=["fragments", "no-fragments"])
@pytest.mark.parametrize("offset", [0, 10])
@pytest.mark.parametrize("seed", range(6))
def test_the_same_datagrams_as_one_write_at_a_time(seed: int, offset: int, fragments: bool) -> None:
    rng = random.Random(seed)
    a1, a2, now = _twins(enable_fragmentation=fragments)
    for round_ in range(6):  # batches that leave a partial batch behind for the next
        sizes = _sizes(rng, rng.randrange(0, 60), a1.payload_size)
        payloads = [rng.randbytes(offset) + bytes([round_]) * n for n in sizes]
        want = _each(a1, payloads, now, offset)
        got = [(i, type(exc)) for i, exc in a2.write_messages(RW, payloads, now, offset)]
        assert got == want
        assert _state(a2) == _state(a1)
        now += 0.00001 * rng.randrange(0, 10)  # sometimes past the batch's deadline
        for s in (a1, a2):
            s.handle_timer(now)
        assert a2.datagrams_to_send(now) == a1.datagrams_to_send(now)
        assert _state(a2) == _state(a1)


def test_refusals_come_back_in_place_and_stop_nothing() -> None:
    """Without fragmentation a payload above the packet size is refused, as
    ``write_message`` refuses it; the ones after it still go out."""
    a1, a2, now = _twins(enable_fragmentation=False)
    big = a1.payload_size + 1
    payloads = [bytes([i]) * n for i, n in enumerate([40, big, 64, big + 500, 1, 90])]
    refused = a2.write_messages(RW, payloads, now)
    assert [i for i, _ in refused] == [1, 3]
    a2b, a1b, _ = _twins(enable_fragmentation=False)
    _same(a1b, a2b, payloads, now, 0)


def test_internal_types_are_refused_as_write_message_refuses_them() -> None:
    a1, a2, now = _twins()
    refused = a2.write_messages(MessageType.KEY_EXCHANGE, [b"x", b"y"], now)
    assert [(i, type(e)) for i, e in refused] == [(0, ValueError), (1, ValueError)]
    assert _state(a2) == _state(a1)


def test_before_establishment_the_messages_queue_as_one_at_a_time() -> None:
    s1 = _session(ID_A, ID_B, 1, ADDR_B)
    s2 = _session(ID_A, ID_B, 1, ADDR_B)
    now = 1000.0
    for s in (s1, s2):
        s.start(now)
    payloads = [bytes([i]) * (i * 7 + 1) for i in range(20)]
    _same(s1, s2, payloads, now, 0)
    assert s2._queued and s2._queued == s1._queued
