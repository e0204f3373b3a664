"""Reloads the host refuses half-way, and reloads that must keep or recompute MTUs and
timers (review of issue 10: a SIGHUP whose netlink or getaddrinfo call failed stopped the
daemon, ``secureioctl reload`` then left half a config applied; an in-place change lost the
route MTUs; timers and a return to ``mtu = "auto"`` were never applied).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fakes import ConfigBuilder, FakeNetlink, Tunnel, hub_with_a_newcomer, ping4, two_sites

from secureiod import paths
from secureiod.control import ControlError
from secureiod.daemon import lifecycle as lifecycle_module
from secureiod.netlink import NetlinkError

NET = ipaddress.ip_network
V6_DENIED = "add route fd00:5ec:0:9::/64 dev sio0: Permission denied"


def _deny_ipv6_routes(netlink: FakeNetlink) -> Callable[[], None]:
    """IPv6 disabled on the device: the kernel refuses every IPv6 route with EACCES (what
    ``FakeNetlink.fail`` does for all routes, for one family only). Returns the undo."""
    real = netlink.add_route

    def add_route(dst: Any, dev: str, **kwargs: Any) -> None:
        if ipaddress.ip_network(dst).version == 6:
            netlink.calls.append(("add_route", (dst, dev)))
            raise NetlinkError(f"add route {dst} dev {dev}: Permission denied", errno.EACCES)
        real(dst, dev, **kwargs)

    netlink.add_route = add_route  # type: ignore[method-assign]

    def undo() -> None:
        del netlink.add_route  # type: ignore[method-assign]

    return undo


def _reload_via(tunnel: Tunnel, how: str) -> str | None:
    """Reload a's config as SIGHUP or ``secureioctl reload`` do; returns the client's
    error (None for SIGHUP, which has no client). Neither may raise anything else."""
    device = tunnel.devices["a"]
    if how == "sighup":
        tunnel.call("a", device.reload_logged)
        return None
    with pytest.raises(ControlError) as info:
        tunnel.call("a", lambda now: device.handle_command("reload", {}))
    return str(info.value)


def _state(tunnel: Tunnel) -> tuple[Any, ...]:
    device = tunnel.devices["a"]
    netlink = tunnel.nodes["a"].netlink
    return (
        device.config,
        {n: (p, p.session, p.config) for n, p in device.peers.items()},
        dict(netlink.routes),
        {n: list(a) for n, a in netlink.addresses.items()},
        dict(netlink.mtu),
        list(device.routes.netlink.ledger.items()),  # the record of what to give back
    )


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_a_route_the_kernel_refuses_changes_nothing_and_a_second_reload_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The review's case (a): IPv6 off on sio0, an IPv6 prefix added to a peer."""
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    device, netlink = tunnel.devices["a"], tunnel.nodes["a"].netlink
    before = _state(tunnel)
    a = builder.nodes["a"]
    a.peers["b"]["allowed_ips"] = [*a.peers["b"]["allowed_ips"], "fd00:5ec:0:9::/64"]
    a.write()
    netlink.fail("add_route", V6_DENIED)  # the one route this reload adds
    caplog.set_level(logging.INFO)
    caplog.clear()

    error = _reload_via(tunnel, how)

    assert _state(tunnel) == before  # config, peers, sessions, routes: all as they were
    assert device.status()["reloads_refused"] == 1 and device.status()["reloads"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"reload failed, keeping the running config: {V6_DENIED}"]
    if error is not None:
        assert error == errors[0]
    assert "Traceback" not in caplog.text
    for peer in "bcd":
        tunnel.round_trip("a", peer)

    netlink.recover()  # IPv6 back on: the same reload now applies (it is not "unchanged")
    result = tunnel.call("a", lambda now: device.reload())
    assert result.in_place == ("b",) and result.fields == {"b": ("allowed_ips",)}
    assert NET("fd00:5ec:0:9::/64") in netlink.routes
    assert NET("fd00:5ec:0:9::/64") in [NET(n) for n in device.peers_info()[0]["allowed_ips"]]


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_a_reload_refused_half_way_is_rolled_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Peer e added (its IPv4 route goes in, its IPv6 one is refused), d removed, c
    changed in place, b given a new endpoint: all undone, nothing half-applied."""
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    device, netlink = tunnel.devices["a"], tunnel.nodes["a"].netlink
    before = _state(tunnel)
    a = builder.nodes["a"]
    a.peers["c"]["allowed_ips"] = [*a.peers["c"]["allowed_ips"], "198.19.1.0/24"]
    a.peers["b"]["persistent_keepalive"] = 3
    del a.peers["d"]
    a.peers["e"] = builder.peer_entry(builder.nodes["e"])
    a.interface["address"] = [*a.interface["address"], "198.19.7.1/24"]
    a.write()
    undo = _deny_ipv6_routes(netlink)
    caplog.set_level(logging.INFO)

    _reload_via(tunnel, how)

    assert _state(tunnel) == before
    # what was added before the refusal was taken away again
    assert ("add", NET("198.19.1.0/24"), None) in netlink.route_history
    assert ("delete", NET("198.19.1.0/24"), None) in netlink.route_history
    assert NET("198.19.0.5/32") not in netlink.routes
    assert netlink.clobbered == []
    for peer in "bcd":
        tunnel.round_trip("a", peer)

    undo()
    result = tunnel.call("a", lambda now: device.reload())
    assert (result.added, result.removed, result.in_place) == (("e",), ("d",), ("b", "c"))
    tunnel.wait_established([("a", "e")], timeout=5)
    tunnel.round_trip("a", "e")
    assert NET("198.19.0.4/32") not in netlink.routes


def _scoped_sites(tmp_path: Path) -> tuple[ConfigBuilder, Tunnel]:
    builder = two_sites(tmp_path, ipv6_underlay=True)
    builder.nodes["a"].peers["b"]["persistent_keepalive"] = None
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    return builder, tunnel


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_an_endpoint_zone_that_does_not_exist_is_refused_by_the_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The review's case (b): "[fe80::1%nosuch0]:5800" is now a config error, at reload as
    at start and --check, with the file and the field."""
    builder, tunnel = _scoped_sites(tmp_path)
    device = tunnel.devices["a"]
    before = _state(tunnel)
    a = builder.nodes["a"]
    a.peers["b"]["endpoint"] = "[fe80::1%nosuch0]:5800"
    a.write()
    caplog.set_level(logging.INFO)
    caplog.clear()

    error = _reload_via(tunnel, how)

    assert _state(tunnel) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f'reload refused, keeping the running config: {a.path}: peer "b".endpoint: '
        '"fe80::1%nosuch0": there is no interface "nosuch0" on this host; name one that '
        "`ip link` lists, e.g. [fe80::1%eth0]:5800"
    ]
    assert error in (None, errors[0])
    assert device.status()["reloads_refused"] == 1
    tunnel.round_trip("a", "b")


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_an_endpoint_the_host_refuses_at_apply_time_changes_nothing(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """The zone's interface exists when the config is read and is gone when the endpoint
    becomes a socket address: the reload is refused before anything changed (it used to
    remove peer b, and never add it back)."""
    builder, tunnel = _scoped_sites(tmp_path)
    device = tunnel.devices["a"]
    before = _state(tunnel)
    a = builder.nodes["a"]
    a.peers["b"]["endpoint"] = "[fe80::1%lo]:5800"  # lo exists: the config is fine
    a.write()
    real = lifecycle_module.literal_sockaddr

    def gone(host: str, port: int, family: int) -> Any:
        if "%" in host:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, family)

    monkeypatch.setattr(lifecycle_module, "literal_sockaddr", gone)
    caplog.set_level(logging.INFO)
    caplog.clear()

    error = _reload_via(tunnel, how)

    assert _state(tunnel) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "reload failed, keeping the running config: peer b: endpoint [fe80::1%lo]:5800: "
        "[Errno -2] Name or service not known"
    ]
    assert error in (None, errors[0])
    tunnel.round_trip("a", "b")

    monkeypatch.setattr(lifecycle_module, "literal_sockaddr", real)
    result = tunnel.call("a", lambda now: device.reload())  # retried, not "unchanged"
    assert result.changed == ("b",) and result.in_place == ()
    assert device.peers["b"].endpoint == ("fe80::1", 5800, 0, 1)


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_an_unexpected_error_while_switching_peers_is_one_line_and_keeps_the_truth(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """A bug in the in-memory part (after the kernel said yes) cannot be rolled back
    exactly: the daemon keeps running, and ``config`` says which peers really run, so
    the next reload retries the rest instead of answering "unchanged"."""
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    device = tunnel.devices["a"]
    a = builder.nodes["a"]
    del a.peers["d"]
    a.peers["e"] = builder.peer_entry(builder.nodes["e"])
    a.write()
    real = device.lifecycle.start_peer
    calls = {"n": 0}

    def broken(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(device.lifecycle, "start_peer", broken)
    caplog.set_level(logging.INFO)
    caplog.clear()

    _reload_via(tunnel, how)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "reload failed, applied in part: RuntimeError: boom; the running config now lists "
        "what is really applied, and the next reload retries the rest"
    ]
    assert {p.name for p in device.config.peers} == set(device.peers) == {"b", "c"}
    tunnel.round_trip("a", "b")
    result = tunnel.call("a", lambda now: device.reload())
    assert result.added == ("e",) and result.removed == ()
    tunnel.wait_established([("a", "e")], timeout=5)
    tunnel.round_trip("a", "e")
    assert NET("198.19.0.4/32") not in tunnel.nodes["a"].netlink.routes  # d's, settled


@pytest.mark.parametrize("how", ["sighup", "secureioctl"])
def test_a_refused_mtu_takes_back_the_new_routes_and_addresses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The last kernel step of a reload (a fixed MTU) refused: the routes and address it
    had added before go again."""
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    device, netlink = tunnel.devices["a"], tunnel.nodes["a"].netlink
    before = _state(tunnel)
    a = builder.nodes["a"]
    a.interface["mtu"] = 1400
    a.interface["address"] = [*a.interface["address"], "198.19.7.1/24"]
    a.peers["e"] = builder.peer_entry(builder.nodes["e"])
    a.write()
    netlink.fail("set_mtu", "set mtu 1400 on sio0: No such device")
    caplog.set_level(logging.INFO)
    caplog.clear()

    _reload_via(tunnel, how)

    assert _state(tunnel) == before
    assert ("add", NET("198.19.0.5/32"), None) in netlink.route_history
    assert ("delete_address", ("sio0", ipaddress.ip_interface("198.19.7.1/24"))) in (netlink.calls)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "reload failed, keeping the running config: set mtu 1400 on sio0: No such device"
    ]
    tunnel.round_trip("a", "b")

    netlink.recover()
    result = tunnel.call("a", lambda now: device.reload())
    assert result.added == ("e",) and result.interface == ("address", "mtu")
    assert netlink.mtu["sio0"] == 1400


def test_sighup_never_raises_even_when_telling_systemd_fails(tmp_path: Path) -> None:
    _, tunnel = hub_with_a_newcomer(tmp_path)
    device = tunnel.devices["a"]
    notifier = tunnel.nodes["a"].notifier

    def broken(status: str | None = None) -> bool:
        raise OSError("notify socket gone")

    notifier.reloading = broken  # type: ignore[method-assign]
    tunnel.call("a", device.reload_logged)  # no exception
    tunnel.round_trip("a", "b")


# --- MTUs ---------------------------------------------------------------------------------


def test_an_in_place_change_keeps_the_route_and_link_mtus(tmp_path: Path) -> None:
    """The review's finding 2a: routes lost their MTU, the link fell to 1280 and
    ``peers`` said "route mtu: (pending)" while the session ran at 1408."""
    builder = two_sites(tmp_path)
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    netlink = tunnel.nodes["a"].netlink
    peer = tunnel.peer("a", "b")
    assert peer.route_mtu == 1408 and netlink.mtu["sio0"] == 1408
    a = builder.nodes["a"]
    a.peers["b"]["allowed_ips"] = [*a.peers["b"]["allowed_ips"], "198.19.1.0/24"]
    a.write()
    mtus = len(netlink.mtu_history)

    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())

    assert tunnel.peer("a", "b") is peer and peer.route_mtu == 1408
    assert tunnel.devices["a"].peers_info()[0]["mtu"] == 1408
    assert netlink.routes == {
        NET("198.19.0.2/32"): ("sio0", 1408),
        NET("198.19.1.0/24"): ("sio0", 1408),
        NET("fd00:5ec::2/128"): ("sio0", 1408),
    }
    assert netlink.mtu["sio0"] == 1408 and len(netlink.mtu_history) == mtus  # untouched
    tunnel.nodes["a"].tun.inject(ping4("198.19.0.1", "198.19.1.9", payload=b"x" * 1350))
    tunnel.sim.run_for(0.05)
    assert len(tunnel.delivered("b")) == 1
    assert result.in_place == ("b",)


def test_a_prefix_moving_to_another_peer_takes_that_peers_route_mtu(tmp_path: Path) -> None:
    builder = ConfigBuilder(tmp_path)
    a, b, c = builder.add("a"), builder.add("b"), builder.add("c")
    builder.connect(a, b)
    builder.connect(a, c, allowed_b=["198.19.0.3/32", "198.19.1.0/24"])
    tunnel = Tunnel(builder)
    tunnel.sim.wire.link(tunnel.nodes["a"].ip, tunnel.nodes["b"].ip, mtu=1400)
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(1)
    netlink = tunnel.nodes["a"].netlink
    b_mtu, c_mtu = tunnel.peer("a", "b").route_mtu, tunnel.peer("a", "c").route_mtu
    assert b_mtu is not None and c_mtu == 1408 and b_mtu < c_mtu
    a.peers["c"]["allowed_ips"] = ["198.19.0.3/32"]
    a.peers["b"]["allowed_ips"] = ["198.19.0.2/32", "198.19.1.0/24"]
    a.write()
    tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert netlink.routes[NET("198.19.1.0/24")] == ("sio0", b_mtu)
    assert netlink.routes[NET("198.19.0.3/32")] == ("sio0", c_mtu)
    assert netlink.mtu["sio0"] == c_mtu


def test_a_fixed_mtu_back_to_auto_follows_the_peers_again(tmp_path: Path) -> None:
    """Finding 2c: the link stayed at 1300 while status said "auto"."""
    builder = two_sites(tmp_path)
    builder.nodes["a"].interface["mtu"] = 1300
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    netlink = tunnel.nodes["a"].netlink
    assert netlink.mtu["sio0"] == 1300 and tunnel.peer("a", "b").route_mtu == 1300
    assert netlink.routes[NET("198.19.0.2/32")] == ("sio0", 1300)

    del builder.nodes["a"].interface["mtu"]
    builder.nodes["a"].write()
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())

    assert netlink.mtu["sio0"] == 1408
    assert tunnel.peer("a", "b").route_mtu == 1408
    assert netlink.routes[NET("198.19.0.2/32")] == ("sio0", 1408)
    assert netlink.routes[NET("fd00:5ec::2/128")] == ("sio0", 1408)
    status = tunnel.devices["a"].status()
    assert (status["mtu"], status["mtu_mode"]) == (1408, "auto")
    assert result.summary() == "interface changed (mtu); 1 unchanged"

    # and back to a fixed MTU: the link and the route MTUs are capped at once
    builder.nodes["a"].interface["mtu"] = 1300
    builder.nodes["a"].write()
    tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert netlink.mtu["sio0"] == 1300
    assert netlink.routes[NET("198.19.0.2/32")] == ("sio0", 1300)
    assert netlink.routes[NET("fd00:5ec::2/128")] == ("sio0", 1300)
    tunnel.round_trip("a", "b")


# --- timers -------------------------------------------------------------------------------


def test_a_new_keepalive_timeout_applies_to_running_peers(tmp_path: Path) -> None:
    """Finding 2b: a silent peer is given up after the new timeout, not the old one."""
    builder = two_sites(tmp_path)
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    peer = tunnel.peer("a", "b")
    session = peer.session
    assert peer.timing.dead_after == 15.0
    builder.nodes["a"].interface["keepalive_timeout"] = 6
    builder.nodes["a"].write()

    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())

    assert peer.session is session and peer.timing.dead_after == 6.0
    tunnel.sim.wire.cut(tunnel.nodes["a"].ip, tunnel.nodes["b"].ip)
    cut_at = tunnel.sim.now
    tunnel.sim.wait_for(lambda: peer.counters.restarts > 0, 20, "a gives b up")
    assert tunnel.sim.now - cut_at < 8.0  # 6 s and a keepalive, not 15 s
    assert result.interface == ("keepalive_timeout",) and result.restarted == ()


def test_a_new_key_update_interval_applies_to_running_sessions(tmp_path: Path) -> None:
    """Finding 2b: the interval is fixed in a session's options, so each running peer
    gets one new session (one handshake); keys then rotate at the new interval."""
    builder = two_sites(tmp_path)
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    peer = tunnel.peer("a", "b")
    tunnel.sim.run_for(30)
    builder.nodes["a"].interface["key_update_interval"] = 10
    builder.nodes["a"].write()

    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())

    assert peer.timing.key_update_interval == 10.0
    tunnel.wait_established(timeout=5)
    session = peer.session
    assert session is not None
    start = session.key_rotations[0]
    tunnel.sim.run_for(61)
    assert session.key_rotations[0] - start >= 5  # every 10 s now, not every 60 s
    assert peer.session is session and peer.counters.restarts == 1  # the reload's only
    tunnel.round_trip("a", "b")
    tunnel.round_trip("b", "a")
    assert result.restarted == ("b",) and result.unchanged == ("b",)
    assert result.summary() == (
        "interface changed (key_update_interval); 1 session restarted for the new "
        "key_update_interval (b); 1 unchanged"
    )


# --- what the operator reads --------------------------------------------------------------


def test_the_summary_names_interface_and_in_place_changes(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a = builder.nodes["a"]
    a.interface["mtu"] = 1400
    a.interface["address"] = [*a.interface["address"], "198.19.7.1/24"]
    a.peers["b"]["allowed_ips"] = [*a.peers["b"]["allowed_ips"], "198.19.1.0/24"]
    a.peers["c"]["persistent_keepalive"] = 9
    a.peers["d"]["endpoint"] = "198.18.0.99:5800"
    a.write()
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert result.summary() == (
        "interface changed (address, mtu); 1 peer changed with a new session (d: endpoint); "
        "2 peers changed in place (b: allowed_ips; c: persistent_keepalive); 0 unchanged"
    )
    reply = result.as_dict()
    assert reply["summary"] == result.summary()
    assert reply["interface"] == ["address", "mtu"]
    assert reply["in_place"] == ["b", "c"]
    assert reply["fields"] == {
        "b": ["allowed_ips"],
        "c": ["persistent_keepalive"],
        "d": ["endpoint"],
    }
    assert reply["changed"] == ["b", "c", "d"]


def test_an_interface_only_change_is_named(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    builder.nodes["a"].interface["address"] = ["198.19.0.1/24"]
    builder.nodes["a"].write()
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert result.summary() == "interface changed (address); 3 unchanged"
    assert [str(x) for x in tunnel.nodes["a"].netlink.addresses["sio0"]] == ["198.19.0.1/24"]


@pytest.mark.parametrize("standard", [True, False], ids=["systemd", "--config"])
def test_a_restart_refusal_names_the_real_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standard: bool
) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a = builder.nodes["a"]
    if standard:
        monkeypatch.setattr(paths, "CONFIG_DIR", a.directory)
    a.interface["offload"] = False
    a.write()
    with pytest.raises(ControlError) as info:
        tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    hint = (
        "systemctl restart secureiod@sio0" if standard else f"restart secureiod --config {a.path}"
    )
    assert str(info.value) == (
        f"reload refused: changing offload needs a restart ({hint}); the running config stays"
    )
    assert "IFNAME" not in str(info.value)
