"""The hand-encoded route requests (``route_socket``) make exactly the routes pyroute2
made before them, in a fresh namespace, checked with ``ip -j -d``."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from netns_util import netns, run_in, veth_pair
from pyroute2 import IPRoute

from secureiod.netlink import Netlink, NetlinkError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

TABLE = 51820


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as a, netns() as b:
        veth_pair(a, b, "198.18.0.1/24", "198.18.0.2/24")
        yield a


def routes(ns: str) -> dict[str, dict[str, Any]]:
    out = {}
    for family in ("-4", "-6"):
        result = run_in(ns, ["ip", "-j", "-d", family, "route", "show", "table", "all"], check=True)
        for r in json.loads(result.stdout or "[]"):
            if r.get("dev") == "sio-a" and r.get("protocol") != "kernel":
                out[r["dst"]] = r
    return out


def test_routes_match_the_ones_pyroute2_made(ns: str) -> None:
    with Netlink(netns=ns) as nl:
        index = nl.link_index("sio-a")
        assert index is not None
        old = IPRoute(netns=ns, flags=0)
        try:  # the calls netlink.py made before, for the reference routes
            old.route("add", oif=index, dst="198.19.1.1", dst_len=32, family=2, table=TABLE,
                      priority=0, scope=253, metrics={"mtu": 1400})  # fmt: skip
            old.route("add", oif=index, dst="fd00:5ec::1", dst_len=128, family=10, table=TABLE,
                      priority=1024, metrics={"mtu": 1400})  # fmt: skip
            old.route("add", oif=index, dst="198.19.3.0", dst_len=24, family=2, priority=0,
                      scope=253)  # fmt: skip
        finally:
            old.close()
        nl.add_route(ipaddress.ip_network("198.19.1.2/32"), "sio-a", table=TABLE, mtu=1400)
        nl.add_route(ipaddress.ip_network("fd00:5ec::2/128"), "sio-a", table=TABLE, mtu=1400)
        nl.add_route(ipaddress.ip_network("198.19.4.0/24"), "sio-a")
        got = routes(ns)
        for mine, theirs in (
            ("198.19.1.2", "198.19.1.1"),
            ("fd00:5ec::2", "fd00:5ec::1"),
            ("198.19.4.0/24", "198.19.3.0/24"),
        ):
            a, b = dict(got[mine]), dict(got[theirs])
            a.pop("dst"), b.pop("dst")
            assert a == b, (mine, a, b)

        with pytest.raises(NetlinkError) as info:  # never overwrites
            nl.add_route(ipaddress.ip_network("198.19.1.1/32"), "sio-a", table=TABLE)
        assert info.value.code == errno.EEXIST
        with pytest.raises(NetlinkError, match="no such link: sio-gone"):
            nl.add_route(ipaddress.ip_network("198.19.9.9/32"), "sio-gone")

        # delete: by metric (ours), and without one (any metric, scope, protocol)
        nl.delete_route(ipaddress.ip_network("198.19.1.2/32"), "sio-a", table=TABLE, metric=0)
        nl.delete_route(ipaddress.ip_network("198.19.1.1/32"), "sio-a", table=TABLE)
        nl.delete_route(ipaddress.ip_network("fd00:5ec::1/128"), "sio-a", table=TABLE)
        nl.delete_route(ipaddress.ip_network("198.19.1.1/32"), "sio-a", table=TABLE)  # gone: ok
        assert set(routes(ns)) == {"fd00:5ec::2", "198.19.3.0/24", "198.19.4.0/24"}


def test_link_index_of_names_no_link_can_have(ns: str) -> None:
    with Netlink(netns=ns) as nl:
        assert nl.link_index("lo") == 1
        for name in ("", "x" * 16, "a\0b", "sio-b"):
            assert nl.link_index(name) is None
