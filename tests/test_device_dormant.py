"""Peers without an endpoint wait with no session (issue 13: 10,000 configured peers): no
keys, no timer, ~200 bytes each, until their own signed key exchange arrives; then they
handshake as any other peer. Whole devices over the in-memory world of ``fakes``."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import Tunnel, hub_and_spokes, two_sites

from secureiod.secureio.demux import fallback_key_for
from secureiod.secureio.events import SessionState
from secureiod.secureio.identity import Identity
from secureiod.secureio.session import Session, SessionOptions


def test_an_uncontacted_peer_has_no_session_and_schedules_nothing(tmp_path: Path) -> None:
    one = Tunnel(hub_and_spokes(tmp_path / "one", spokes=1), start=["hub"])
    many = Tunnel(hub_and_spokes(tmp_path / "many", spokes=5), start=["hub"])
    for tunnel in (one, many):
        tunnel.sim.run_for(60)
        hub = tunnel.devices["hub"]
        for peer in hub.peers.values():
            assert peer.dormant and peer.session is None and peer.timer is None
            assert peer.state is SessionState.NEW
            assert peer.describe(tunnel.sim.now)["state"] == "new"
            assert hub.demux.is_dormant(peer) and peer in hub.demux
        assert tunnel.nodes["hub"].udp.stats.tx_datagrams == 0
    # Five waiting peers cost the loop no more timers than one.
    assert many.nodes["hub"].loop.timers() == one.nodes["hub"].loop.timers()


def test_dormant_peers_wake_on_their_key_exchange_and_carry_traffic(tmp_path: Path) -> None:
    tunnel = Tunnel(hub_and_spokes(tmp_path, spokes=3), start=["hub"])
    tunnel.sim.run_for(5)
    for spoke in ("s1", "s2", "s3"):
        tunnel.start(spoke)
    tunnel.wait_established(timeout=10)
    hub = tunnel.devices["hub"]
    assert hub.demux.stats.woken == 3
    for spoke in ("s1", "s2", "s3"):
        peer = tunnel.peer("hub", spoke)
        assert not peer.dormant and peer.sessions_started == 1
        assert not hub.demux.is_dormant(peer)
        tunnel.round_trip(spoke, "hub")
        tunnel.round_trip("hub", spoke, 2)
    # Awake, it lives like any peer: keepalives keep it up, no restarts.
    tunnel.sim.run_for(60)
    for spoke in ("s1", "s2", "s3"):
        assert tunnel.established("hub", spoke)
        assert tunnel.peer("hub", spoke).counters.restarts == 0


def test_a_dormant_psk_peer_wakes(tmp_path: Path) -> None:
    """The PSK's aux key opens its key exchange: the dormant entry must hold the same
    fallback key its session would."""
    tunnel = Tunnel(two_sites(tmp_path, a_knows_b=False, psk=b"p" * 32), start=["a"])
    assert tunnel.peer("a", "b").dormant
    tunnel.start("b")
    tunnel.wait_established(timeout=10)
    assert tunnel.devices["a"].demux.stats.woken == 1
    tunnel.round_trip("a", "b")


def test_a_stranger_wakes_nobody(tmp_path: Path) -> None:
    """A key exchange signed by a key the hub does not know (however well formed) makes
    no session: only the configured key can wake its peer."""
    builder = hub_and_spokes(tmp_path, spokes=1)
    hub, s1 = builder.nodes["hub"], builder.nodes["s1"]
    stranger = builder.add("x")
    stranger.peers["hub"] = builder.peer_entry(hub)  # x knows the hub; the hub not x
    # ... and x claims s1's tunnel addresses: no matter, its key is not s1's.
    tunnel = Tunnel(builder, start=["hub", "x"])
    tunnel.sim.run_for(10)
    device = tunnel.devices["hub"]
    assert device.demux.stats.woken == 0
    assert tunnel.peer("hub", "s1").dormant
    assert tunnel.nodes["x"].udp.stats.tx_datagrams > 0  # it did try
    assert s1.name in device.peers


def test_reload_removes_a_dormant_peer(tmp_path: Path) -> None:
    builder = hub_and_spokes(tmp_path, spokes=2)
    tunnel = Tunnel(builder, start=["hub"])
    device = tunnel.devices["hub"]
    gone = tunnel.peer("hub", "s2")
    del builder.nodes["hub"].peers["s2"]
    builder.nodes["hub"].write()
    tunnel.call("hub", lambda now: device.reload())
    assert "s2" not in device.peers and gone not in device.demux
    tunnel.start("s1")
    tunnel.wait_established([("hub", "s1"), ("s1", "hub")], timeout=10)


@pytest.mark.parametrize("psk", [None, b"k" * 32])
def test_fallback_key_for_matches_the_session(psk: bytes | None) -> None:
    options = SessionOptions(psk=psk)
    session = Session(Identity.generate(), None, created_at_ns=1, options=options)
    assert fallback_key_for(options) == session.fallback_key
