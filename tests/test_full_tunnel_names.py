"""Peer endpoints given as DNS names under a full tunnel (issue 11), in memory.

The start looks every name up before it installs anything that could capture the lookup
(a killed instance's leftover rules are removed first), and the device starts with those
answers; a name that failed then is retried with the backoff. Later lookups choose the
marked stub resolver exactly while a full tunnel could capture ``getaddrinfo``'s queries.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import ConfigBuilder, FakeNetlink, Tunnel, sockaddr, two_sites

from secureiod.cli.daemon import StartLookup, lookups_captured, prepare_host
from secureiod.daemon.ledger import Ledger, LedgerFile, record_path
from secureiod.daemon.owned import OwnedNetlink
from secureiod.daemon.policy import MODE_AUTO, MODE_OFF, MODE_TABLE, RoutingPlan
from secureiod.dnsquery import StubLookup, UnderlayLookup, name_warnings
from secureiod.netlink import RouteInfo

FULL = ["0.0.0.0/0", "::/0"]
T = 51820
B_UNDERLAY = ("198.18.0.2", 5800)


def _named(tmp_path: Path, allowed: list[str] | None = None) -> ConfigBuilder:
    """a knows b (its exit) only as b.test:5800; b waits to be contacted."""
    builder = two_sites(tmp_path, b_knows_a=False, allowed_b=allowed or FULL)
    builder.nodes["a"].peers["b"]["endpoint"] = "b.test:5800"
    builder.nodes["a"].interface["control_socket"] = str(tmp_path / "run" / "a.sock")
    (tmp_path / "run").mkdir()
    return builder


def _policy_rules(netlink: FakeNetlink) -> list[Any]:
    return [r for r in netlink.rule_list if r.table == T or r.suppress_prefixlength == 0]


# --- the device starts with what the start looked up ------------------------------------------


def test_a_name_resolved_before_start_is_used_at_once(tmp_path: Path) -> None:
    tunnel = Tunnel(_named(tmp_path), start=["b"])
    resolver = tunnel.nodes["a"].resolver
    netlink = tunnel.nodes["a"].netlink
    assert _policy_rules(netlink) == []
    tunnel.start("a", resolved={("b.test", 5800): [sockaddr(*B_UNDERLAY)]})
    assert len(_policy_rules(netlink)) == 4  # the full tunnel's rules, after the answer
    took = tunnel.wait_established(timeout=5)
    assert took < 0.5
    assert resolver.lookups == []  # the start's answer was used, not asked again
    assert tunnel.peer("a", "b").endpoint == B_UNDERLAY
    info = tunnel.peer("a", "b").describe(tunnel.sim.now)
    assert info["resolve"]["addresses"] == ["198.18.0.2:5800"]
    tunnel.round_trip("a", "b")
    tunnel.sim.run_for(60)
    assert resolver.lookups == []  # established: no re-resolution


def test_a_name_that_failed_at_start_is_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tunnel = Tunnel(_named(tmp_path), start=["b"])
    resolver = tunnel.nodes["a"].resolver
    resolver.names["b.test"] = ["198.18.0.2"]
    start = tunnel.sim.now
    error = "cannot resolve 'b.test': no answer within 5s"
    tunnel.start("a", resolved={("b.test", 5800): error})
    lines = [r.getMessage() for r in caplog.records if "at start" in r.getMessage()]
    assert lines == [
        f"peer b: cannot resolve endpoint b.test:5800 at start: {error} (retrying in 1 s)"
    ]
    tunnel.wait_established([("a", "b")], timeout=3)
    # the first retry is the backoff's first delay after the start, not at once
    assert resolver.lookups_of("b.test")[0] - start == pytest.approx(1.0, abs=0.01)
    assert tunnel.peer("a", "b").endpoint == B_UNDERLAY


# --- the start: leftovers out, then the lookups, then nothing installed yet --------------------


def _killed_full_tunnel(tmp_path: Path, builder: ConfigBuilder, netlink: FakeNetlink) -> None:
    """What a ``kill -9``-ed instance with a full tunnel left: its rules and routes, and
    its record of them."""
    config = builder.load("a")
    store, _ = LedgerFile.open(record_path(config.interface.control_socket, "sio0"))
    owned = OwnedNetlink(netlink, "sio0", config.interface)
    owned.attach(ledger=Ledger(store))
    for pc in config.peers:
        for net in pc.allowed_ips:
            owned.install(net, pc.name)
    assert len(_policy_rules(netlink)) == 4
    os.close(store._fd)  # type: ignore[arg-type]  # kill -9
    store._fd = None


def test_the_start_looks_names_up_after_leftovers_go_and_before_anything_is_added(
    tmp_path: Path,
) -> None:
    builder = _named(tmp_path)
    netlink = FakeNetlink()
    initial = netlink.snapshot()
    _killed_full_tunnel(tmp_path, builder, netlink)
    seen: list[tuple[Any, ...]] = []

    def getaddrinfo(host: str, port: int, *args: Any) -> list[tuple]:
        seen.append((host, netlink.snapshot()))
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("198.18.0.2", port))]

    ledger, plan, resolved = prepare_host(
        builder.load("a"), netlink, socket.AF_INET, StartLookup(getaddrinfo=getaddrinfo)
    )
    try:
        # asked once, when the host was as before the killed instance: no rule of ours
        assert seen == [("b.test", initial)]
        assert resolved == {("b.test", 5800): [B_UNDERLAY]}
        assert netlink.snapshot() == initial  # and still nothing is installed
        assert plan.mode == MODE_AUTO and plan.table == T
    finally:
        ledger.close()


def test_the_start_waits_for_names_within_its_budget(tmp_path: Path) -> None:
    builder = _named(tmp_path)
    builder.nodes["a"].peers["b"]["endpoint"] = "b.test:5800"
    other = builder.add("c")
    builder.connect(builder.nodes["a"], other, allowed_b=["198.19.5.0/24"])
    builder.nodes["a"].peers["c"]["endpoint"] = "c.test:5800"
    release = threading.Event()

    def getaddrinfo(host: str, port: int, *args: Any) -> list[tuple]:
        if host == "b.test":
            release.wait(10)  # a black-holed DNS server
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("198.18.0.3", port))]

    begun = time.monotonic()
    try:
        ledger, _plan, resolved = prepare_host(
            builder.load("a"), FakeNetlink(), socket.AF_INET, StartLookup(0.5, getaddrinfo)
        )
        ledger.close()
    finally:
        release.set()
    assert time.monotonic() - begun < 2.0
    assert resolved[("c.test", 5800)] == [("198.18.0.3", 5800)]
    assert resolved[("b.test", 5800)] == "cannot resolve 'b.test': no answer within 0.5s"


def test_a_config_without_names_looks_nothing_up(tmp_path: Path) -> None:
    builder = two_sites(tmp_path, allowed_b=FULL)
    builder.nodes["a"].interface["control_socket"] = str(tmp_path / "a.sock")

    def getaddrinfo(*args: Any) -> list[tuple]:
        raise AssertionError("no lookup expected")

    ledger, _plan, resolved = prepare_host(
        builder.load("a"), FakeNetlink(), socket.AF_INET, StartLookup(getaddrinfo=getaddrinfo)
    )
    ledger.close()
    assert resolved == {}


# --- later lookups: marked while a full tunnel could capture them ------------------------------


def test_later_lookups_are_marked_exactly_while_a_tunnel_could_capture_them(
    tmp_path: Path,
) -> None:
    full = Tunnel(_named(tmp_path / "full"), start=["a"]).devices["a"]
    site = Tunnel(_named(tmp_path / "site", ["198.19.5.0/24"]), start=["a"]).devices["a"]
    auto = RoutingPlan(MODE_AUTO, T, T)
    assert lookups_captured(auto, full)
    assert not lookups_captured(auto, site)  # a site-to-site tunnel captures no DNS server
    assert not lookups_captured(auto, None)
    assert lookups_captured(RoutingPlan(MODE_TABLE, 100, 7), site)  # the admin's rules use the mark
    assert not lookups_captured(RoutingPlan(MODE_TABLE, 100, None), full)
    assert not lookups_captured(RoutingPlan(MODE_OFF, 254, None), full)

    calls: list[str] = []
    stub = StubLookup(mark=None, resolv_conf=tmp_path / "none", hosts=tmp_path / "none")
    captured = [False]
    lookup = UnderlayLookup(
        stub, lambda: captured[0], getaddrinfo=lambda *a: calls.append("getaddrinfo") or []
    )
    lookup("b.test", 5800, socket.AF_INET, socket.SOCK_DGRAM, 0, 0)
    assert calls == ["getaddrinfo"]
    captured[0] = True
    with pytest.raises(socket.gaierror, match="no nameserver"):
        lookup("b.test", 5800, socket.AF_INET, socket.SOCK_DGRAM, 0, 0)
    assert calls == ["getaddrinfo"]


def test_check_warns_only_when_every_nameserver_is_inside_the_tunnel(tmp_path: Path) -> None:
    builder = _named(tmp_path, [*FULL, "198.19.5.0/24"])
    config = builder.load("a")
    for inside in (["198.19.5.1"], ["198.19.0.2"], ["198.19.0.53", "198.19.5.9"]):
        (text,) = name_warnings(config, inside)
        assert text.startswith('peer "b" (b.test:5800): the endpoint is a DNS name')
        assert "add a nameserver outside the tunnel" in text
    # the host's own more specific route keeps a nameserver out of the tunnel
    lan = RouteInfo(ipaddress.ip_network("198.19.5.0/25"), dev="eth0")
    assert name_warnings(config, ["198.19.5.1"], [lan]) == []
    assert name_warnings(config, ["198.19.5.129"], [lan]) != []
    # one nameserver the marked query can reach past the tunnel is enough
    assert name_warnings(config, ["198.19.5.1", "198.18.1.1"]) == []
    assert name_warnings(config, []) == []
    literal = _named(tmp_path / "literal")
    literal.nodes["a"].peers["b"]["endpoint"] = "198.18.0.2:5800"
    assert name_warnings(literal.load("a"), ["198.19.0.2"]) == []
    site = _named(tmp_path / "site", ["198.19.0.0/16"])  # no full tunnel: getaddrinfo as ever
    assert name_warnings(site.load("a"), ["198.19.0.2"]) == []
