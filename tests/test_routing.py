"""Routing the daemon owns, in memory (issue 11): nested allowed-ips across peers, where
routes go (main table, a full tunnel's own table behind policy rules, nowhere), routes the
host already has, giving back exactly what was added (also after a kill), the routing
config keys, ``--check``'s capture warnings, and DNS through resolvectl.

Whole ``Device``s run over ``tests/fakes``; ``FakeNetlink`` models tables, metrics and
rules, records any host route the daemon would overwrite or delete (``clobbered``), and
evaluates rules with marks in ``route_get``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fakes import ConfigBuilder, FakeNetlink, Tunnel, ping4, ping6, two_sites

from secureiod.config import Config, ConfigError, check_config, load_config
from secureiod.daemon.allowed_ips import AllowedIPs
from secureiod.daemon.capture import capture_warnings
from secureiod.daemon.dns import Resolvectl, split_entries
from secureiod.daemon.ledger import (
    Ledger,
    LedgerError,
    LedgerFile,
    OwnedAddress,
    OwnedDns,
    OwnedRoute,
    OwnedRule,
    record_path,
)
from secureiod.daemon.owned import OwnedNetlink, undo_leftovers
from secureiod.daemon.policy import (
    MODE_AUTO,
    MODE_OFF,
    MODE_TABLE,
    RoutingPlan,
    decide_plan,
    free_table,
    policy_rules,
    strict_rp_filter,
)
from secureiod.netlink import RT_TABLE_MAIN, RouteInfo, Rule

NET = ipaddress.ip_network
IP = ipaddress.ip_address
T = 51820
FULL = ["0.0.0.0/0", "::/0"]
EXAMPLES = Path(__file__).resolve().parent.parent / "config"
README = Path(__file__).resolve().parent.parent / "README.md"


# --- cryptokey routing with nested prefixes ----------------------------------------------------


def test_longest_prefix_wins_across_peers_both_ways() -> None:
    router: AllowedIPs[str] = AllowedIPs()
    router.insert_all([NET("0.0.0.0/0"), NET("::/0")], "exit")
    router.insert_all([NET("198.19.5.0/24"), NET("fd00:5ec:5::/64")], "site")
    router.insert(NET("198.19.5.7/32"), "host")
    assert router.lookup(IP("198.19.5.9")) == "site"
    assert router.lookup(IP("198.19.5.7")) == "host"
    assert router.lookup(IP("198.19.200.1")) == "exit"
    assert router.lookup(IP("fd00:5ec:5::9")) == "site"
    assert router.lookup(IP("2001:db8::1")) == "exit"
    # the inner-source check follows the same table
    assert router.lookup_source(ping4("198.19.5.9", "198.19.0.1")) == "site"
    assert router.lookup_source(ping6("fd00:5ec:5::9", "fd00:5ec::1")) == "site"
    assert router.lookup_source(ping4("198.19.200.1", "198.19.0.1")) == "exit"
    router.remove_value("site")
    assert router.lookup(IP("198.19.5.9")) == "exit"
    assert router.lookup(IP("198.19.5.7")) == "host"


def _exit_and_site(tmp_path: Path, **interface: Any) -> tuple[ConfigBuilder, Tunnel]:
    """a with an exit peer b (everything) and a site peer c (198.19.5.0/24)."""
    builder = ConfigBuilder(tmp_path)
    a = builder.add("a", **interface)
    b, c = builder.add("b"), builder.add("c")
    builder.connect(a, b, allowed_b=FULL)
    builder.connect(a, c, allowed_b=["198.19.0.3/32", "198.19.5.0/24", "fd00:5ec:5::/64"])
    return builder, Tunnel(builder)


def test_exit_peer_beside_a_site_peer_carries_and_checks_by_longest_prefix(
    tmp_path: Path,
) -> None:
    _, tunnel = _exit_and_site(tmp_path)
    tunnel.wait_established(timeout=5)
    a = tunnel.nodes["a"].tun
    for packet, to in (
        (ping4("198.19.0.1", "198.19.5.9"), "c"),
        (ping6("fd00:5ec::1", "fd00:5ec:5::9"), "c"),
        (ping4("198.19.0.1", "198.19.200.1"), "b"),
        (ping6("fd00:5ec::1", "2001:db8::1"), "b"),
    ):
        a.inject(packet)
        tunnel.sim.run_for(0.05)
        assert tunnel.delivered(to) == [packet]
    # from b (the exit) a source inside c's prefix is not b's to send; from c it is
    from_site = ping4("198.19.5.9", "198.19.0.1", 1)
    from_exit = ping4("198.19.200.1", "198.19.0.1", 2)
    tunnel.nodes["b"].tun.inject(ping4("198.19.5.9", "198.19.0.1", 3))
    tunnel.nodes["c"].tun.inject(from_site)
    tunnel.nodes["b"].tun.inject(from_exit)
    tunnel.sim.run_for(0.05)
    assert sorted(tunnel.delivered("a")) == sorted([from_site, from_exit])
    assert tunnel.peer("a", "b").counters.drops["source-not-allowed"] == 1
    assert tunnel.peer("a", "c").counters.drops["source-not-allowed"] == 0
    assert tunnel.peer("a", "c").counters.rx_packets == 1


# --- where routes go ------------------------------------------------------------------------


def _host(netlink: FakeNetlink) -> None:
    """A host at home: LAN 198.18.1.0/24 on eth0, default routes via the router."""
    netlink.add_host_route("198.18.1.0/24", dev="eth0", proto=2, scope=253)
    netlink.add_host_route("default", dev="eth0", gateway="198.18.1.1")
    netlink.add_host_route("default", version=6, dev="eth0", gateway="fd00:5ec:ff::1")


def test_full_tunnel_default_routes_go_into_their_own_table_behind_rules(
    tmp_path: Path,
) -> None:
    builder = two_sites(tmp_path, allowed_b=FULL)
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    _host(netlink)
    initial = netlink.snapshot()
    tunnel.start("b")
    device = tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert device.routes.netlink.routing_plan() == RoutingPlan(MODE_AUTO, T, T)
    assert set(netlink.tables[T]) == {NET("0.0.0.0/0"), NET("::/0")}
    assert NET("0.0.0.0/0") not in netlink.routes and NET("::/0") not in netlink.routes
    for version in (4, 6):
        ours = [r for r in netlink.rules(version) if r.priority in (32764, 32765)]
        assert ours == [
            Rule(version, 32764, RT_TABLE_MAIN, suppress_prefixlength=0),
            Rule(version, 32765, T, fwmark=T, fwmask=0xFFFFFFFF, invert=True),
        ]
    assert netlink.clobbered == []
    # unmarked traffic enters the tunnel; the daemon's marked datagrams keep the host's way;
    # the LAN stays on the LAN
    # (lookups only, nothing is sent: outside the fake's underlay, 198.18.0.0/15)
    assert netlink.route_get("192.0.2.1")[0] == "sio0"
    assert netlink.route_get("fd00:5ec:c8::1")[0] == "sio0"
    assert netlink.route_get("192.0.2.1", mark=T)[0] == "eth0"
    assert netlink.route_get("fd00:5ec:c8::1", mark=T)[0] == "eth0"
    assert netlink.route_get("198.18.1.9")[0] == "eth0"
    assert netlink.route_get("fd00:5ec:ff::9", mark=T)[0] == "eth0"
    # the route MTU the negotiation found lands on the daemon's own route, in its table
    size = tunnel.peer("a", "b").route_mtu
    assert size is not None and netlink.tables[T][NET("0.0.0.0/0")][1] == size
    tunnel.round_trip("a", "b")
    device.close()
    device.give_back()
    assert netlink.snapshot() == initial
    assert netlink.clobbered == []


def test_route_get_for_the_payload_limit_uses_the_mark(tmp_path: Path) -> None:
    """The underlay MTU toward a peer is what the daemon's marked datagrams see, not the
    tunnel's MTU the full tunnel's default route would answer with."""
    builder = two_sites(tmp_path, allowed_b=FULL)
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.route_lookup = None
    netlink.underlay_routes = {}
    netlink.add_host_route("default", dev="eth0", gateway="198.18.0.254", mtu=1400)
    tunnel.start("b")
    device = tunnel.start("a")
    assert device.routes.netlink.route_get("198.18.0.2") == ("eth0", 1400)
    assert netlink.route_get("198.18.0.2")[0] == "sio0"  # what an unmarked lookup says


def test_a_route_the_host_has_is_never_replaced_ours_goes_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builder = two_sites(tmp_path, allowed_b=["198.19.0.2/32", "198.18.1.0/24"])
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    _host(netlink)
    initial = netlink.snapshot()
    tunnel.start("b")
    caplog.set_level(logging.INFO)
    device = tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert netlink.metrics[(RT_TABLE_MAIN, NET("198.18.1.0/24"))] == 1
    assert netlink.routes[NET("198.18.1.0/24")][0] == "sio0"
    assert netlink.route_get("198.18.1.9")[0] == "eth0"  # the LAN keeps its route
    assert netlink.clobbered == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        "peer b: allowed_ips 198.18.1.0/24 is already routed by the host (198.18.1.0/24 dev "
        "eth0 proto kernel scope link); the tunnel's route goes behind it (metric 1) and "
        "carries traffic only if that route goes: the host's route is left untouched. To "
        "send 198.18.1.0/24 through the tunnel, remove or narrow one of the two"
    )
    # the MTU logic's replace reaches our route at its own metric, never the host's
    size = tunnel.peer("a", "b").route_mtu
    assert netlink.routes[NET("198.18.1.0/24")][1] == size
    device.give_back()
    assert netlink.snapshot() == initial and netlink.clobbered == []


def test_a_prefix_already_on_the_tunnel_device_gets_no_second_route(tmp_path: Path) -> None:
    """A spoke's route to the whole tunnel subnet is the connected route of its own
    address: nothing to add, nothing to remove later."""
    builder = two_sites(tmp_path, allowed_b=["198.19.0.0/24"])
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.add_host_route("198.19.0.0/24", dev="sio0", proto=2, scope=253)
    initial = netlink.snapshot()
    tunnel.start("b")
    device = tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert NET("198.19.0.0/24") not in netlink.routes
    tunnel.round_trip("a", "b")
    device.give_back()
    assert netlink.snapshot() == initial and netlink.clobbered == []


@pytest.mark.parametrize(
    ("table", "plan"),
    [
        ("off", RoutingPlan(MODE_OFF, RT_TABLE_MAIN, None)),
        (100, RoutingPlan(MODE_TABLE, 100, None)),
        ("main", RoutingPlan(MODE_TABLE, RT_TABLE_MAIN, None)),
    ],
)
def test_table_off_n_and_main(tmp_path: Path, table: object, plan: RoutingPlan) -> None:
    builder = two_sites(tmp_path, allowed_b=["198.19.0.2/32", *FULL])
    builder.nodes["a"].interface["table"] = table
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    _host(netlink)
    initial = netlink.snapshot()
    tunnel.start("b")
    device = tunnel.start("a")
    tunnel.wait_established(timeout=5)
    assert device.routes.netlink.routing_plan() == plan
    assert not any(r.priority in (32764, 32765) for v in (4, 6) for r in netlink.rules(v))
    if table == "off":
        assert netlink.routes == {} and not any(netlink.tables.values())
    elif table == 100:
        assert set(netlink.tables[100]) == {NET("198.19.0.2/32"), NET("0.0.0.0/0"), NET("::/0")}
        assert netlink.routes == {}
    else:  # main: the default routes go behind the host's, as any collision does
        assert netlink.metrics[(RT_TABLE_MAIN, NET("0.0.0.0/0"))] == 1
        assert netlink.metrics[(RT_TABLE_MAIN, NET("::/0"))] == 1025
    tunnel.round_trip("a", "b")
    device.give_back()
    assert netlink.snapshot() == initial and netlink.clobbered == []


def test_a_configured_fwmark_marks_and_selects(tmp_path: Path) -> None:
    builder = two_sites(tmp_path, allowed_b=FULL)
    builder.nodes["a"].interface["fwmark"] = "0x1234"
    tunnel = Tunnel(builder, start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.add_host_route("198.18.100.0/24", dev="eth1", table=T)  # 51820 is taken
    tunnel.start("a")
    rules = [r for r in netlink.rules(4) if r.invert]
    assert rules == [Rule(4, 32765, T + 1, fwmark=0x1234, fwmask=0xFFFFFFFF, invert=True)]
    assert NET("0.0.0.0/0") in netlink.tables[T + 1]


def test_reload_keeps_a_full_tunnel_up_then_removes_it_with_its_last_default(
    tmp_path: Path,
) -> None:
    """A changed exit peer gets a new session, but its default routes and the rules stay
    (no moment where traffic could leave around the tunnel); removing it takes them."""
    builder = two_sites(tmp_path, allowed_b=FULL)
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    netlink = tunnel.nodes["a"].netlink
    device = tunnel.devices["a"]
    spec = builder.nodes["a"]
    spec.peers["b"]["persistent_keepalive"] = 5
    spec.write()
    calls = len(netlink.calls)
    result = tunnel.call("a", lambda now: device.reload())
    assert result.changed == ("b",)
    touched = [op for op, _ in netlink.calls[calls:]]
    assert not {"add_route", "delete_route", "add_rule", "delete_rule"} & set(touched), touched
    assert set(netlink.tables[T]) == {NET("0.0.0.0/0"), NET("::/0")}
    tunnel.wait_established(timeout=5)
    # the prefix moves to a new peer in one reload: still no gap
    spec.peers["b"]["allowed_ips"] = ["198.19.0.2/32", "fd00:5ec::2/128"]
    spec.write()
    tunnel.call("a", lambda now: device.reload())
    assert not netlink.tables[T]
    assert not any(r.priority in (32764, 32765) for v in (4, 6) for r in netlink.rules(v))
    assert set(netlink.routes) == {NET("198.19.0.2/32"), NET("fd00:5ec::2/128")}
    addresses = len(spec.interface["address"])
    assert len(device.routes.netlink.ledger) == len(netlink.routes) + addresses


# --- the record, and what a killed daemon left ----------------------------------------------


def test_ledger_file_round_trip_lock_and_clean_close(tmp_path: Path) -> None:
    path = tmp_path / "run" / "sio0.owned"
    store, leftovers = LedgerFile.open(path)
    assert leftovers == [] and oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(LedgerError, match="is locked: another secureiod is running"):
        LedgerFile.open(path)
    ledger = Ledger(store)
    items = [
        OwnedAddress("sio0", ipaddress.ip_interface("198.19.0.1/24")),
        OwnedRule(Rule(4, 32764, RT_TABLE_MAIN, suppress_prefixlength=0)),
        OwnedRule(Rule(6, 32765, T, fwmark=T, fwmask=0xFFFFFFFF, invert=True)),
        OwnedRoute(NET("0.0.0.0/0"), "sio0", T, 0),
        OwnedRoute(NET("fd00:5ec:5::/64"), "sio0", RT_TABLE_MAIN, 1024),
        OwnedDns("sio0"),
    ]
    for item in items:
        ledger.add(item)
    ledger.discard(items[-1])
    os.close(store._fd)  # type: ignore[arg-type]  # the process dies: no clean close
    store._fd = None
    again, leftovers = LedgerFile.open(path)
    assert leftovers == items[:-1]
    again.close(clean=True)
    assert not path.exists()


def test_ledger_file_refuses_what_is_not_ours_and_skips_other_namespaces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sio0.owned"
    path.write_text("{}")
    path.chmod(0o666)
    with pytest.raises(LedgerError, match="writable only by it"):
        LedgerFile.open(path)
    path.chmod(0o600)
    header = {"version": 1, "netns": 1, "gen": 3, "items": [{"kind": "dns", "dev": "sio0"}]}
    path.write_text(json.dumps(header) + "\n")
    store, leftovers = LedgerFile.open(path)
    assert leftovers == [] and "another network namespace" in caplog.text
    store.close(clean=False)
    header["netns"] = os.stat("/proc/self/ns/net").st_ino
    header["items"] = [{"kind": "dns", "dev": "sio0"}, {"kind": "route", "dst": "x"}, 7]
    stale = {"gen": 2, "op": "+", "item": {"kind": "dns", "dev": "sio1"}}
    path.write_text(json.dumps(header) + "\n" + json.dumps(stale) + "\n{torn")
    store, leftovers = LedgerFile.open(path)
    assert leftovers == [OwnedDns("sio0")]  # the unreadable item and the stale line skipped
    store.close(clean=False)
    (tmp_path / "link").symlink_to(path)
    with pytest.raises(LedgerError, match="cannot open"):
        LedgerFile.open(tmp_path / "link")
    assert record_path(Path("/run/secureiod/sio0.sock"), "sio0") == Path(
        "/run/secureiod/sio0.owned"
    )


def test_ledger_journal_stays_bounded_and_survives_a_crash_mid_compaction(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sio0.owned"
    store, _ = LedgerFile.open(path)
    ledger = Ledger(store)
    keep = [OwnedRoute(NET(f"198.19.{i}.0/24"), "sio0", RT_TABLE_MAIN, 0) for i in range(10)]
    for item in keep:
        ledger.add(item)
    churn = OwnedRoute(NET("198.19.99.0/24"), "sio0", RT_TABLE_MAIN, 0)
    sizes = []
    for _ in range(500):  # a long life of reloads
        ledger.add(churn)
        ledger.discard(churn)
        sizes.append(path.stat().st_size)
    assert max(sizes) < 64 * 200  # compacted: bounded by the changes allowed between headers
    # a crash between the header's pwrite and the ftruncate leaves older lines behind it
    old = path.read_bytes()
    store.compact(keep[:3])
    new = path.read_bytes().split(b"\n")[0] + b"\n"
    os.close(store._fd)  # type: ignore[arg-type]
    store._fd = None
    path.write_bytes(new + old[len(new) :])
    store, leftovers = LedgerFile.open(path)
    assert leftovers == keep[:3]
    store.close(clean=True)
    assert not path.exists()


def test_the_next_start_removes_exactly_what_a_killed_daemon_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builder = two_sites(tmp_path, allowed_b=["198.19.5.0/24", *FULL])
    config = builder.load("a")
    netlink = FakeNetlink()
    _host(netlink)
    foreign = Rule(4, 100, 100, fwmark=T, fwmask=0xFFFFFFFF, invert=True)  # looks like ours
    netlink.add_rule(foreign)
    initial = netlink.snapshot()
    path = tmp_path / "sio0.owned"
    store, _ = LedgerFile.open(path)
    first = OwnedNetlink(netlink, "sio0", config.interface)
    first.attach(ledger=Ledger(store))
    first.add_address("sio0", config.interface.address[0])
    for pc in config.peers:
        for net in pc.allowed_ips:
            first.install(net, pc.name)
    assert len(netlink.rule_list) == len(initial[3]) + 4
    os.close(store._fd)  # type: ignore[arg-type]  # kill -9
    store._fd = None
    # (a device the daemon created would take its routes with it; this one persists)
    store, leftovers = LedgerFile.open(path)
    ledger = Ledger(store)
    caplog.set_level(logging.WARNING)
    undo_leftovers(netlink, leftovers, None, ledger)
    assert netlink.snapshot() == initial and netlink.clobbered == []
    assert foreign in netlink.rule_list
    assert len(ledger) == 0
    assert "removed what it had added (1 address, 4 rules, 3 routes)" in caplog.text
    second = OwnedNetlink(netlink, "sio0", config.interface)
    second.attach(ledger=ledger)
    assert second.routing_plan().table == T  # the same table again
    ledger.close()
    assert not path.exists()


def test_an_address_that_was_there_is_left_there(tmp_path: Path) -> None:
    config = two_sites(tmp_path).load("a")
    netlink = FakeNetlink()
    address = config.interface.address[0]
    netlink.add_address("sio0", address)
    owned = OwnedNetlink(netlink, "sio0", config.interface)
    owned.add_address("sio0", address)
    owned.add_address("sio0", config.interface.address[1])
    owned.give_back()
    assert netlink.addresses["sio0"] == [address]


# --- the plan's pieces ------------------------------------------------------------------------


def test_free_table_and_rule_priorities() -> None:
    netlink = FakeNetlink()
    assert free_table(netlink) == T
    netlink.add_host_route("198.18.100.0/24", dev="eth0", table=T)
    netlink.add_rule(Rule(6, 10, T + 1))
    assert free_table(netlink) == T + 2
    plan = RoutingPlan(MODE_AUTO, T + 2, 7)
    suppress, mark = policy_rules(4, plan, [0, 32766, 32767])
    assert (suppress.priority, mark.priority) == (32764, 32765)
    suppress, mark = policy_rules(4, plan, [0, 32764, 32765, 32766, 32767])
    assert (suppress.priority, mark.priority) == (32762, 32763)
    assert mark == Rule(4, 32763, T + 2, fwmark=7, fwmask=0xFFFFFFFF, invert=True)
    assert mark.describe() == "32763: not from all fwmark 0x7 lookup 51822"
    assert suppress.describe() == "32762: from all lookup main suppress_prefixlength 0"


def test_decide_plan(tmp_path: Path) -> None:
    builder = ConfigBuilder(tmp_path)
    for name, keys in (("a", {}), ("b", {"fwmark": 9}), ("c", {"table": "off", "fwmark": 9})):
        builder.add(name, **keys)
    netlink = FakeNetlink()
    plans = [decide_plan(builder.load(n).interface, netlink) for n in "abc"]
    assert plans == [
        RoutingPlan(MODE_AUTO, T, T),
        RoutingPlan(MODE_AUTO, T, 9),
        RoutingPlan(MODE_OFF, RT_TABLE_MAIN, 9),
    ]
    assert plans[0].table_for(NET("0.0.0.0/0")) == T
    assert plans[0].table_for(NET("198.19.5.0/24")) == RT_TABLE_MAIN
    assert plans[2].table_for(NET("0.0.0.0/0")) is None


def test_strict_rp_filter_is_found() -> None:
    values = {"all": "0", "eth0": "1", "eth1": "2", "sio0": "1", "lo": "1"}

    def read(path: str) -> str | None:
        return values.get(path.split("/")[-2])

    names = ["all", "default", "lo", "eth0", "eth1", "sio0"]
    assert strict_rp_filter(exclude=["sio0"], read=read, names=names) == ["eth0"]
    values["all"] = "1"
    assert strict_rp_filter(exclude=["sio0"], read=read, names=names) == ["eth0"]
    values["all"] = "2"
    assert strict_rp_filter(exclude=["sio0"], read=read, names=names) == []


# --- config keys ------------------------------------------------------------------------------


def _interface(tmp_path: Path, **keys: Any) -> Config:
    builder = ConfigBuilder(tmp_path)
    builder.add("a", **keys)
    return builder.load("a")


@pytest.mark.parametrize(
    ("keys", "table", "fwmark", "dns"),
    [
        ({}, "auto", None, ()),
        ({"table": "off"}, "off", None, ()),
        ({"table": "main"}, 254, None, ()),
        ({"table": 1000, "fwmark": 51820}, 1000, 51820, ()),
        ({"fwmark": "0xCA6C"}, "auto", 0xCA6C, ()),
        ({"dns": ["198.19.0.1", "fd00:5ec::1", "corp.example."]}, "auto", None,
         ("198.19.0.1", "fd00:5ec::1", "corp.example")),
    ],
)  # fmt: skip
def test_routing_keys(
    tmp_path: Path, keys: dict[str, Any], table: object, fwmark: int | None, dns: tuple[str, ...]
) -> None:
    iface = _interface(tmp_path, **keys).interface
    assert (iface.table, iface.fwmark, iface.dns) == (table, fwmark, dns)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"table": "on"}, 'interface.table: expected "auto", "off", "main" or a routing table '
         'number 1..4294967295, got string "on"'),
        ({"table": 255}, "interface.table: 255 is the kernel's local table; use another number "
         'or "auto"'),
        ({"table": 0}, "interface.table: 0 is out of range"),
        ({"fwmark": 0}, "interface.fwmark: 0 is no mark; leave the key out and the daemon picks "
         "one when needed"),
        ({"fwmark": "51820"}, "interface.fwmark: expected a firewall mark 1..4294967295"),
        ({"fwmark": 1 << 32}, "interface.fwmark: 4294967296 is out of range"),
        ({"dns": ["198.19.0"]}, 'interface.dns[0]: "198.19.0" is neither an IP address nor a '
         "search domain"),
        ({"dns": "198.19.0.1"}, 'interface.dns: expected an array, got string "198.19.0.1"; '
         'write ["198.19.0.1"]'),
    ],
)  # fmt: skip
def test_routing_key_errors(tmp_path: Path, keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _interface(tmp_path, **keys)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_routing_keys_need_a_restart(tmp_path: Path) -> None:
    from secureiod.config import diff_config, restart_required

    builder = ConfigBuilder(tmp_path)
    spec = builder.add("a")
    old = builder.load("a")
    spec.interface.update(table="off", fwmark=5, dns=["198.19.0.9"])
    diff = diff_config(old, builder.load("a"))
    assert restart_required(diff) == ["table", "fwmark", "dns"]


# --- --check: routes that would capture the daemon's own traffic ------------------------------


def _site(tmp_path: Path, allowed: list[str], **interface: Any) -> Config:
    builder = ConfigBuilder(tmp_path)
    a, b = builder.add("a", **interface), builder.add("b")
    c = builder.add("c")
    builder.connect(a, b, allowed_b=allowed)
    builder.connect(a, c)
    return builder.load("a")


HOME = [
    RouteInfo(NET("0.0.0.0/0"), dev="eth0", gateway=IP("198.18.9.1"), proto=3),
    RouteInfo(NET("198.18.9.0/24"), dev="eth0", proto=2, scope=253),
    RouteInfo(NET("198.19.0.0/24"), dev="sio0", proto=2, scope=253),  # the tunnel's own
]


def test_capture_of_an_endpoint_is_named_with_the_fix(tmp_path: Path) -> None:
    config = _site(tmp_path, ["198.19.0.2/32", "198.18.0.0/16"])
    warnings = capture_warnings(config, HOME)
    assert warnings == [
        'peer "b": allowed_ips 198.18.0.0/16 covers its own endpoint 198.18.0.2 (the host '
        "reaches it by default via 198.18.9.1 dev eth0 proto boot), so the daemon's own "
        "datagrams to it would go into the tunnel and the session would never come up; use a "
        "narrower prefix, a route of its own for the endpoint (ip route add 198.18.0.2/32 via "
        "198.18.9.1 dev eth0), or table = N with rules of your own",
        'peer "b": allowed_ips 198.18.0.0/16 covers the endpoint of peer "c" 198.18.0.3 (the '
        "host reaches it by default via 198.18.9.1 dev eth0 proto boot), so the daemon's own "
        "datagrams to it would go into the tunnel and the session would never come up; use a "
        "narrower prefix, a route of its own for the endpoint (ip route add 198.18.0.3/32 via "
        "198.18.9.1 dev eth0), or table = N with rules of your own",
    ]
    # a more specific host route to the endpoints keeps them out of the tunnel
    lan = RouteInfo(NET("198.18.0.0/24"), dev="eth1", proto=2, scope=253)
    assert capture_warnings(config, [*HOME, lan]) == []
    # without the host's routes the config alone still says it
    assert len(capture_warnings(config, None)) == 2


def test_connected_prefixes_and_what_the_host_already_routes(tmp_path: Path) -> None:
    config = _site(tmp_path, ["198.19.0.2/32", "198.18.9.0/24", "198.18.9.128/25", *FULL])
    assert capture_warnings(config, HOME) == [
        'peer "b": allowed_ips 198.18.9.0/24 is already routed by this host (198.18.9.0/24 dev '
        "eth0 proto kernel scope link); the tunnel's route goes behind it and carries nothing "
        "while that route exists; remove or narrow one of the two",
        'peer "b": allowed_ips 198.18.9.128/25 lies inside 198.18.9.0/24, a connected prefix '
        "of this host on eth0: those addresses would be reached through the tunnel instead of "
        'the LAN; use a prefix outside 198.18.9.0/24, or table = "off" and route it yourself',
    ]
    assert len(capture_warnings(config, HOME, same_prefix=False)) == 1
    off = _site(tmp_path / "off", ["198.18.0.0/16"], table="off")
    numbered = _site(tmp_path / "n", ["198.18.0.0/16"], table=7)
    assert capture_warnings(off, HOME) == capture_warnings(numbered, HOME) == []
    # table = "main": a default route is an ordinary route and goes behind the host's
    main = _site(tmp_path / "main", FULL, table="main")
    assert capture_warnings(main, HOME)[0].startswith(
        'peer "b": allowed_ips 0.0.0.0/0 is already routed by this host (default via '
        "198.18.9.1 dev eth0 proto boot)"
    )


def test_check_config_prints_the_warnings_after_the_summary(tmp_path: Path) -> None:
    config = _site(tmp_path, ["198.19.0.2/32", "198.18.9.0/24"])
    lines = check_config(config.path, host_routes=HOME).splitlines()
    assert lines[0] == f"{config.path}: OK: interface sio0, 2 peers"
    assert lines[-1].startswith('  warning: peer "b": allowed_ips 198.18.9.0/24 is already')
    assert not [
        line for line in check_config(config.path, host_routes=[]).splitlines() if "warning" in line
    ]


# --- DNS --------------------------------------------------------------------------------------


def _fake_resolvectl(tmp_path: Path, exit_status: int = 0) -> Path:
    """A ``resolvectl`` stand-in on PATH that records its arguments (systemd-resolved
    cannot run in this test environment)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "resolvectl.log"
    script = bindir / "resolvectl"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        + (
            f'echo "Failed to set DNS configuration: nope" >&2\nexit {exit_status}\n'
            if exit_status
            else ""
        )
    )
    script.chmod(0o755)
    return log


def test_resolvectl_sets_and_reverts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_resolvectl(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    dns = Resolvectl()
    assert dns.apply("sio0", ["198.19.0.1", "fd00:5ec::1", "corp.example"]) is None
    assert dns.revert("sio0") is None
    assert log.read_text().splitlines() == [
        "dns sio0 198.19.0.1 fd00:5ec::1",
        "domain sio0 corp.example ~.",
        "revert sio0",
    ]
    assert split_entries(["a.example", "198.19.0.1"]) == (["198.19.0.1"], ["a.example"])


def test_resolvectl_failure_and_absence_are_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_resolvectl(tmp_path, exit_status=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert Resolvectl().apply("sio0", ["198.19.0.1"]) == (
        "resolvectl dns failed: Failed to set DNS configuration: nope"
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert Resolvectl().apply("sio0", ["198.19.0.1"]) == (
        "resolvectl (systemd-resolved) is not installed"
    )


class _RecordingDns:
    def __init__(self, problem: str | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.problem = problem

    def apply(self, dev: str, entries: Any) -> str | None:
        self.calls.append(("apply", dev, *entries))
        return self.problem

    def revert(self, dev: str) -> str | None:
        self.calls.append(("revert", dev))
        return None


def test_dns_is_applied_at_start_and_reverted_at_stop(tmp_path: Path) -> None:
    builder = two_sites(tmp_path)
    builder.nodes["a"].interface["dns"] = ["198.19.0.2"]
    tunnel = Tunnel(builder, start=[])
    dns = _RecordingDns()
    from secureiod.config import reload_config
    from secureiod.daemon.device import Device

    device = Device(builder.load("a"), **tunnel.nodes["a"].ports(), config_loader=reload_config)
    device.routes.attach(dns=dns)
    device.configure_interface()
    assert dns.calls == [("apply", "sio0", "198.19.0.2")]
    device.give_back()
    assert dns.calls[-1] == ("revert", "sio0")


def test_dns_that_cannot_be_applied_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    builder = two_sites(tmp_path)
    builder.nodes["a"].interface["dns"] = ["198.19.0.2"]
    tunnel = Tunnel(builder, start=[])
    from secureiod.config import reload_config
    from secureiod.daemon.device import Device

    device = Device(builder.load("a"), **tunnel.nodes["a"].ports(), config_loader=reload_config)
    dns = _RecordingDns("resolvectl (systemd-resolved) is not installed")
    device.routes.attach(dns=dns)
    caplog.set_level(logging.INFO)
    device.configure_interface()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "dns = [198.19.0.2] not applied: resolvectl (systemd-resolved) is not installed; "
        "configure the resolver yourself"
    ]
    device.give_back()
    assert dns.calls == [("apply", "sio0", "198.19.0.2")]  # nothing to revert


# --- the examples -----------------------------------------------------------------------------


def test_full_tunnel_examples_are_the_readme_example(tmp_path: Path) -> None:
    from secureiod.secureio.identity import Identity, write_identity

    write_identity(tmp_path / "id", Identity.generate())
    text = README.read_text()
    section = text[text.index("\n## Full tunnel\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    names = ["full-tunnel-laptop.toml", "full-tunnel-server.toml"]
    for block, name in zip(blocks, names, strict=True):
        example = (EXAMPLES / name).read_text()
        assert tomllib.loads(block) == tomllib.loads(example)
        path = tmp_path / f"sio{len(name)}.toml"  # installed as /etc/secureiod/sio0.toml
        path.write_text(example.replace("/etc/secureiod/id_ed25519", str(tmp_path / "id")))
        assert load_config(path).interface.table == "auto"
        assert check_config(path, host_routes=[]).splitlines()[0].endswith("1 peer")


def test_the_guard_offers_no_other_writes(tmp_path: Path) -> None:
    """``Routes`` holds only the guard: an MTU change for a route the daemon did not add
    does nothing, and no call that could replace or delete the host's routes exists."""
    config = two_sites(tmp_path).load("a")
    netlink = FakeNetlink()
    _host(netlink)
    owned = OwnedNetlink(netlink, "sio0", config.interface)
    for name in ("delete_route", "add_route", "add_rule", "delete_rule", "create_address"):
        with pytest.raises(AttributeError, match="written only through"):
            getattr(owned, name)
    owned.replace_route(NET("198.18.1.0/24"), "sio0", 1300)
    owned.replace_route(NET("0.0.0.0/0"), "sio0", 1300)
    assert netlink.calls == [] and netlink.clobbered == []
    assert owned.list_routes() == netlink.host_routes  # lookups pass through


def test_a_route_that_appears_while_adding_is_gone_behind_too(tmp_path: Path) -> None:
    """The host adds a route with the same key between our look and our add (EEXIST):
    we look again and go behind it rather than fail or overwrite it."""
    config = two_sites(tmp_path).load("a")
    netlink = FakeNetlink()
    owned = OwnedNetlink(netlink, "sio0", config.interface)
    owned.routing_plan()
    net = NET("198.19.7.0/24")
    owned._host_routes(4, RT_TABLE_MAIN)  # the look, cached: nothing there yet
    netlink.add_host_route("198.19.7.0/24", dev="eth1")  # then the host adds one
    owned.install(net, "b")
    assert netlink.metrics[(RT_TABLE_MAIN, net)] == 1
    assert netlink.clobbered == []
    owned.give_back()
    assert [r.dst for r in netlink.host_routes] == [net] and netlink.routes == {}
