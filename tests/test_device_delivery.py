"""The receive path delivers read by read: the packets of one read (a GRO run or a
datagram) reach the TUN device before the next read of the same wake-up is opened, and a
failing handler does not cost the reads after it (``ReceivePath.on_udp``); once it has
written ``YIELD_BUDGET`` packets since its last yield, the receive path gives up the CPU at
the end of that read."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from fakes import Tunnel, two_sites, udp4

from secureiod.daemon.receive import YIELD_BUDGET
from secureiod.secureio.negotiation import END_RESEND_DELAYS

SIZES = (900, 1000, 1100, 1200, 1300)
"""Growing packets, each in a datagram of its own: no two can share a GRO read."""


def _packets(tag: int) -> list[bytes]:
    return [
        udp4("198.19.0.1", "198.19.0.2", bytes([tag, i]) * (size // 2))
        for i, size in enumerate(SIZES)
    ]


def _burst(tunnel: Tunnel, packets: list[bytes]) -> None:
    for packet in packets:
        tunnel.nodes["a"].tun.inject(packet)


def _reads_at_b(tunnel: Tunnel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """For each read b's demultiplexer takes: how many packets b's TUN had by then."""
    demux = tunnel.devices["b"].demux
    written = tunnel.nodes["b"].tun.written
    seen: list[int] = []
    for name in ("receive_datagram", "receive_run"):
        real = getattr(demux, name)

        def spy(*args: Any, _real: Any = real) -> Any:
            seen.append(len(written))
            return _real(*args)

        monkeypatch.setattr(demux, name, spy)
    return seen


def test_each_read_is_delivered_before_the_next_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    seen = _reads_at_b(tunnel, monkeypatch)
    before = len(tunnel.nodes["b"].tun.written)
    packets = _packets(1)
    _burst(tunnel, packets)
    tunnel.sim.run_for(0.1)
    assert tunnel.nodes["b"].tun.written[before:] == packets
    # the first left a alone (a quiet device reads one packet), the other four in one
    # wake-up at each end: every read found the packets of the reads before it written
    assert seen == [before + k for k in range(len(SIZES))], seen


def test_a_failing_handler_costs_no_read_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delivery of one read of a wake-up fails (a handler bug, which the loop logs):
    the reads after it are still taken and delivered, the failed read's packet first (its
    events stayed queued), and the failure surfaces once, at the end of the wake-up."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    receive = tunnel.devices["b"].receive
    real = receive.drain
    packets = _packets(2)
    failed = 0

    def failing_once(peer: Any, *args: Any) -> None:
        nonlocal failed
        queued = [getattr(ev, "payload", None) for ev in peer.session._events]
        if not failed and packets[1] in queued:
            failed += 1
            raise RuntimeError("a handler bug")
        real(peer, *args)

    monkeypatch.setattr(receive, "drain", failing_once)
    written = tunnel.nodes["b"].tun.written
    before = len(written)
    _burst(tunnel, packets)
    with pytest.raises(RuntimeError, match="a handler bug"):
        tunnel.sim.run_for(0.1)
    assert failed == 1
    assert written[before:] == packets


@pytest.mark.parametrize("runs", [True, False], ids=["gro-runs", "datagrams"])
def test_gro_runs_are_delivered_run_by_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runs: bool
) -> None:
    """Equal sizes coalesce into GRO reads (two, then three, then three packets): each
    run's packets are written before the next run is opened. Without the batch path
    (``SECUREIOD_NO_BATCH=1``: ``recv_batch``), datagram by datagram."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(max(END_RESEND_DELAYS) + 0.1)  # the negotiation's late ENDs
    if not runs:
        tunnel.devices["b"].receive._recv_runs = None
    written = tunnel.nodes["b"].tun.written
    before = len(written)
    sizes = (1200, 1200, 1000) * 3
    packets = [
        udp4("198.19.0.1", "198.19.0.2", bytes([3, i]) * (s // 2)) for i, s in enumerate(sizes)
    ]
    tunnel.nodes["a"].tun.inject(packets[0])  # alone: a quiet device reads one packet
    tunnel.sim.run_for(0.1)
    seen = _reads_at_b(tunnel, monkeypatch)
    _burst(tunnel, packets[1:])
    tunnel.sim.run_for(0.1)
    assert written[before:] == packets
    expected = [1, 3, 6] if runs else list(range(1, len(packets)))
    assert [n - before for n in seen] == expected, seen


def test_a_burst_yields_the_cpu_every_budget_of_packets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst written to the TUN gives up the CPU at the end of each read that brought the
    packets written since the last yield to ``YIELD_BUDGET``: the local receivers those
    packets woke run before more is opened."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    receive = tunnel.devices["b"].receive
    assert receive.yield_cpu is not None  # the C build's, in a test run
    written = tunnel.nodes["b"].tun.written
    at_yield: list[int] = []
    monkeypatch.setattr(receive, "yield_cpu", lambda: at_yield.append(len(written)))
    reads = _reads_at_b(tunnel, monkeypatch)
    before = len(written)
    packets = [udp4("198.19.0.1", "198.19.0.2", bytes([4, i % 256]) * 20) for i in range(400)]
    _burst(tunnel, packets)
    tunnel.sim.run_for(0.1)
    assert written[before:] == packets
    assert len(at_yield) >= 2, at_yield
    marks = [before, *at_yield]
    for start, end in itertools.pairwise(marks):
        assert end - start >= YIELD_BUDGET, marks
    # each yield came at the end of a read: the next read found exactly that many written
    read_ends = set(reads)
    assert all(n in read_ends or n == len(written) for n in at_yield), (at_yield, reads)
    assert receive.yields == len(at_yield)


def test_one_packet_reads_yield_exactly_every_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read datagram by datagram, one packet each: the yields come exactly every
    ``YIELD_BUDGET`` packets (the first packet takes the lone path, which does not count).
    (From review 8: the burst test above passes for any budget up to a read's size.)"""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    receive = tunnel.devices["b"].receive
    receive._recv_runs = None  # datagram by datagram: one read, one packet
    written = tunnel.nodes["b"].tun.written
    at_yield: list[int] = []
    monkeypatch.setattr(receive, "yield_cpu", lambda: at_yield.append(len(written)))
    before = len(written)
    n = 3 * YIELD_BUDGET + 10
    packets = [udp4("198.19.0.1", "198.19.0.2", bytes([6, i % 256]) * 450) for i in range(n)]
    _burst(tunnel, packets)
    tunnel.sim.run_for(0.1)
    assert written[before:] == packets
    assert [y - before for y in at_yield] == [1 + k * YIELD_BUDGET for k in (1, 2, 3)]


def test_the_budget_carries_across_wake_ups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the wake-ups come back to back with a few packets each: the count is
    not started over per wake-up, or such a flow would never yield. Pings, which take
    the lone path, do not count."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.1)
    receive = tunnel.devices["b"].receive
    yields: list[int] = []
    written = tunnel.nodes["b"].tun.written
    monkeypatch.setattr(receive, "yield_cpu", lambda: yields.append(len(written)))
    before = len(written)
    for i in range(2 * YIELD_BUDGET):  # lone packets, one per wake-up
        tunnel.nodes["a"].tun.inject(udp4("198.19.0.1", "198.19.0.2", bytes([5, i]) * 200))
        tunnel.sim.run_for(0.05)
    assert len(written) - before == 2 * YIELD_BUDGET
    assert yields == []
    for i in range(2 * YIELD_BUDGET):  # two per wake-up: not lone, and far below the budget
        for size in (300, 400):
            tunnel.nodes["a"].tun.inject(udp4("198.19.0.1", "198.19.0.2", bytes([7, i]) * size))
        tunnel.sim.run_for(0.05)
    assert len(written) - before == 6 * YIELD_BUDGET
    assert len(yields) >= 3, yields
    marks = [before + 2 * YIELD_BUDGET, *yields]
    for start, end in itertools.pairwise(marks):
        assert end - start >= YIELD_BUDGET, marks
