"""Reload on whole devices: the config difference is applied, unchanged peers keep their
sessions, and a refused config never touches the running tunnel (issue 10 item 6).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import pytest
from fakes import ConfigBuilder, Tunnel, hub_with_a_newcomer, ping4

from secureiod import config as config_module
from secureiod.control import ControlError
from secureiod.secureio.errors import IdentityError
from secureiod.secureio.identity import Identity, write_identity

NET = ipaddress.ip_network


def test_reload_applies_the_difference_and_keeps_unchanged_sessions(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a, device = builder.nodes["a"], tunnel.devices["a"]
    netlink = tunnel.nodes["a"].netlink
    b_session = tunnel.peer("a", "b").session
    old_c = tunnel.peer("a", "c")
    b_packets = tunnel.peer("b", "a").session.stats.rx_packets  # type: ignore[union-attr]
    a.peers["c"]["allowed_ips"] = [*a.peers["c"]["allowed_ips"], "198.19.1.0/24"]
    del a.peers["d"]
    a.peers["e"] = builder.peer_entry(builder.nodes["e"])
    a.write()

    result = tunnel.call("a", lambda now: device.reload())

    assert (result.added, result.removed, result.changed, result.unchanged) == (
        ("e",),
        ("d",),
        ("c",),
        ("b",),
    )
    assert result.summary() == (
        "1 peer added (e); 1 peer removed (d); 1 peer changed in place (c: allowed_ips); "
        "1 unchanged"
    )
    # unchanged: the very same session, no new handshake on either side
    assert tunnel.peer("a", "b").session is b_session
    assert tunnel.peer("a", "b").sessions_started == 1
    tunnel.round_trip("a", "b")
    assert tunnel.peer("b", "a").sessions_started == 1
    assert tunnel.peer("b", "a").session.stats.rx_packets > b_packets  # type: ignore[union-attr]
    # changed: a new session and the new route
    # c's allowed IPs changed: applied in place, as WireGuard does (same session)
    assert tunnel.peer("a", "c") is old_c and old_c.sessions_started == 1
    assert NET("198.19.1.0/24") in netlink.routes
    tunnel.wait_established([("a", "c"), ("a", "e")], timeout=5)
    tunnel.round_trip("a", "c")
    tunnel.nodes["a"].tun.inject(ping4("198.19.0.1", "198.19.1.9"))  # routed to c now
    tunnel.sim.run_for(0.05)
    assert [p[16:20] for p in tunnel.delivered("c")] == [bytes([198, 19, 1, 9])]
    # removed: no peer, no route, packets to it have no route
    assert "d" not in device.peers
    assert NET("198.19.0.4/32") not in netlink.routes
    no_route = device.status()["no_route"]
    tunnel.ping("a", "d")
    tunnel.sim.run_for(0.05)
    assert device.status()["no_route"] == no_route + 1
    assert tunnel.nodes["d"].tun.written == []
    # added: up and carrying traffic
    tunnel.round_trip("a", "e")
    assert device.status()["reloads"] == 1
    assert device.config.peers_by_name().keys() == {"b", "c", "e"}


def test_an_unchanged_reload_changes_nothing(tmp_path: Path) -> None:
    _, tunnel = hub_with_a_newcomer(tmp_path)
    sessions = {n: p.session for n, p in tunnel.devices["a"].peers.items()}
    calls = len(tunnel.nodes["a"].netlink.calls)
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert result.summary() == "nothing changed; 3 unchanged"
    assert {n: p.session for n, p in tunnel.devices["a"].peers.items()} == sessions
    assert len(tunnel.nodes["a"].netlink.calls) == calls


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda spec: spec.path.write_text("[interface\n"), "invalid TOML"),
        (lambda spec: spec.interface.update(listen="0.0.0.0:5900") or spec.write(), "listen"),
        (
            lambda spec: spec.peers["b"].update(allowed_ips=["198.19.0.3/32"]) or spec.write(),
            "allowed_ips",  # overlaps c's
        ),
        (lambda spec: spec.peers["b"].update(public_key="nope") or spec.write(), "public_key"),
    ],
    ids=["bad-toml", "needs-restart", "overlap", "bad-key"],
)
def test_a_refused_config_keeps_the_running_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: object, message: str
) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    device = tunnel.devices["a"]
    running = device.config
    sessions = {n: p.session for n, p in device.peers.items()}
    routes = dict(tunnel.nodes["a"].netlink.routes)
    edit(builder.nodes["a"])  # type: ignore[operator]
    caplog.set_level(logging.INFO)
    caplog.clear()
    with pytest.raises(ControlError, match=message) as info:
        tunnel.call("a", lambda now: device.reload())
    assert "\n" not in str(info.value)
    assert device.config is running
    assert {n: p.session for n, p in device.peers.items()} == sessions
    assert tunnel.nodes["a"].netlink.routes == routes
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0].getMessage()
    assert "Traceback" not in caplog.text
    assert device.status()["reloads_refused"] == 1
    notified = [kind for kind, _ in tunnel.nodes["a"].notifier.calls]
    assert notified[-3:] == ["reloading", "ready", "status"]  # systemd is told it is over
    for peer in "bcd":
        tunnel.round_trip("a", peer)  # the tunnel never noticed
    tunnel.sim.run_for(30)
    assert all(tunnel.established("a", p) for p in "bcd")


def test_sighup_reload_with_a_refused_config_does_not_raise(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    builder.nodes["a"].path.write_text("garbage = [")
    tunnel.call("a", tunnel.devices["a"].reload_logged)
    assert tunnel.devices["a"].status()["reloads_refused"] == 1
    tunnel.round_trip("a", "b")


def test_reload_after_the_private_key_became_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``--user`` the daemon may not read its root-owned 0600 key: an unchanged key
    needs no re-read, so a reload still works (it used to be refused). The test runs as
    root, who reads everything, so the dropped user's view is patched in."""
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a = builder.nodes["a"]
    key = a.directory / "id" / "id_ed25519"
    real_access, real_load = os.access, config_module.load_identity

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if Path(str(path)) == key:
            return False
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    def load_identity(path: object) -> object:
        if Path(str(path)) == key:
            raise IdentityError(f"{key}: cannot read: Permission denied")
        return real_load(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(config_module, "load_identity", load_identity)
    del a.peers["d"]
    a.write()
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert result.removed == ("d",)
    tunnel.round_trip("a", "b")


def test_reload_refuses_a_different_private_key(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a = builder.nodes["a"]
    write_identity(a.directory / "id", Identity.generate(), overwrite=True)
    with pytest.raises(ControlError, match="private_key"):
        tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    tunnel.round_trip("a", "b")


def test_reload_changes_interface_addresses(tmp_path: Path) -> None:
    builder, tunnel = hub_with_a_newcomer(tmp_path)
    a = builder.nodes["a"]
    a.interface["address"] = ["198.19.0.1/24", "198.19.5.1/24"]
    a.write()
    tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    addresses = [str(x) for x in tunnel.nodes["a"].netlink.addresses["sio0"]]
    assert addresses == ["198.19.0.1/24", "198.19.5.1/24"]
    tunnel.round_trip("a", "b")


def test_a_changed_peer_moving_an_allowed_ip_to_another_peer(tmp_path: Path) -> None:
    """198.19.1.0/24 moves from c to b in one reload: removals first, so the result is
    b owning it, with its route."""
    builder = ConfigBuilder(tmp_path)
    a = builder.add("a")
    b, c = builder.add("b"), builder.add("c")
    builder.connect(a, b)
    builder.connect(a, c, allowed_b=["198.19.0.3/32", "198.19.1.0/24"])
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    a.peers["c"]["allowed_ips"] = ["198.19.0.3/32"]
    a.peers["b"]["allowed_ips"] = ["198.19.0.2/32", "198.19.1.0/24"]
    a.write()
    result = tunnel.call("a", lambda now: tunnel.devices["a"].reload())
    assert set(result.changed) == {"b", "c"}
    tunnel.wait_established([("a", "b"), ("a", "c")], timeout=5)
    tunnel.nodes["a"].tun.inject(ping4("198.19.0.1", "198.19.1.7"))
    tunnel.sim.run_for(0.05)
    assert len(tunnel.delivered("b")) == 1
    assert tunnel.delivered("c") == []
    assert tunnel.nodes["a"].netlink.routes[NET("198.19.1.0/24")][0] == "sio0"
