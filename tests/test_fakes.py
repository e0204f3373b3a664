"""The in-memory harness (``tests/fakes.py``) does what the device tests rely on.

A fake that lies makes every device test built on it worthless, so its contract is tested
here on its own: the ports' shapes, the wire's delivery (latency, order, seeded loss,
duplication, reordering, path MTU, NAT rebinding, injection), the loop's order inside one
wake-up against the real ``EventLoop``, and the bounds that keep a broken daemon from
hanging a test.
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import (
    FAKE_FD_BASE,
    ZERO_VNET_HDR,
    ConfigBuilder,
    FakeNetlink,
    FakeNotifier,
    FakeResolver,
    FakeTun,
    FakeUdp,
    Sim,
    SimError,
    VirtualClock,
    WireDatagram,
    echo_reply,
    hub_and_spokes,
    ip_dst,
    ip_src,
    ipv4,
    ping4,
    ping6,
    two_sites,
    udp4,
    udp6,
)

from secureiod.config import diff_config
from secureiod.daemon import ports
from secureiod.daemon.inner import inner_packet_problem
from secureiod.daemon.loop import EventLoop
from secureiod.netlink import NetlinkError
from secureiod.tun import TunError
from secureiod.udp import SendResult

A = ("198.18.0.1", 5800)
B = ("198.18.0.2", 5800)


def _two(sim: Sim) -> tuple[FakeUdp, FakeUdp]:
    return sim.node("a", *A).udp, sim.node("b", *B).udp


# --- the fakes have the ports' shape ---------------------------------------------------------


def _members(protocol: type) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


def _parameters(function: Callable[..., Any]) -> list[tuple[str, Any]]:
    signature = inspect.signature(function)
    return [(p.name, p.default) for p in signature.parameters.values() if p.name != "self"]


@pytest.mark.parametrize(
    ("protocol", "make"),
    [
        (ports.TunPort, lambda sim: sim.node("a", *A).tun),
        (ports.UdpPort, lambda sim: sim.node("a", *A).udp),
        (ports.NetlinkPort, lambda sim: sim.node("a", *A).netlink),
        (ports.NotifierPort, lambda sim: sim.node("a", *A).notifier),
        (ports.ResolverPort, lambda sim: sim.node("a", *A).resolver),
        (ports.ClockPort, lambda sim: sim.clock),
        (ports.LoopPort, lambda sim: sim.loop()),
        (ports.UdpStatsView, lambda sim: sim.node("a", *A).udp.stats),
    ],
)
def test_fakes_have_every_member_of_their_port(protocol: type, make: Callable[[Sim], Any]) -> None:
    """Same names, parameter names and defaults as the protocol: a device calling a port
    method with keywords works on the fake exactly when it works on the real adapter."""
    fake = make(Sim())
    for name in _members(protocol):
        assert hasattr(fake, name), f"{type(fake).__name__} lacks {protocol.__name__}.{name}"
        wanted = vars(protocol).get(name)
        if inspect.isfunction(wanted):
            assert _parameters(getattr(fake, name)) == _parameters(wanted), name


def test_ports_of_a_node_are_what_a_device_takes() -> None:
    node = Sim().node("a", *A)
    assert set(node.ports()) == {"tun", "udp", "netlink", "notifier", "resolver", "loop", "clock"}
    assert node.tun.fileno() >= FAKE_FD_BASE
    assert node.udp.fileno() >= FAKE_FD_BASE
    assert node.tun.fileno() != node.udp.fileno()


def test_fake_descriptors_are_unique_across_loops() -> None:
    sim = Sim()
    nodes = [sim.node(f"n{i}", f"198.18.0.{i + 1}") for i in range(3)]
    fds = [fd for n in nodes for fd in (n.tun.fileno(), n.udp.fileno())]
    assert len(set(fds)) == len(fds)


# --- the clock -------------------------------------------------------------------------------


def test_virtual_clock_moves_only_forward_and_wall_follows() -> None:
    clock = VirtualClock(start=50.0, wall_start_ns=10**18)
    assert clock.monotonic() == 50.0
    clock.advance_to(51.5)
    assert clock.monotonic() == 51.5
    assert clock.wall_ns() == 10**18 + 1_500_000_000
    with pytest.raises(SimError):
        clock.advance_to(51.0)


# --- the wire --------------------------------------------------------------------------------


def test_delivery_after_latency_in_send_order() -> None:
    sim = Sim(latency=0.003)
    a, b = _two(sim)
    start = sim.now
    assert a.send_batch([b"1", b"2", b"3"], B) == []
    sim.run_for(0.002)
    assert b.queued == 0
    sim.wait_for(lambda: b.queued == 3, 1.0)
    assert sim.now == pytest.approx(start + 0.003)
    assert b.recv_batch() == [(b"1", A), (b"2", A), (b"3", A)]
    assert (a.stats.tx_datagrams, a.stats.tx_bytes) == (3, 3)
    assert (b.stats.rx_datagrams, b.stats.rx_bytes) == (3, 3)


def test_recv_batch_respects_max_count() -> None:
    sim = Sim()
    a, b = _two(sim)
    a.send_batch([bytes([i]) for i in range(10)], B)
    sim.run_for(0.01)
    assert [d for d, _ in b.recv_batch(4)] == [bytes([i]) for i in range(4)]
    assert b.queued == 6


def _loss_pattern(seed: int, loss: float, count: int = 2000) -> list[int]:
    sim = Sim(seed=seed)
    a, b = _two(sim)
    sim.wire.path(A[0], B[0]).loss = loss
    for i in range(count):
        a.send(i.to_bytes(2, "big"), B)
    sim.run_for(0.1)
    return [int.from_bytes(d, "big") for d, _ in b.recv_batch(count)]


def test_loss_is_seeded_and_close_to_its_rate() -> None:
    first = _loss_pattern(7, 0.3)
    assert first == _loss_pattern(7, 0.3)
    assert first != _loss_pattern(8, 0.3)
    assert 1300 < len(first) < 1500  # 2000 * 0.7 = 1400, binomial sd ~ 20
    assert first == sorted(first)


def test_loss_is_per_direction() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.path(A[0], B[0]).loss = 1.0
    a.send(b"lost", B)
    b.send(b"kept", A)
    sim.run_for(0.01)
    assert b.recv_batch() == []
    assert a.recv_batch() == [(b"kept", B)]
    assert sim.wire.stats.lost == 1


def test_one_directions_traffic_does_not_change_the_others_luck() -> None:
    def b_to_a(extra_a_traffic: int) -> list[bytes]:
        sim = Sim(seed=3)
        a, b = _two(sim)
        sim.wire.link(A[0], B[0], loss=0.5)
        for i in range(extra_a_traffic):
            a.send(b"x%d" % i, B)
        for i in range(200):
            b.send(i.to_bytes(2, "big"), A)
        sim.run_for(0.01)
        return [d for d, _ in a.recv_batch(500)]

    assert b_to_a(0) == b_to_a(37)


def test_duplication_and_reordering() -> None:
    sim = Sim(seed=1)
    a, b = _two(sim)
    path = sim.wire.path(A[0], B[0])
    path.duplicate = 0.2
    path.reorder = 0.2
    for i in range(500):
        a.send(i.to_bytes(2, "big"), B)
    sim.run_for(0.1)
    got = [int.from_bytes(d, "big") for d, _ in b.recv_batch(2000)]
    stats = sim.wire.stats
    assert 60 < stats.duplicated < 140 and 60 < stats.reordered < 140
    assert len(got) == 500 + stats.duplicated
    assert set(got) == set(range(500))
    assert got != sorted(got)


def test_jitter_reorders_only_within_its_width() -> None:
    sim = Sim(seed=2, latency=0.010)
    a, b = _two(sim)
    sim.wire.path(A[0], B[0]).jitter = 0.004
    times: dict[int, float] = {}
    for i in range(100):
        a.send(bytes([i]), B)
    while len(times) < 100:
        assert sim.run_until(lambda: b.queued > 0, 1.0)
        for data, _ in b.recv_batch():
            times[data[0]] = sim.now
    assert all(0.010 <= t - 1000.0 <= 0.014 + 1e-9 for t in times.values())


def test_datagram_over_the_path_mtu_is_too_big_when_the_sender_knows() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.link(A[0], B[0], mtu=1400)
    ok, big = bytes(1400 - 28), bytes(1400 - 27)
    assert a.send_batch([ok, big, ok], B) == [(big, SendResult.TOO_BIG)]
    assert a.stats.tx_too_big == 1
    assert a.stats.tx_datagrams == 2
    sim.run_for(0.01)
    assert [len(d) for d, _ in b.recv_batch()] == [1372, 1372]
    assert sim.nodes["a"].netlink.route_get(B[0]) == ("eth0", 1400)


def test_black_hole_drops_silently_and_the_kernel_does_not_know() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.link(A[0], B[0], mtu=1400, black_hole=True)
    assert a.send_batch([bytes(1400), bytes(100)], B) == []
    sim.run_for(0.01)
    assert [len(d) for d, _ in b.recv_batch()] == [100]
    assert sim.wire.stats.black_holed == 1
    assert sim.nodes["a"].netlink.route_get(B[0]) == ("eth0", 1500)


def test_ipv6_overhead_is_48_bytes() -> None:
    sim = Sim()
    a = sim.node("a", "fd00:5ec:ff::1").udp
    b = sim.node("b", "fd00:5ec:ff::2").udp
    assert a.family == socket.AF_INET6
    dst = b.local_address
    assert dst == ("fd00:5ec:ff::2", 5800, 0, 0)
    sim.wire.link("fd00:5ec:ff::1", "fd00:5ec:ff::2", mtu=1280)
    assert a.send(bytes(1232), dst) is SendResult.SENT
    assert a.send(bytes(1233), dst) is SendResult.TOO_BIG
    assert a.send(b"x", B) is SendResult.ERROR  # an IPv4 address from an IPv6 socket
    sim.run_for(0.01)
    assert b.recv_batch() == [(bytes(1232), a.local_address)]


def test_addresses_outside_the_test_ranges_are_refused() -> None:
    sim = Sim()
    with pytest.raises(SimError, match="outside the test underlay"):
        sim.node("x", "192.0.2.1")
    a = sim.node("a", *A).udp
    assert a.send(b"x", ("8.8.8.8", 53)) is SendResult.ERROR
    assert a.stats.errors_by_kind == {"ENETUNREACH": 1}
    with pytest.raises(SimError, match="already bound"):
        sim.node("a2", *A)


def test_rebind_changes_the_source_and_orphans_datagrams_to_the_old_address() -> None:
    sim = Sim()
    a, b = _two(sim)
    a.send(b"before", B)
    sim.run_for(0.01)
    assert b.recv_batch() == [(b"before", A)]
    b.send(b"in flight", A)
    sim.wire.rebind(a, "198.18.0.11", 40001)
    assert a.local_address == ("198.18.0.11", 40001)
    a.send(b"after", B)
    sim.run_for(0.01)
    assert b.recv_batch() == [(b"after", ("198.18.0.11", 40001))]
    assert a.recv_batch() == []
    assert sim.wire.stats.undeliverable == 1
    b.send(b"reply", ("198.18.0.11", 40001))
    sim.run_for(0.01)
    assert a.recv_batch() == [(b"reply", B)]


def test_inject_from_any_address_and_observers_see_everything() -> None:
    sim = Sim()
    a, b = _two(sim)
    seen: list[WireDatagram] = []
    sim.wire.observers.append(seen.append)
    only_a = sim.wire.capture(lambda dg: dg.src == A)
    a.send(b"genuine", B)
    sim.wire.inject(("198.18.0.66", 6666), B, b"forged")
    sim.wire.inject(("198.18.0.67", 6667), B, b"late", delay=0.5)
    sim.run_for(0.01)
    assert b.recv_batch() == [(b"genuine", A), (b"forged", ("198.18.0.66", 6666))]
    sim.run_for(0.5)
    assert b.recv_batch() == [(b"late", ("198.18.0.67", 6667))]
    assert [(dg.data, dg.injected) for dg in seen] == [
        (b"genuine", False),
        (b"forged", True),
        (b"late", True),
    ]
    assert [dg.data for dg in only_a] == [b"genuine"]
    with pytest.raises(SimError):
        sim.wire.inject(("10.0.0.1", 1), B, b"x")


def test_cut_and_heal() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.cut(A[0], B[0])
    a.send(b"1", B)
    b.send(b"2", A)
    sim.run_for(0.01)
    assert a.queued == b.queued == 0
    sim.wire.heal(A[0], B[0])
    a.send(b"3", B)
    sim.run_for(0.01)
    assert b.recv_batch() == [(b"3", A)]


def test_targeted_drop() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.path(A[0], B[0]).drop = lambda dg: dg.data.startswith(b"kx")
    a.send_batch([b"kx1", b"data", b"kx2"], B)
    sim.run_for(0.01)
    assert b.recv_batch() == [(b"data", A)]


def test_receive_queue_is_bounded() -> None:
    sim = Sim()
    a, b = _two(sim)
    sim.wire.queue_limit = 10
    a.send_batch([b"x"] * 15, B)
    sim.run_for(0.01)
    assert b.queued == 10 and b.queue_drops == 5 and sim.wire.stats.queue_full == 5


def test_closed_socket() -> None:
    sim = Sim()
    a, b = _two(sim)
    b.close()
    assert b.fileno() == -1
    a.send(b"x", B)
    sim.run_for(0.01)
    assert sim.wire.stats.undeliverable == 1
    assert b.send(b"x", A) is SendResult.ERROR


# --- the TUN ---------------------------------------------------------------------------------


def test_tun_inject_read_write() -> None:
    sim = Sim()
    tun = sim.node("a", *A).tun
    packet = ping4("198.19.0.1", "198.19.0.2")
    assert tun.inject(packet)
    assert tun.read_batch() == [packet]
    assert tun.write(memoryview(packet))
    assert tun.written == [packet]
    assert tun.stats.packets_read == tun.stats.packets_written == 1


def test_tun_with_vnet_hdr_reads_and_writes_the_header() -> None:
    sim = Sim()
    tun = sim.node("a", *A, vnet_hdr=True).tun
    packet = ping4("198.19.0.1", "198.19.0.2")
    tun.inject(packet)
    header = bytes([1, 1]) + bytes(8)
    tun.inject(packet, vnet_header=header)
    assert tun.read_batch() == [ZERO_VNET_HDR + packet, header + packet]
    tun.write_parts(ZERO_VNET_HDR, packet)
    assert tun.written == [ZERO_VNET_HDR + packet]
    assert tun.take() == [packet]
    assert tun.written == []
    tun.set_offload(0x7)
    assert tun.offload == 7 and tun.offload_history == [7]


def test_tun_without_vnet_hdr_refuses_offload_and_headers() -> None:
    tun = Sim().node("a", *A).tun
    with pytest.raises(TunError):
        tun.set_offload(0x3)
    tun.set_offload(0)
    with pytest.raises(SimError):
        tun.inject(b"\x45", vnet_header=ZERO_VNET_HDR)


def test_tun_read_truncates_to_bufsize_and_queue_is_bounded() -> None:
    sim = Sim()
    loop = sim.loop()
    tun = FakeTun(loop, queue_limit=3)
    for size in (10, 20, 30, 40):
        tun.inject_raw(bytes(size))
    assert tun.injected_dropped == 1
    assert [len(p) for p in tun.read_batch(2, bufsize=15)] == [10, 15]
    assert [len(p) for p in tun.read_batch()] == [30]


def test_tun_refused_write_and_closed_device() -> None:
    tun = Sim().node("a", *A).tun
    tun.refuse_writes = lambda data: data[0] >> 4 not in (4, 6)
    assert not tun.write(b"\x00garbage")
    assert tun.stats.write_errors == {"EINVAL": 1}
    tun.close()
    with pytest.raises(TunError):
        tun.write(b"\x45")


# --- the loop --------------------------------------------------------------------------------


def test_sim_loop_order_within_a_wakeup() -> None:
    """Ready readers, then thread-safe callbacks, then due timers (in time order, a
    cancelled one skipped), then after_wakeup: once per wake-up."""
    sim = Sim()
    loop = sim.loop()
    tun = FakeTun(loop)
    trace: list[str] = []
    start = sim.now
    loop.call_at(start + 0.2, lambda now: trace.append("T2"))
    loop.call_at(start + 0.1, lambda now: trace.append("T1"))
    loop.call_at(start + 0.15, lambda now: trace.append("never")).cancel()

    def on_tun(now: float) -> None:
        for packet in tun.read_batch(1):
            trace.append(f"R{packet.decode()}")
        loop.call_soon_threadsafe(lambda now: trace.append("P"))

    loop.add_reader(tun.fileno(), on_tun)
    loop.attach(lambda now: trace.append(f"A@{now - start:.1f}"))
    tun.inject_raw(b"1")
    tun.inject_raw(b"2")
    sim.run_for(0.3)
    assert trace == [
        "R1",
        "P",
        "A@0.0",
        "R2",  # level-triggered: still readable, called again at the same instant
        "P",
        "A@0.0",
        "T1",
        "A@0.1",
        "T2",
        "A@0.2",
    ]
    assert loop.wakeups == 4


def test_timer_added_by_a_timer_runs_in_the_same_wakeup_when_due() -> None:
    sim = Sim()
    loop = sim.loop()
    trace: list[str] = []

    def first(now: float) -> None:
        trace.append("first")
        loop.call_at(now, lambda now: trace.append("second"))

    loop.call_at(sim.now + 1, first)
    loop.attach(lambda now: trace.append("A"))
    sim.run_for(2)
    assert trace == ["first", "second", "A"]


def _scenario(
    loop: Any, add_source: Callable[[list[bytes]], int], read_one: Callable[[int], bytes]
) -> list[str]:
    """One script for both loops: a reader that takes one item per call and schedules a
    timer in the past and a thread-safe callback (which schedules another) the first
    time, two future timers (the last stops the loop), a cancelled one, and after_wakeup."""
    trace: list[str] = []
    now0 = loop.clock()
    fd = add_source([b"1", b"2"])

    def reader(now: float) -> None:
        item = read_one(fd)
        trace.append(f"R{item.decode()}")
        if item == b"1":
            loop.call_at(now - 1.0, lambda now: trace.append("Tpast"))
            loop.call_soon_threadsafe(pending)

    def pending(now: float) -> None:
        trace.append("P")
        loop.call_soon_threadsafe(lambda now: trace.append("P2"))  # the next wake-up

    def last(now: float) -> None:
        trace.append("T2")
        loop.remove_reader(fd)
        loop.stop()

    loop.add_reader(fd, reader)
    # Far enough apart that a busy test machine cannot merge two wake-ups of the real loop.
    loop.call_at(now0 + 0.3, lambda now: trace.append("T1"))
    loop.call_at(now0 + 0.4, lambda now: trace.append("never")).cancel()
    loop.call_at(now0 + 0.5, last)
    return trace


def test_sim_loop_runs_a_script_in_the_same_order_as_the_real_event_loop() -> None:
    real = EventLoop()
    sockets: list[socket.socket] = []

    def real_source(items: list[bytes]) -> int:
        r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        r.setblocking(False)
        for item in items:
            w.send(item)
        sockets.extend((r, w))
        return r.fileno()

    def real_read(fd: int) -> bytes:
        return next(s for s in sockets if s.fileno() == fd).recv(16)

    try:
        real_trace = _scenario(real, real_source, real_read)
        stopper = threading.Timer(5.0, real.stop)  # a broken loop must not hang the suite
        stopper.start()
        started = time.monotonic()
        real.run(lambda now: real_trace.append("A"))
        stopper.cancel()
        assert time.monotonic() - started < 5.0
    finally:
        real.close()
        for s in sockets:
            s.close()

    sim = Sim()
    loop = sim.loop()
    tuns: dict[int, FakeTun] = {}

    def sim_source(items: list[bytes]) -> int:
        tun = FakeTun(loop)
        for item in items:
            tun.inject_raw(item)
        tuns[tun.fileno()] = tun
        return tun.fileno()

    sim_trace = _scenario(loop, sim_source, lambda fd: tuns[fd].read_batch(1)[0])
    loop.attach(lambda now: sim_trace.append("A"))
    sim.run_for(1.0)
    assert not loop.running
    expected = ["R1", "P", "Tpast", "A", "R2", "P2", "A", "T1", "A", "T2", "A"]
    assert real_trace == expected
    assert sim_trace == expected


def test_sim_loop_polls_real_descriptors_too() -> None:
    sim = Sim()
    loop = sim.loop()
    r, w = socket.socketpair()
    try:
        r.setblocking(False)
        got: list[bytes] = []
        loop.add_reader(r.fileno(), lambda now: got.append(r.recv(100)))
        sim.run_for(0.1)
        assert got == []
        w.send(b"hello")
        sim.run_for(0.1)
        assert got == [b"hello"]
        loop.remove_reader(r.fileno())
    finally:
        r.close()
        w.close()


def test_a_stopped_loop_is_no_longer_woken() -> None:
    sim = Sim()
    loop = sim.loop()
    ran: list[float] = []
    loop.call_at(sim.now + 1, ran.append)
    loop.stop()
    sim.run_for(2)
    assert ran == []


def test_unknown_fake_descriptor_is_refused() -> None:
    sim = Sim()
    other = sim.loop("other")
    tun = FakeTun(other)
    with pytest.raises(SimError):
        sim.loop("mine").add_reader(tun.fileno(), lambda now: None)


def test_livelock_is_an_error_not_a_hang() -> None:
    """A writer that stays registered on a fake (always writable) spins, as with epoll."""
    sim = Sim()
    loop = sim.loop()
    tun = FakeTun(loop)
    loop.add_writer(tun.fileno(), lambda now: None)
    with pytest.raises(SimError, match="livelock"):
        sim.run_for(1)


def test_a_reader_that_never_drains_is_an_error() -> None:
    sim = Sim()
    loop = sim.loop()
    tun = FakeTun(loop)
    tun.inject_raw(b"x")
    loop.add_reader(tun.fileno(), lambda now: None)
    with pytest.raises(SimError):
        sim.run_for(1)


def test_runaway_timers_hit_the_wakeup_budget() -> None:
    sim = Sim(max_wakeups=1000)
    loop = sim.loop()

    def again(now: float) -> None:
        loop.call_at(now + 1e-6, again)

    loop.call_at(sim.now, again)
    with pytest.raises(SimError, match="wake-ups in one run"):
        sim.run_for(10)


def test_run_until_stops_at_the_predicate_or_the_deadline() -> None:
    sim = Sim()
    loop = sim.loop()
    fired: list[float] = []
    loop.call_at(sim.now + 2, fired.append)
    start = sim.now
    assert not sim.run_until(lambda: bool(fired), 1.5)
    assert sim.now == start + 1.5
    assert sim.run_until(lambda: bool(fired), 1.5)
    assert sim.now == start + 2
    with pytest.raises(SimError, match="not within"):
        sim.wait_for(lambda: False, 0.5, "never")


# --- netlink, notifier, resolver --------------------------------------------------------------


def test_netlink_records_state_and_answers_route_get() -> None:
    nl = FakeNetlink()
    nl.set_mtu("sio0", 1420)
    nl.add_address("sio0", ipaddress.ip_interface("198.19.0.1/24"))
    nl.add_address("sio0", ipaddress.ip_interface("198.19.0.1/24"))
    nl.set_up("sio0")
    nl.replace_route(ipaddress.ip_network("198.19.0.2/32"), "sio0")
    nl.replace_route(ipaddress.ip_network("198.19.0.0/24"), "sio0", mtu=1400)
    assert nl.mtu == {"sio0": 1420} and nl.up == {"sio0"}
    assert nl.addresses["sio0"] == [ipaddress.ip_interface("198.19.0.1/24")]
    assert nl.route_get("198.19.0.2") == ("sio0", 1420)  # no metric: the link MTU
    assert nl.route_get("198.19.0.9") == ("sio0", 1400)
    assert nl.route_get("198.18.0.2") == ("eth0", 1500)
    assert nl.route_get(ipaddress.ip_address("fd00:5ec:ff::2")) == ("eth0", 1500)
    with pytest.raises(NetlinkError, match="unreachable"):
        nl.route_get("192.0.2.1")
    nl.delete_route(ipaddress.ip_network("198.19.0.2/32"), "sio0")
    nl.delete_route(ipaddress.ip_network("198.19.0.2/32"), "sio0")  # absent: success
    assert nl.route_mtu("198.19.0.0/24") == 1400
    assert list(nl.routes) == [ipaddress.ip_network("198.19.0.0/24")]
    assert [entry[0] for entry in nl.route_history] == ["replace", "replace", "delete"]


def test_netlink_failures() -> None:
    nl = FakeNetlink()
    nl.fail("set_mtu", "set MTU 9000 on sio0: Invalid argument", times=1)
    with pytest.raises(NetlinkError, match="Invalid argument"):
        nl.set_mtu("sio0", 9000)
    nl.set_mtu("sio0", 1420)
    nl.fail("replace_route")
    for _ in range(3):
        with pytest.raises(NetlinkError):
            nl.replace_route(ipaddress.ip_network("198.19.0.2/32"), "sio0")
    nl.recover()
    nl.replace_route(ipaddress.ip_network("198.19.0.2/32"), "sio0")
    assert nl.routes
    with pytest.raises(SimError):
        nl.fail("no_such_operation")


def test_notifier_records() -> None:
    notifier = FakeNotifier()
    assert notifier.enabled
    notifier.ready("up")
    notifier.status("1 peer")
    notifier.watchdog()
    assert notifier.calls == [("ready", "up"), ("status", "1 peer"), ("watchdog", None)]
    assert notifier.of("status") == ["1 peer"]
    assert not FakeNotifier(enabled=False).ready()


def test_resolver_answers_on_the_loop_after_its_delay() -> None:
    sim = Sim()
    node = sim.node("a", *A, resolver_delay=0.2)
    resolver: FakeResolver = node.resolver
    answers: list[tuple[Any, Any, float]] = []

    def callback(addresses: Any, error: Any) -> None:
        answers.append((addresses, error, sim.now))

    start = sim.now
    resolver.resolve("b.test", 5800, socket.AF_INET, callback)
    assert answers == []  # never answers inside resolve()
    sim.run_for(0.1)
    resolver.names["b.test"] = ["198.18.0.2", "fd00:5ec:ff::2"]  # appears while in flight
    sim.run_for(0.2)
    assert answers == [([("198.18.0.2", 5800)], None, pytest.approx(start + 0.2))]
    resolver.resolve("nope.test", 1, socket.AF_UNSPEC, callback)
    resolver.resolve("b.test", 1, socket.AF_INET6, callback)
    resolver.resolve("198.18.0.9", 7, socket.AF_INET, callback)
    resolver.delays["slow.test"] = 30.0
    resolver.resolve("slow.test", 1, socket.AF_INET, callback)
    sim.run_for(1)
    assert [(a, e) for a, e, _ in answers[1:]] == [
        (None, "Name or service not known"),
        ([("fd00:5ec:ff::2", 1, 0, 0)], None),
        ([("198.18.0.9", 7)], None),
    ]
    assert resolver.in_flight == 1
    assert resolver.lookups_of("b.test") == pytest.approx([start, start + 0.3])
    resolver.close()
    sim.run_for(60)
    assert len(answers) == 4


def test_resolver_callback_runs_as_a_pending_callback_of_its_loop() -> None:
    sim = Sim()
    node = sim.node("a", *A, resolver_delay=0.0)
    trace: list[str] = []
    node.loop.attach(lambda now: trace.append("A"))
    node.resolver.resolve("x.test", 1, socket.AF_INET, lambda a, e: trace.append("answer"))
    sim.settle()
    assert trace == ["answer", "A"]


# --- configs ---------------------------------------------------------------------------------


def test_two_sites_load_and_know_each_other(tmp_path: Path) -> None:
    builder = two_sites(tmp_path)
    configs = builder.load_all()
    a, b = configs["a"], configs["b"]
    assert a.interface.name == b.interface.name == "sio0"
    assert [str(x) for x in a.interface.address] == ["198.19.0.1/24", "fd00:5ec::1/64"]
    (peer_b,) = a.peers
    assert peer_b.name == "b" and peer_b.public_key == b.public_key
    assert str(peer_b.endpoint) == "198.18.0.2:5800"
    assert [str(n) for n in peer_b.allowed_ips] == ["198.19.0.2/32", "fd00:5ec::2/128"]
    assert b.peers[0].public_key == a.public_key
    sim = Sim()
    node = builder.sim_node(sim, "b")
    assert node.address == ("198.18.0.2", 5800)


def test_builder_options_psk_and_edits_for_a_reload(tmp_path: Path) -> None:
    builder = two_sites(tmp_path, b_knows_a=False, psk=b"k" * 32, persistent_keepalive=5)
    a, b = builder.nodes["a"], builder.nodes["b"]
    before = b.load()
    assert before.peers[0].endpoint is None
    assert before.peers[0].psk == b"k" * 32 and before.peers[0].persistent_keepalive == 5
    c = builder.add("c")
    builder.connect(b, c)
    b.peers["a"]["allowed_ips"] = ["198.19.0.1/32"]
    after = b.load()
    diff = diff_config(before, after)
    assert set(diff.added) == {"c"} and set(diff.changed) == {"a"}
    assert diff.changed["a"].fields == {"allowed_ips"}
    assert a.load().peers[0].endpoint is not None


def test_ipv6_underlay_sites(tmp_path: Path) -> None:
    builder = two_sites(tmp_path, ipv6_underlay=True)
    a = builder.load("a")
    assert str(a.peers[0].endpoint) == "[fd00:5ec:ff::2]:5800"
    assert builder.sim_node(Sim(), "a").udp.family == socket.AF_INET6


def test_hub_and_three_spokes(tmp_path: Path) -> None:
    builder = hub_and_spokes(tmp_path)
    configs = builder.load_all()
    assert [p.name for p in configs["hub"].peers] == ["s1", "s2", "s3"]
    assert all(p.endpoint is None for p in configs["hub"].peers)
    spoke = configs["s2"]
    (hub,) = spoke.peers
    assert str(hub.endpoint) == "198.18.0.1:5800"
    assert [str(n) for n in hub.allowed_ips] == ["198.19.0.0/24", "fd00:5ec::/64"]


def test_builder_refuses_a_duplicate_site(tmp_path: Path) -> None:
    builder = ConfigBuilder(tmp_path)
    builder.add("a")
    with pytest.raises(SimError):
        builder.add("a")


# --- packets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        ping4("198.19.0.1", "198.19.0.2", 3, b"abc"),
        ping6("fd00:5ec::1", "fd00:5ec::2", 3, b"abc"),
        udp4("198.19.0.1", "198.19.0.2", b"x" * 1000),
        udp6("fd00:5ec::1", "fd00:5ec::2", b"x" * 1001),
    ],
)
def test_packet_builders_make_consistent_packets(packet: bytes) -> None:
    assert inner_packet_problem(packet) is None
    reply = echo_reply(packet) if packet[9 if packet[0] >> 4 == 4 else 6] in (1, 58) else None
    if reply is not None:
        assert (ip_src(reply), ip_dst(reply)) == (ip_dst(packet), ip_src(packet))
        assert inner_packet_problem(reply) is None


def test_ipv4_header_checksum_verifies() -> None:
    packet = ipv4("198.19.0.1", "198.19.0.2", b"payload")
    words = [int.from_bytes(packet[i : i + 2], "big") for i in range(0, 20, 2)]
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
