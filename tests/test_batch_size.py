"""How many packets one read takes (``BatchSize``), per descriptor (issue 13).

A lone packet must cost one read: a read asked for more than one packet that finds only
one pays a second system call that returns EAGAIN, a good part of a cold ping's
latency. A queue must still be read in whole batches however far apart other work on
the loop spaces the wake-ups.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeTun, FakeUdp, Tunnel, two_sites

from secureiod.daemon.send import BATCH, BatchSize
from secureiod.secureio.negotiation import END_RESEND_DELAYS


class Wakes:
    """The loop's count of returns from ``epoll_wait``, stepped by the test."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


def test_lone_packets_with_the_loop_asleep_in_between_are_read_one_at_a_time() -> None:
    """Pings 20 ms apart, with other wake-ups (the reply, a timer) in between: never a
    batch read, not even every other time (a single-packet read that got its packet
    once made the next read, 20 ms later, a whole batch)."""
    wakes = Wakes()
    tun, udp = BatchSize(wakes), BatchSize(wakes)
    for i in range(20):
        t = 10.0 + 0.02 * i
        wakes.count += 1
        assert tun.on_wake(t) == 1
        tun.note(1)
        wakes.count += 1  # the reply, 0.3 ms later, on the other descriptor
        assert udp.on_wake(t + 0.0003) == 1
        udp.note(1)


def test_a_one_way_stream_of_lone_packets_on_consecutive_wake_ups_reads_mostly_one() -> None:
    """Without anything else on the loop the descriptor's wake-ups are consecutive even
    though the loop slept: at worst every other read is a batch (never worse than one
    shared size was)."""
    wakes = Wakes()
    tun = BatchSize(wakes)
    sizes = []
    for i in range(20):
        wakes.count += 1
        sizes.append(tun.on_wake(10.0 + 0.02 * i))
        tun.note(1)
    assert sizes.count(1) >= 10


def test_a_descriptor_ready_again_on_the_next_wake_up_is_read_in_batches() -> None:
    """Control work spaces the wake-ups 5 ms apart (> BUSY_GAP) while a queue builds:
    level-triggered epoll reports the descriptor again on the very next wake-up, which
    makes the next read a whole batch."""
    wakes = Wakes()
    tun = BatchSize(wakes)
    t = 10.0
    wakes.count += 1
    assert tun.on_wake(t) == 1
    tun.note(1)
    for _ in range(5):
        t += 0.005
        wakes.count += 1
        assert tun.on_wake(t) == BATCH
        tun.note(BATCH)
    t += 0.005
    wakes.count += 1
    assert tun.on_wake(t) == BATCH
    tun.note(1)  # drained
    t += 0.02
    wakes.count += 3
    assert tun.on_wake(t) == 1


def test_descriptors_do_not_share_a_size() -> None:
    """The reply on UDP 0.3 ms after the request on TUN is not "back to back"."""
    wakes = Wakes()
    tun, udp = BatchSize(wakes), BatchSize(wakes)
    wakes.count += 5
    assert tun.on_wake(10.0) == 1
    tun.note(1)
    wakes.count += 1
    assert udp.on_wake(10.0003) == 1
    udp.note(1)
    wakes.count += 1
    assert tun.on_wake(10.0004) == BATCH  # its own wake-ups back to back: load


def _record_reads(
    monkeypatch: pytest.MonkeyPatch, cls: type, name: str, log: list[tuple[int, int]]
) -> None:
    """Wrap ``cls.name(self, max, ...)``: log (asked, got) of every read. On the class,
    before the devices start: the receive path keeps the bound method it was given."""
    real: Callable[..., list[Any]] = getattr(cls, name)

    def read(self: Any, max_count: int, *args: Any) -> list[Any]:
        got = real(self, max_count, *args)
        log.append((max_count, len(got)))
        return got

    monkeypatch.setattr(cls, name, read)


def test_pings_through_two_devices_cost_one_read_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole devices on the fakes: 30 pings 20 ms apart, every TUN and UDP read on both
    sides asks for one packet (no read that would end in EAGAIN); then a burst of 100
    packets is read in batches."""
    reads: list[tuple[int, int]] = []
    _record_reads(monkeypatch, FakeTun, "read_batch", reads)
    _record_reads(monkeypatch, FakeUdp, "recv_runs", reads)
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=10)
    tunnel.sim.run_for(max(END_RESEND_DELAYS) + 0.1)  # the negotiation's late ENDs
    for i in range(5):  # warm up: key confirmation, path-MTU probes and the like
        tunnel.round_trip("a", "b", seq=i + 1)
        tunnel.sim.run_for(0.02)
    reads.clear()
    for i in range(30):
        tunnel.round_trip("a", "b", seq=100 + i)
        tunnel.sim.run_for(0.02)
    data_reads = [r for r in reads if r[1] > 0]
    assert len(data_reads) >= 4 * 30
    wasted = [r for r in reads if r[0] > 1 and r[1] <= 1]
    assert wasted == [], f"batch reads that found at most one packet: {wasted[:5]}"
    reads.clear()
    for i in range(100):
        tunnel.ping("a", "b", seq=1000 + i)
    tunnel.sim.run_for(0.05)
    assert max(asked for asked, _got in reads) == BATCH
    assert sum(got for _asked, got in reads) >= 100
    tunnel.close()
