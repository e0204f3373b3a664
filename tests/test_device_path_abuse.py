"""Whole devices against peers and attackers that abuse path sizing and addresses (review
of issue 10, findings 1-3), in memory over ``fakes``.

* An authenticated peer whose negotiation END reports a tiny size (the reviewer's
  ``evilpeer.py``: ``NegotiationControl.encode`` patched) used to make the daemon take
  it, log "payload size 10, route MTU 10" and die in ``fragment_message``.
* A re-negotiation after a peer restart that times out used to close the session.
* In a hub, a fresh datagram of one spoke, held back and sent from another spoke's
  address, used to strip that other spoke's endpoint: hub -> spoke traffic was dropped
  until the spoke's next datagram.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import Tunnel, WireDatagram, boot, hub_and_spokes, two_sites

from secureiod.secureio import MessageType, SecureioError, iter_messages, open_packet
from secureiod.secureio.constants import NEGOTIATION_FLAG_END
from secureiod.secureio.events import SessionState
from secureiod.secureio.negotiation import MIN_PAYLOAD_SIZE
from secureiod.secureio.negotiation_message import (
    _CONTROL,
    SUBTYPE_CONTROL,
    SUBTYPE_PONG,
    NegotiationControl,
)


@pytest.mark.parametrize("reported", [10, 25, 100])
def test_a_peer_reporting_a_tiny_path_size_cannot_take_the_daemon_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported: int
) -> None:
    """Both devices run in this process, so both ENDs lie: each side ignores the other's
    value, keeps what its own probing verified, and big packets cross in one datagram."""

    def lying_encode(self: NegotiationControl) -> bytes:
        flags = NEGOTIATION_FLAG_END if self.end else 0
        return _CONTROL.pack(SUBTYPE_CONTROL, reported, flags)

    monkeypatch.setattr(NegotiationControl, "encode", lying_encode)
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    for site, other in (("a", "b"), ("b", "a")):
        session = tunnel.peer(site, other).session
        assert session is not None
        assert session.payload_size == 1408  # a 1500-byte IPv4 path
        assert session.path_mtu_stats.remote_sizes_ignored == 1
        assert tunnel.peer(site, other).route_mtu == 1408
    sent = tunnel.sim.wire.stats.sent
    big = tunnel.ping("a", "b", 1, size=1400 - 28)
    tunnel.sim.run_for(0.2)
    assert tunnel.delivered("b") == [big]
    assert tunnel.sim.wire.stats.sent - sent <= 4  # not ~1,400 fragments
    tunnel.round_trip("b", "a", 2)


def test_a_floor_sized_report_is_honoured_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = NegotiationControl.encode
    monkeypatch.setattr(
        NegotiationControl,
        "encode",
        lambda self: honest(NegotiationControl(MIN_PAYLOAD_SIZE, self.end)),
    )
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    session = tunnel.peer("a", "b").session
    assert session is not None and session.payload_size == MIN_PAYLOAD_SIZE
    sent = tunnel.sim.wire.stats.sent
    big = tunnel.ping("a", "b", 1, size=576 - 28)  # the IPv4 route MTU floor
    tunnel.sim.run_for(0.2)
    assert tunnel.delivered("b") == [big]
    assert tunnel.sim.wire.stats.sent - sent <= 8  # 576 / 123 per fragment: 5, + acks


def test_a_renegotiation_that_times_out_keeps_the_peer_up(tmp_path: Path) -> None:
    """b restarts; none of the new b's pongs reach a, so a's re-negotiation of the path
    size gets no answer. a keeps the session at its size (it used to close it with
    "negotiation read timeout"), and its END lets the new b establish."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    a, b = tunnel.nodes["a"], tunnel.nodes["b"]
    peer_b = tunnel.peer("a", "b")
    session = peer_b.session
    assert session is not None
    old_remote = session.remote_session_id
    tunnel.devices["b"].close()
    tunnel.devices["b"] = boot(b, tunnel.builder.load("b"))

    def b_pong(dg: WireDatagram) -> bool:
        session = tunnel.devices["b"].peers["a"].session
        key = session._kx.send_key if session is not None else None
        if key is None:
            return False
        try:
            messages = open_packet(dg.data, [key]).messages
        except SecureioError:
            return False
        return any(
            m.type == MessageType.NEGOTIATION and m.payload[0] == SUBTYPE_PONG
            for m in iter_messages(messages)
        )

    tunnel.sim.wire.path(b.ip, a.ip).drop = b_pong
    tunnel.sim.wait_for(lambda: session.remote_session_id != old_remote, 5, "b's restart")
    tunnel.sim.run_for(15.0)  # the daemon's read timeout is 10 s
    assert peer_b.session is session and session.state == SessionState.ESTABLISHED
    assert session.path_mtu_stats.renegotiation_timeouts == 1
    assert session.payload_size == 1408
    tunnel.wait_established(timeout=5)
    tunnel.round_trip("a", "b", 1)
    tunnel.round_trip("b", "a", 2)


def test_a_spokes_fresh_datagram_from_another_spokes_address_leaves_its_endpoint(
    tmp_path: Path,
) -> None:
    """The reviewer's repro: s2's fresh datagram, held back, arrives from s1's address.
    The hub used to set s1's endpoint to None (path_takeovers=1) and drop hub -> s1
    traffic until s1's next datagram (up to 5 s)."""
    tunnel = Tunnel(hub_and_spokes(tmp_path, 2))
    tunnel.wait_established(timeout=5)
    s1_addr, s2_addr = tunnel.nodes["s1"].address, tunnel.nodes["s2"].address
    hub_addr = tunnel.nodes["hub"].address
    s2_ip, hub_ip = tunnel.nodes["s2"].ip, tunnel.nodes["hub"].ip
    captured = tunnel.sim.wire.capture(lambda dg: dg.src == s2_addr and dg.dst == hub_addr)
    tunnel.sim.wire.cut(s2_ip, hub_ip)
    tunnel.ping("s2", "hub", 1)
    tunnel.sim.run_for(0.05)
    tunnel.sim.wire.heal(s2_ip, hub_ip)
    tunnel.sim.wire.inject(s1_addr, hub_addr, captured[-1].data)
    tunnel.sim.run_for(0.01)
    hub = tunnel.devices["hub"]
    assert hub.demux.stats.path_takeovers == 1
    assert tunnel.peer("hub", "s1").endpoint == s1_addr
    # hub -> s1 at once, not after s1's next datagram
    packet = tunnel.ping("hub", "s1", 2)
    tunnel.sim.run_for(0.01)
    assert tunnel.delivered("s1") == [packet]
    # and both spokes are fully back after their next datagrams
    tunnel.round_trip("s1", "hub", 3)
    tunnel.round_trip("s2", "hub", 4)
    assert tunnel.peer("hub", "s2").endpoint == s2_addr
    assert hub.demux.owner_at(s1_addr) is tunnel.peer("hub", "s1")
    assert hub.demux.owner_at(s2_addr) is tunnel.peer("hub", "s2")
