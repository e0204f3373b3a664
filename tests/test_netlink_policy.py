"""The netlink calls behind routes the daemon owns, against the real kernel in fresh
namespaces: exclusive adds that never overwrite, exact deletes and MTU changes by metric,
listing every table, policy rules (``not fwmark``, ``suppress_prefixlength 0``) and
lookups with a mark. Checked with ``ip``, as an administrator would look.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterator

import pytest
from netns_util import netns, run_in, veth_pair

from secureiod import netlink as netlink_module
from secureiod.netlink import RT_TABLE_MAIN, Netlink, NetlinkError, RouteInfo, Rule

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NET = ipaddress.ip_network
T = 51820


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as a, netns() as b:
        veth_pair(a, b, "198.18.0.1/24", "198.18.0.2/24")
        run_in(a, ["ip", "addr", "add", "fd00:5ec:ff::1/64", "dev", "sio-a", "nodad"], check=True)
        run_in(a, ["ip", "route", "add", "default", "via", "198.18.0.2"], check=True)
        yield a


@pytest.fixture
def nl(ns: str) -> Iterator[Netlink]:
    with Netlink(netns=ns) as connection:
        yield connection


def ip(ns: str, *argv: str) -> str:
    return run_in(ns, ["ip", *argv], check=True).stdout


def test_add_route_never_overwrites(nl: Netlink, ns: str) -> None:
    lan = NET("198.18.0.0/24")
    with pytest.raises(NetlinkError) as info:
        nl.add_route(lan, "lo")  # the connected route of sio-a has that key
    assert info.value.code == errno.EEXIST
    assert str(info.value) == "add route 198.18.0.0/24 dev lo metric 0: File exists"
    assert "198.18.0.0/24 dev sio-a proto kernel scope link src 198.18.0.1" in ip(ns, "route")
    nl.add_route(lan, "lo", metric=1)  # behind it
    shown = ip(ns, "route", "show", "198.18.0.0/24")
    assert shown.splitlines() == [
        "198.18.0.0/24 dev sio-a proto kernel scope link src 198.18.0.1 ",
        "198.18.0.0/24 dev lo proto static scope link metric 1 ",
    ]
    nl.replace_route(lan, "lo", 1300, metric=1)  # the MTU of exactly that one
    assert "198.18.0.0/24 dev lo proto static scope link metric 1 mtu 1300" in ip(ns, "route")
    nl.delete_route(lan, "lo", metric=1)
    nl.delete_route(lan, "lo", metric=1)  # gone already: fine
    assert ip(ns, "route", "show", "198.18.0.0/24").splitlines() == [
        "198.18.0.0/24 dev sio-a proto kernel scope link src 198.18.0.1 "
    ]


def test_routes_in_their_own_table_and_listing(nl: Netlink, ns: str) -> None:
    nl.add_route(NET("0.0.0.0/0"), "sio-a", table=T)
    nl.add_route(NET("::/0"), "sio-a", table=T)
    with pytest.raises(NetlinkError, match="File exists"):
        nl.add_route(NET("::/0"), "sio-a", table=T)
    assert (
        ip(ns, "route", "show", "table", str(T)) == "default dev sio-a proto static scope link \n"
    )
    assert "default dev sio-a proto static metric 1024 pref medium" in ip(
        ns, "-6", "route", "show", "table", str(T)
    )
    listed = nl.list_routes(table=T)
    assert listed == [
        RouteInfo(NET("0.0.0.0/0"), T, 0, "sio-a", None, "unicast", 4, 253, None),
        RouteInfo(NET("::/0"), T, 1024, "sio-a", None, "unicast", 4, 0, None),
    ]
    main = nl.list_routes(4, RT_TABLE_MAIN)
    default = next(r for r in main if r.dst.prefixlen == 0)
    assert default.gateway == ipaddress.ip_address("198.18.0.2") and default.dev == "sio-a"
    assert default.describe() == "default via 198.18.0.2 dev sio-a proto boot"
    connected = next(r for r in main if r.dst == NET("198.18.0.0/24"))
    assert connected.connected
    assert connected.describe() == "198.18.0.0/24 dev sio-a proto kernel scope link"
    assert {r.table for r in nl.list_routes()} >= {RT_TABLE_MAIN, 255, T}
    nl.delete_route(NET("0.0.0.0/0"), "sio-a", table=T, metric=0)
    nl.delete_route(NET("::/0"), "sio-a", table=T, metric=1024)
    assert nl.list_routes(table=T) == []


def test_policy_rules_round_trip_and_steer_lookups(nl: Netlink, ns: str) -> None:
    nl.add_route(NET("0.0.0.0/0"), "lo", table=T)
    suppress = Rule(4, 32764, RT_TABLE_MAIN, suppress_prefixlength=0)
    mark = Rule(4, 32765, T, fwmark=T, fwmask=0xFFFFFFFF, invert=True)
    for rule in (suppress, mark):
        nl.add_rule(rule)
    with pytest.raises(NetlinkError) as info:
        nl.add_rule(mark)
    assert info.value.code == errno.EEXIST
    assert ip(ns, "rule").splitlines() == [
        "0:\tfrom all lookup local",
        "32764:\tfrom all lookup main suppress_prefixlength 0",
        "32765:\tnot from all fwmark 0xca6c lookup 51820",
        "32766:\tfrom all lookup main",
        "32767:\tfrom all lookup default",
    ]
    listed = nl.rules(4)
    assert suppress in listed and mark in listed
    assert [r.describe() for r in listed][1:3] == [
        "32764: from all lookup main suppress_prefixlength 0",
        "32765: not from all fwmark 0xca6c lookup 51820",
    ]
    # unmarked traffic takes the table's default; marked traffic the main one; the
    # connected prefix wins over both
    assert nl.route_get("198.18.7.7") == ("lo", 65536)
    assert nl.route_get("198.18.7.7", mark=T)[0] == "sio-a"
    assert nl.route_get("198.18.0.9")[0] == "sio-a"
    for rule in (mark, suppress):
        nl.delete_rule(rule)
        nl.delete_rule(rule)  # gone already: fine
    assert "51820" not in ip(ns, "rule") and "suppress" not in ip(ns, "rule")
    v6 = Rule(6, 32765, T, fwmark=T, fwmask=0xFFFFFFFF, invert=True)
    nl.add_rule(v6)
    assert "32765:\tnot from all fwmark 0xca6c lookup 51820" in ip(ns, "-6", "rule")
    assert v6 in nl.rules(6)
    nl.delete_rule(v6)
    assert "51820" not in ip(ns, "-6", "rule")


def test_create_address_says_whether_it_added(nl: Netlink) -> None:
    address = ipaddress.ip_interface("198.19.0.1/24")
    assert nl.create_address("sio-a", address) is True
    assert nl.create_address("sio-a", address) is False
    assert nl.create_address("sio-a", ipaddress.ip_interface("198.18.0.1/24")) is False


def _make_link(ns: str, name: str) -> None:
    """A link that is up with a carrier (one end of a veth pair in ``ns``; no dummy module
    here): the kernel refuses a route on a link that is down."""
    run_in(ns, ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    for link in (name, name + "p"):
        run_in(ns, ["ip", "link", "set", link, "up"], check=True)


def test_add_route_looks_a_device_up_again_when_it_came_back(
    nl: Netlink, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``add_route`` reuses the ifindex it looked up for a second; a device deleted and
    made again under the same name in that second gets a new index, which the kernel's
    ENODEV makes it look up: the route lands on the new device, not an error. (The memo is
    stretched to a minute so a slow box still takes the retry, not a fresh lookup.)"""
    monkeypatch.setattr(netlink_module, "LINK_INDEX_MEMO_SECONDS", 60.0)
    _make_link(ns, "sio-d")
    old = nl.link_index("sio-d")
    nl.add_route(NET("198.19.40.0/24"), "sio-d")
    run_in(ns, ["ip", "link", "del", "sio-d"], check=True)
    _make_link(ns, "sio-d")
    assert nl.link_index("sio-d") != old
    nl.add_route(NET("198.19.41.0/24"), "sio-d")  # within the memo's second
    assert "198.19.41.0/24 dev sio-d" in ip(ns, "route", "show", "198.19.41.0/24")
    run_in(ns, ["ip", "link", "del", "sio-d"], check=True)
    with pytest.raises(NetlinkError) as info:  # gone for good: one clear error
        nl.add_route(NET("198.19.42.0/24"), "sio-d")
    assert info.value.code == errno.ENODEV


def test_add_route_reuses_the_lookup_for_many_routes(nl: Netlink, ns: str) -> None:
    """A start adds a route per peer to one device: one lookup, not one per route."""
    lookups = 0
    real = nl._fast.link_index

    def counted(name: str) -> int | None:
        nonlocal lookups
        lookups += 1
        return real(name)

    nl._fast.link_index = counted  # type: ignore[method-assign]
    for i in range(50):
        nl.add_route(NET(f"198.19.50.{i}/32"), "sio-a")
    assert lookups == 1
    assert ip(ns, "route", "show", "198.19.50.49/32").startswith("198.19.50.49 dev sio-a")
