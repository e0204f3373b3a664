"""Netlink against the real kernel in fresh namespaces, checked with ``ip -j``.

``Netlink(netns=...)`` opens its socket inside the namespace (through a short-lived child),
so these tests drive it from the pytest process without ever leaving our own namespace.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from netns_util import call_in, netns, run_in, veth_pair

from secureiod.netlink import Netlink, NetlinkError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

A_ADDR = "198.18.0.1/24"
B_ADDR = "198.18.0.2/24"
V4 = ipaddress.ip_network


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth: ``sio-a`` (198.18.0.1) <-> ``sio-b`` (198.18.0.2)."""
    with netns() as ns_a, netns() as ns_b:
        veth_pair(ns_a, ns_b, A_ADDR, B_ADDR)
        yield ns_a, ns_b


@pytest.fixture
def nl(pair: tuple[str, str]) -> Iterator[Netlink]:
    with Netlink(netns=pair[0]) as connection:
        yield connection


def ip_json(ns: str, *argv: str) -> Any:
    result = run_in(ns, ["ip", "-j", *argv], check=True)
    return json.loads(result.stdout or "[]")


def route_mtus(ns: str, dev: str, family: str = "-4") -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for route in ip_json(ns, family, "route", "show", "dev", dev):
        mtu = None
        for metric in route.get("metrics", []):
            mtu = metric.get("mtu", mtu)
        out[route["dst"]] = mtu
    return out


def test_links(nl: Netlink, pair: tuple[str, str]) -> None:
    ns_a, _ = pair
    assert nl.link_index("lo") == 1
    assert nl.link_index("sio-a") is not None
    assert nl.link_index("sio-b") is None  # it lives in the other namespace
    nl.set_mtu("sio-a", 1400)
    assert nl.get_mtu("sio-a") == 1400
    assert ip_json(ns_a, "link", "show", "sio-a")[0]["mtu"] == 1400
    nl.set_down("sio-a")
    nl.set_down("sio-a")
    assert "UP" not in ip_json(ns_a, "link", "show", "sio-a")[0]["flags"]
    nl.set_up("sio-a")
    nl.set_up("sio-a")
    assert "UP" in ip_json(ns_a, "link", "show", "sio-a")[0]["flags"]
    nl.delete_link("sio-a")
    nl.delete_link("sio-a")  # already gone: fine
    assert nl.link_index("sio-a") is None


def test_addresses_are_idempotent(nl: Netlink, pair: tuple[str, str]) -> None:
    ns_a, _ = pair
    v4 = ipaddress.ip_interface("198.19.0.1/24")
    v6 = ipaddress.ip_interface("fd00:5ec::1/64")
    for _ in range(2):
        nl.add_address("sio-a", v4)
        nl.add_address("sio-a", v6)
    assert A_ADDR in {str(a) for a in nl.addresses("sio-a")}
    assert {v4, v6} <= set(nl.addresses("sio-a"))
    shown = {
        f"{a['local']}/{a['prefixlen']}"
        for link in ip_json(ns_a, "addr", "show", "dev", "sio-a")
        for a in link["addr_info"]
    }
    assert {str(v4), str(v6)} <= shown
    nl.delete_address("sio-a", v4)
    nl.delete_address("sio-a", v4)
    nl.delete_address("sio-gone", v4)
    assert v4 not in nl.addresses("sio-a")


def test_route_mtu_replace_and_delete(nl: Netlink, pair: tuple[str, str]) -> None:
    ns_a, _ = pair
    net = V4("198.19.1.0/24")
    nl.replace_route(net, "sio-a", mtu=1300)
    nl.replace_route(net, "sio-a", mtu=1300)
    assert route_mtus(ns_a, "sio-a")["198.19.1.0/24"] == 1300
    assert (net, 1300) in nl.routes("sio-a")

    nl.replace_route(net, "sio-a", mtu=1350)
    assert route_mtus(ns_a, "sio-a")["198.19.1.0/24"] == 1350
    nl.replace_route(net, "sio-a")
    assert route_mtus(ns_a, "sio-a")["198.19.1.0/24"] is None
    assert (net, None) in nl.routes("sio-a")
    shown = [r for r in ip_json(ns_a, "route", "show", "dev", "sio-a") if r["dst"] == str(net)]
    assert len(shown) == 1
    assert shown[0]["scope"] == "link"

    nl.delete_route(net, "sio-a")
    nl.delete_route(net, "sio-a")  # already gone
    nl.delete_route(net, "sio-gone")  # no such link
    assert "198.19.1.0/24" not in route_mtus(ns_a, "sio-a")
    assert net not in {n for n, _ in nl.routes("sio-a")}


def test_delete_route_removes_foreign_routes_on_that_device_only(
    nl: Netlink, pair: tuple[str, str]
) -> None:
    ns_a, _ = pair
    for argv in (
        ["ip", "route", "add", "198.19.3.0/24", "dev", "sio-a", "proto", "boot"],
        ["ip", "route", "add", "198.19.3.0/24", "dev", "lo", "metric", "5"],
        ["ip", "-6", "route", "add", "fd00:5ec:3::/64", "dev", "sio-a", "metric", "100"],
        ["ip", "-6", "route", "add", "fd00:5ec:3::/64", "dev", "sio-a", "metric", "1024"],
    ):
        run_in(ns_a, argv, check=True)
    nl.delete_route(V4("198.19.3.0/24"), "sio-a")
    nl.delete_route(ipaddress.ip_network("fd00:5ec:3::/64"), "sio-a")
    assert "198.19.3.0/24" not in route_mtus(ns_a, "sio-a")
    assert "fd00:5ec:3::/64" not in route_mtus(ns_a, "sio-a", "-6")
    assert "198.19.3.0/24" in route_mtus(ns_a, "lo")


def test_ipv6_address_and_route(nl: Netlink, pair: tuple[str, str]) -> None:
    ns_a, _ = pair
    nl.add_address("sio-a", ipaddress.ip_interface("fd00:5ec::1/64"))
    net = ipaddress.ip_network("fd00:5ec:1::/64")
    nl.replace_route(net, "sio-a", mtu=1280)
    nl.replace_route(net, "sio-a", mtu=1280)
    mtus = route_mtus(ns_a, "sio-a", "-6")
    assert mtus["fd00:5ec:1::/64"] == 1280
    assert "fd00:5ec::/64" in mtus
    routes = dict(nl.routes("sio-a"))
    assert routes[net] == 1280
    assert routes[ipaddress.ip_network("fd00:5ec::/64")] is None
    assert nl.route_get("fd00:5ec:1::9") == ("sio-a", 1280)
    nl.delete_route(net, "sio-a")
    nl.delete_route(net, "sio-a")
    assert "fd00:5ec:1::/64" not in route_mtus(ns_a, "sio-a", "-6")


def test_route_get_reports_device_and_mtu(nl: Netlink) -> None:
    peer = ipaddress.ip_address("198.18.0.2")
    assert nl.route_get(peer) == ("sio-a", 1500)
    nl.set_mtu("sio-a", 1420)
    assert nl.route_get(peer) == ("sio-a", 1420)
    nl.replace_route(V4("198.19.7.0/24"), "sio-a", mtu=1300)
    assert nl.route_get("198.19.7.9") == ("sio-a", 1300)
    assert nl.route_get("127.0.0.1")[0] == "lo"
    with pytest.raises(NetlinkError, match=r"look up route to 198\.18\.200\.1") as info:
        nl.route_get("198.18.200.1")
    assert info.value.code == errno.ENETUNREACH


def test_errors_are_one_line(nl: Netlink) -> None:
    with pytest.raises(NetlinkError, match="no such link: sio-gone") as info:
        nl.set_mtu("sio-gone", 1400)
    assert info.value.code == errno.ENODEV
    with pytest.raises(NetlinkError) as info:
        nl.set_mtu("sio-a", 10)  # below the IPv4 minimum
    assert str(info.value) == "set MTU 10 on sio-a: Invalid argument"
    assert info.value.code == errno.EINVAL
    for call in (
        lambda: nl.get_mtu("sio-gone"),
        lambda: nl.set_up("sio-gone"),
        lambda: nl.addresses("sio-gone"),
        lambda: nl.routes("sio-gone"),
        lambda: nl.add_address("sio-gone", ipaddress.ip_interface("198.19.0.1/24")),
        lambda: nl.replace_route(V4("198.19.0.0/24"), "sio-gone"),
    ):
        with pytest.raises(NetlinkError) as info:
            call()
        assert "\n" not in str(info.value)
        assert "sio-gone" in str(info.value)


def test_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(NetlinkError, match="open route netlink socket in netns sio-t-missing"):
        Netlink(netns="sio-t-missing")


def test_refuses_to_run_inside_an_event_loop() -> None:
    async def inside() -> str:
        try:
            Netlink()
        except NetlinkError as exc:
            return str(exc)
        return "no error"

    assert "asyncio.to_thread" in asyncio.run(inside())


def _in_child() -> tuple[int | None, int]:
    with Netlink() as nl:
        nl.set_mtu("sio-a", 1380)
        return nl.link_index("sio-a"), nl.get_mtu("sio-a")


def test_current_namespace_in_a_child(pair: tuple[str, str]) -> None:
    """Without ``netns`` it works in whatever namespace the process is in."""
    ns_a, _ = pair
    index, mtu = call_in(ns_a, _in_child)
    assert index is not None
    assert mtu == 1380
    assert ip_json(ns_a, "link", "show", "sio-a")[0]["mtu"] == 1380
