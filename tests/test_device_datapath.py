"""Whole devices on the in-memory wire: handshake, packets both ways, cryptokey routing,
and the checks an inner packet passes before it reaches the TUN (issue 10 items 4 and 9).

Every test runs real ``Device`` objects (real sessions, real crypto) over ``tests/fakes``:
no root, no sockets, virtual time.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from fakes import Tunnel, hub_and_spokes, ipv4, ipv6, ping4, ping6, two_sites, udp4, udp6

from secureiod.daemon.peer import DATA_TYPE


@pytest.fixture
def ab(tmp_path: Path) -> Tunnel:
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    return tunnel


def test_handshake_then_pings_both_ways_v4_and_v6(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path))
    took = tunnel.wait_established(timeout=5)
    assert took < 0.5  # a few round trips of 1 ms, no timer waits
    for seq, version in enumerate((4, 6, 4, 6), 1):
        tunnel.round_trip("a", "b", seq, version=version)
        tunnel.round_trip("b", "a", seq + 10, version=version)
    for site, other in (("a", "b"), ("b", "a")):
        c = tunnel.peer(site, other).counters
        assert (c.rx_packets, c.tx_packets) == (8, 8)
        assert not any(c.drops.values()), c.drops
        status = tunnel.devices[site].status()
        assert status["peers_established"] == 1
        assert status["no_route"] == 0
        notifier = tunnel.nodes[site].notifier
        assert notifier.of("ready")
        assert notifier.of("status")[-1] == "1/1 peers established"


def test_packets_arrive_byte_exact_and_in_order(ab: Tunnel) -> None:
    sent = [udp4("198.19.0.1", "198.19.0.2", bytes([i]) * (i * 37 % 1300)) for i in range(60)]
    sent += [udp6("fd00:5ec::1", "fd00:5ec::2", bytes([i]) * (i * 53 % 1200)) for i in range(60)]
    for packet in sent:
        assert ab.nodes["a"].tun.inject(packet)
    ab.sim.wait_for(lambda: len(ab.nodes["b"].tun.written) == len(sent), 2.0)
    assert ab.delivered("b") == sent


def test_a_packet_written_before_the_handshake_goes_out_once_established(tmp_path: Path) -> None:
    """The first ping of a fresh tunnel waits in the session's queue, not in the void."""
    tunnel = Tunnel(two_sites(tmp_path))
    packet = tunnel.ping("a", "b")
    tunnel.sim.wait_for(lambda: packet in tunnel.nodes["b"].tun.packets(), 1.0)
    assert tunnel.delivered("b") == [packet]


def test_passive_side_learns_the_endpoint_from_first_contact(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path, b_knows_a=False))
    assert tunnel.peer("b", "a").endpoint is None
    tunnel.wait_established(timeout=5)
    assert tunnel.peer("b", "a").endpoint == tunnel.nodes["a"].address
    tunnel.round_trip("b", "a")


def test_no_route_is_counted_and_nothing_is_sent(ab: Tunnel) -> None:
    a = ab.nodes["a"]
    before = a.udp.stats.tx_datagrams
    a.tun.inject(ping4("198.19.0.1", "198.19.0.99"))
    a.tun.inject(ping6("fd00:5ec::1", "fd00:5ec::99"))
    ab.sim.run_for(0.1)
    assert ab.devices["a"].status()["no_route"] == 2
    assert a.udp.stats.tx_datagrams == before
    assert ab.nodes["b"].tun.written == []


def test_hub_routes_each_packet_to_the_peer_owning_its_destination(tmp_path: Path) -> None:
    tunnel = Tunnel(hub_and_spokes(tmp_path))
    tunnel.wait_established(timeout=5)
    hub = tunnel.nodes["hub"]
    for n in (2, 3, 4):
        hub.tun.inject(ping4("198.19.0.1", f"198.19.0.{n}", n))
        hub.tun.inject(ping6("fd00:5ec::1", f"fd00:5ec::{n}", n))
    tunnel.sim.run_for(0.1)
    for n, spoke in ((2, "s1"), (3, "s2"), (4, "s3")):
        got = tunnel.delivered(spoke)
        assert got == [
            ping4("198.19.0.1", f"198.19.0.{n}", n),
            ping6("fd00:5ec::1", f"fd00:5ec::{n}", n),
        ], spoke


def test_spoke_to_spoke_through_the_hub(tmp_path: Path) -> None:
    """s1 reaches s3 through the hub: the hub's kernel forwards what its TUN got back into
    its TUN (emulated here), and the hub's device routes it to s3."""
    tunnel = Tunnel(hub_and_spokes(tmp_path))
    tunnel.wait_established(timeout=5)
    packet = ping4("198.19.0.2", "198.19.0.4", 7)
    tunnel.nodes["s1"].tun.inject(packet)
    tunnel.sim.run_for(0.05)
    (forwarded,) = tunnel.delivered("hub")
    assert forwarded == packet
    tunnel.nodes["hub"].tun.inject(forwarded)
    tunnel.sim.run_for(0.05)
    assert tunnel.delivered("s3") == [packet]
    assert tunnel.delivered("s2") == []


def test_inner_source_outside_the_peers_allowed_ips_is_dropped_and_counted(ab: Tunnel) -> None:
    spoofed = [
        ping4("198.19.0.77", "198.19.0.1"),
        ping6("fd00:5ec::77", "fd00:5ec::1"),
        ping4("198.19.0.1", "198.19.0.1"),  # a's own address, from b
    ]
    for packet in spoofed:
        ab.nodes["b"].tun.inject(packet)
    ab.sim.run_for(0.1)
    peer_b = ab.peer("a", "b")
    assert peer_b.counters.drops["source-not-allowed"] == 3
    assert peer_b.counters.rx_packets == 0
    assert ab.nodes["a"].tun.written == []
    ab.round_trip("b", "a")  # and the tunnel still works for honest packets


def test_a_spoke_cannot_speak_for_another_spoke(tmp_path: Path) -> None:
    """The hub routes 198.19.0.3 to s2, so a packet from s1 claiming that source is not
    s1's to send, though s1 itself routes everything through the hub."""
    tunnel = Tunnel(hub_and_spokes(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.nodes["s1"].tun.inject(ping4("198.19.0.3", "198.19.0.1"))
    tunnel.nodes["s1"].tun.inject(ping4("198.19.0.2", "198.19.0.1"))
    tunnel.sim.run_for(0.1)
    assert tunnel.delivered("hub") == [ping4("198.19.0.2", "198.19.0.1")]
    assert tunnel.peer("hub", "s1").counters.drops["source-not-allowed"] == 1


def _lying(packet: bytes, what: str) -> bytes:
    """``packet`` with one header field made inconsistent with its length."""
    data = bytearray(packet)
    if what == "v4-length-long":
        struct.pack_into("!H", data, 2, len(data) + 100)
    elif what == "v4-length-short":
        struct.pack_into("!H", data, 2, len(data) - 4)
    elif what == "v4-ihl-small":
        data[0] = 0x44
    elif what == "v4-ihl-beyond-length":  # a 60-byte header in a 40-byte packet
        data = data[:40]
        data[0] = 0x4F
        struct.pack_into("!H", data, 2, 40)
    elif what == "v6-length-long":
        struct.pack_into("!H", data, 4, len(data) - 40 + 1)
    elif what == "v6-length-zero":
        struct.pack_into("!H", data, 4, 0)
    elif what == "version-5":
        data[0] = 0x55
    elif what == "truncated-v4":
        data = data[:12]
    elif what == "truncated-v6":
        data = data[:30]
    elif what == "empty":
        data = bytearray()
    return bytes(data)


LIES = [
    ("v4-length-long", "inner-bad-length"),
    ("v4-length-short", "inner-bad-length"),
    ("v4-ihl-small", "inner-bad-header-length"),
    ("v4-ihl-beyond-length", "inner-bad-header-length"),
    ("v6-length-long", "inner-bad-length"),
    ("v6-length-zero", "inner-bad-length"),
    ("version-5", "inner-bad-version"),
    ("truncated-v4", "inner-truncated"),
    ("truncated-v6", "inner-truncated"),
    ("empty", "inner-truncated"),
]


@pytest.mark.parametrize("vnet_hdr", [False, True], ids=["plain", "vnet"])
def test_inner_packets_whose_length_fields_lie_are_dropped_per_reason(
    tmp_path: Path, vnet_hdr: bool
) -> None:
    """An authenticated peer (b's session, driven directly: a patched or buggy daemon)
    sends packets whose IP header disagrees with their length. a drops each one before
    the TUN, counts it under its reason, and does not count it as received."""
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=["a"] if vnet_hdr else [])
    tunnel.wait_established(timeout=5)
    b, peer_a = tunnel.devices["b"], tunnel.peer("b", "a")
    good4 = udp4("198.19.0.2", "198.19.0.1", b"x" * 100)
    good6 = udp6("fd00:5ec::2", "fd00:5ec::1", b"y" * 100)
    for what, _ in LIES:
        base = good6 if what.startswith("v6") or what == "truncated-v6" else good4
        lie = _lying(base, what)
        assert tunnel.call("b", lambda now, p=lie: b.send.write(peer_a, DATA_TYPE, p, now))
    tunnel.sim.run_for(0.1)
    peer_b = tunnel.peer("a", "b")
    expected: dict[str, int] = {}
    for _, reason in LIES:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in peer_b.counters.drops.items() if v} == expected
    assert peer_b.counters.rx_packets == 0
    assert peer_b.counters.rx_bytes == 0
    assert tunnel.nodes["a"].tun.written == []
    for packet in (good4, good6):
        tunnel.nodes["b"].tun.inject(packet)
    tunnel.sim.run_for(0.1)
    assert tunnel.delivered("a") == [good4, good6]
    assert peer_b.counters.rx_packets == 2


def test_a_packet_with_trailing_bytes_beyond_its_length_is_not_delivered(ab: Tunnel) -> None:
    """The kernel trims nothing on a TUN write: a packet longer than its header says is
    inconsistent, whichever daemon produced it."""
    packet = ipv4("198.19.0.2", "198.19.0.1", b"z" * 40, proto=17) + b"\0" * 8
    b, peer_a = ab.devices["b"], ab.peer("b", "a")
    ab.call("b", lambda now: b.send.write(peer_a, DATA_TYPE, packet, now))
    ab.sim.run_for(0.1)
    assert ab.peer("a", "b").counters.drops["inner-bad-length"] == 1
    assert ab.nodes["a"].tun.written == []


def test_ipv6_packet_is_routed_by_its_destination(ab: Tunnel) -> None:
    packet = ipv6("fd00:5ec::1", "fd00:5ec::2", b"\0" * 8, proto=59)  # no next header
    ab.nodes["a"].tun.inject(packet)
    ab.sim.run_for(0.05)
    assert ab.delivered("b") == [packet]
