"""Longest-prefix routing of inner packets to peers (cryptokey routing)."""

from __future__ import annotations

import ipaddress
import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from secureiod.daemon.allowed_ips import MEMO_LIMIT, AllowedIPs


def v4_packet(src: str, dst: str) -> bytes:
    return (
        bytes([0x45, 0])
        + struct.pack(">H", 20)
        + bytes(8)
        + ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
    )


def v6_packet(src: str, dst: str) -> bytes:
    return (
        bytes([0x60, 0, 0, 0, 0, 0, 59, 64])
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
    )


def test_longest_prefix_wins() -> None:
    r: AllowedIPs[str] = AllowedIPs()
    r.insert(ipaddress.ip_network("198.19.0.0/16"), "hub")
    r.insert(ipaddress.ip_network("198.19.5.0/24"), "b")
    r.insert(ipaddress.ip_network("198.19.5.7/32"), "c")
    r.insert(ipaddress.ip_network("fd00:5ec::/48"), "hub")
    r.insert(ipaddress.ip_network("fd00:5ec:0:5::/64"), "b")
    assert r.lookup_destination(v4_packet("1.1.1.1", "198.19.5.7")) == "c"
    assert r.lookup_destination(v4_packet("1.1.1.1", "198.19.5.8")) == "b"
    assert r.lookup_destination(v4_packet("1.1.1.1", "198.19.6.1")) == "hub"
    assert r.lookup_destination(v4_packet("1.1.1.1", "198.18.0.1")) is None
    assert r.lookup_source(v4_packet("198.19.5.7", "1.1.1.1")) == "c"
    assert r.lookup_destination(v6_packet("::1", "fd00:5ec:0:5::9")) == "b"
    assert r.lookup_destination(v6_packet("::1", "fd00:5ec:0:6::9")) == "hub"
    assert r.lookup_source(v6_packet("fd00:5ec:0:5::1", "::1")) == "b"
    assert r.lookup_destination(b"\x45" + bytes(10)) is None  # truncated
    assert r.lookup_destination(b"") is None
    assert r.lookup_destination(b"\x10" * 60) is None  # not IP


def test_default_routes_and_removal() -> None:
    r: AllowedIPs[str] = AllowedIPs()
    r.insert(ipaddress.ip_network("0.0.0.0/0"), "default")
    r.insert(ipaddress.ip_network("::/0"), "default6")
    r.insert(ipaddress.ip_network("198.19.0.2/32"), "b")
    assert r.lookup(ipaddress.ip_address("8.8.8.8")) == "default"
    assert r.lookup(ipaddress.ip_address("2001:db8::1")) == "default6"
    assert r.lookup(ipaddress.ip_address("198.19.0.2")) == "b"
    r.remove_value("b")
    assert r.lookup(ipaddress.ip_address("198.19.0.2")) == "default"
    r.remove_value("default")
    assert r.lookup(ipaddress.ip_address("198.19.0.2")) is None
    assert r.entries() == {ipaddress.ip_network("::/0"): "default6"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=1, max_size=30),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=30),
)
def test_matches_brute_force(prefixes: list[tuple[int, int]], probes: list[int]) -> None:
    r: AllowedIPs[int] = AllowedIPs()
    nets = {}
    for i, (addr, plen) in enumerate(prefixes):
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        nets[net] = i
        r.insert(net, i)
    for probe in probes + [int(n.network_address) for n in nets]:
        ip = ipaddress.IPv4Address(probe)
        matching = [n for n in nets if ip in n]
        expected = nets[max(matching, key=lambda n: n.prefixlen)] if matching else None
        assert r.lookup(ip) == expected


def test_lookup_is_cheap_enough_for_the_hot_path() -> None:
    """Not a timing test: checks that the number of tables probed stays per prefix length."""
    r: AllowedIPs[int] = AllowedIPs()
    rng = random.Random(1)
    for i in range(1000):
        r.insert(ipaddress.IPv4Network((rng.getrandbits(32), 32), strict=False), i)
    assert len(r._v4._levels) == 1


def test_remembered_answers_follow_every_change() -> None:
    """An address's owner is remembered (``MEMO_LIMIT``) until the table changes: a more
    specific route, a removal, a route for an address remembered as unrouted."""
    r: AllowedIPs[str] = AllowedIPs()
    r.insert(ipaddress.ip_network("198.19.0.0/16"), "hub")
    to_7 = v4_packet("1.1.1.1", "198.19.5.7")
    from_7 = v4_packet("198.19.5.7", "1.1.1.1")
    unrouted = v4_packet("1.1.1.1", "198.18.0.9")
    assert r.lookup_destination(to_7) == "hub"
    assert r.lookup_destination(to_7) == "hub"  # from the memo
    assert r.lookup_source(from_7) == "hub"
    assert r.lookup_destination(unrouted) is None
    assert r.lookup_destination(unrouted) is None
    r.insert(ipaddress.ip_network("198.19.5.7/32"), "c")
    assert r.lookup_destination(to_7) == "c"
    assert r.lookup_source(from_7) == "c"
    r.insert(ipaddress.ip_network("198.18.0.0/15"), "underlay")
    assert r.lookup_destination(unrouted) == "underlay"
    r.remove_value("c")
    assert r.lookup_destination(to_7) == "hub"
    assert r.lookup_source(from_7) == "hub"
    r.remove_value("hub")
    assert r.lookup_destination(to_7) == "underlay"  # 198.18.0.0/15 holds 198.19.5.7
    # a packet in a memoryview, of bytes or of a bytearray, and a header before it
    assert r.lookup_destination(memoryview(unrouted)) == "underlay"
    assert r.lookup_destination(memoryview(bytearray(unrouted))) == "underlay"
    assert r.lookup_destination(bytes(10) + unrouted, 10) == "underlay"


def test_the_memo_is_bounded() -> None:
    """The addresses are the network's to choose (a peer's inner sources): however many
    there are, the memo stays under ``MEMO_LIMIT`` and the answers stay right."""
    r: AllowedIPs[str] = AllowedIPs()
    r.insert(ipaddress.ip_network("198.19.0.0/16"), "hub")
    r.insert(ipaddress.ip_network("fd00:5ec::/48"), "hub6")
    for i in range(MEMO_LIMIT + 500):
        src = str(ipaddress.IPv4Address(0xC6130000 + i))  # 198.19.x.y
        assert r.lookup_source(v4_packet(src, "1.1.1.1")) == "hub"
        assert len(r._memo) <= MEMO_LIMIT
    assert r.lookup_source(v6_packet("fd00:5ec::1", "::1")) == "hub6"
    assert r.lookup_source(v6_packet("fd00:5ed::1", "::1")) is None


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "remove", "look"]),
            st.integers(0, 2**32 - 1),
            st.integers(0, 32),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_memo_matches_brute_force_through_changes(ops: list[tuple[str, int, int, int]]) -> None:
    """Inserts, removals and packet lookups interleaved: every lookup, memo or not, gives
    the longest-prefix owner of the table as it is then."""
    r: AllowedIPs[int] = AllowedIPs()
    nets: dict[ipaddress.IPv4Network, int] = {}
    probes: list[int] = []
    for op, addr, plen, owner in ops:
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        if op == "insert":  # a network already there changes owner
            nets[net] = owner
            r.insert(net, owner)
        elif op == "remove":
            r.remove_value(owner)
            nets = {n: v for n, v in nets.items() if v != owner}
        probes.append(addr)
        for probe in probes[-8:]:
            ip = ipaddress.IPv4Address(probe)
            matching = [n for n in nets if ip in n]
            expected = nets[max(matching, key=lambda n: n.prefixlen)] if matching else None
            assert r.lookup_destination(v4_packet("1.1.1.1", str(ip))) == expected
            assert r.lookup_source(v4_packet(str(ip), "1.1.1.1")) == expected
