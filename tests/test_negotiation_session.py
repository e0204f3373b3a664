"""Path-size negotiation inside a session, against a peer that lies or goes quiet (review
of issue 10, findings 1 and 2).

Two ``Session`` objects over ``wire_double.Link`` on a virtual clock. The lying peer is the
reviewer's ``evilpeer.py``: ``NegotiationControl.encode`` patched so every END reports a
chosen size. A session must never take such a size (it fragmented with no room after the
fragment header and the daemon died), and a re-negotiation that times out while the
session is established must keep the session and its size.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from identities import ID_A, ID_B
from wire_double import Link, PathRules

from secureiod.secureio import MessageType, SecureioError, iter_messages, open_packet
from secureiod.secureio.constants import KX_PACKET_SIZE, NEGOTIATION_FLAG_END
from secureiod.secureio.events import Closed, PeerRestarted, SessionState
from secureiod.secureio.identity import Identity
from secureiod.secureio.negotiation import MIN_PAYLOAD_SIZE, NegotiationOptions
from secureiod.secureio.negotiation_message import (
    _CONTROL,
    SUBTYPE_CONTROL,
    SUBTYPE_PONG,
    NegotiationControl,
)
from secureiod.secureio.session import Session, SessionOptions

RW = MessageType.READ_WRITE
P = 1392
OPTIONS = SessionOptions(
    send_delay=0.0,
    enable_fragmentation=True,
    negotiation=NegotiationOptions(read_timeout=10.0, total_timeout=60.0),  # the daemon's
)


def session(identity: Identity, peer: Identity, created: int, seed: int) -> Session:
    return Session(
        identity,
        peer.public_key,
        created_at_ns=created,
        options=OPTIONS,
        random=random.Random(seed).randbytes,
    )


def make_link(rules: PathRules | None = None) -> Link:
    a = session(ID_A, ID_B, 1_700_000_000_000_000_000, 1)
    b = session(ID_B, ID_A, 1_700_000_000_000_000_001, 2)
    link = Link(a, b, rules)
    link.start()
    return link


def both_established(link: Link) -> bool:
    return link.a.session.is_established and link.b.session.is_established


def restart_b(link: Link, rules_b_to_a: PathRules | None = None) -> Session:
    old = link.b.session
    new = session(ID_B, ID_A, old.session_id.created_at + 10**9, 9)
    new.set_endpoint(old.endpoint)
    link.b.session = new
    link.rules[id(new)] = rules_b_to_a or link.rules[id(old)]
    new.start(link.now)
    link.pump()
    return new


@pytest.fixture
def lying_end(monkeypatch: pytest.MonkeyPatch) -> dict[str, int | None]:
    """While ``lie["size"]`` is set, every END (ours too: one process) reports it."""
    lie: dict[str, int | None] = {"size": None}
    honest = NegotiationControl.encode

    def encode(self: NegotiationControl) -> bytes:
        if lie["size"] is None:
            return honest(self)
        flags = NEGOTIATION_FLAG_END if self.end else 0
        return _CONTROL.pack(SUBTYPE_CONTROL, lie["size"], flags)

    monkeypatch.setattr(NegotiationControl, "encode", encode)
    return lie


def send_and_count(link: Link, size: int) -> int:
    """A writes one message of ``size`` bytes; returns how many datagrams it took."""
    a = link.a.session
    sent_before = a.stats.tx_packets
    payload = random.Random(size).randbytes(size)
    a.write_message(RW, payload, link.now)  # send_delay 0: sealed at once
    datagrams = a.stats.tx_packets - sent_before
    link.pump()
    link.run(0.5)
    assert link.b.messages(RW)[-1] == payload
    return datagrams


@pytest.mark.parametrize("reported", [0, 10, 24, 25, 100, MIN_PAYLOAD_SIZE - 1])
def test_a_peer_reporting_a_tiny_size_cannot_shrink_us(
    lying_end: dict[str, int | None], reported: int
) -> None:
    """evilpeer.py with largest=10 made the daemon log "payload size 10" and die in
    ``fragment_message``; 25..100 made one 1400-byte packet ~1,400 datagrams."""
    lying_end["size"] = reported
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    a = link.a.session
    assert a.payload_size == P  # a's own probing: the path carries P
    assert a.path_mtu_stats.remote_sizes_ignored == 1
    assert send_and_count(link, 1400) == 2
    assert send_and_count(link, 65536) == -(-65536 // (P - 24))


def test_a_peer_reporting_the_floor_gets_it_and_fragments_stay_bounded(
    lying_end: dict[str, int | None],
) -> None:
    """147 is a size an honest peer can report (a 576-byte path): it is honoured, and a
    64 KiB message then takes 533 fragments, a 1400-byte packet 12."""
    lying_end["size"] = MIN_PAYLOAD_SIZE
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    assert link.a.session.payload_size == MIN_PAYLOAD_SIZE
    assert link.a.session.path_mtu_stats.remote_sizes_ignored == 0
    assert send_and_count(link, 1400) == 12
    assert send_and_count(link, 65536) == 533


def test_a_lying_end_after_a_peer_restart_keeps_a_sane_size(
    lying_end: dict[str, int | None],
) -> None:
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    lying_end["size"] = 10
    new_b = restart_b(link)
    link.run_until(lambda: new_b.is_established, timeout=10)
    link.run(1.0)
    a = link.a.session
    assert any(isinstance(e, PeerRestarted) for e in link.a.events)
    assert a.payload_size == P and a.path_mtu_stats.remote_sizes_ignored == 1
    assert send_and_count(link, 4000) == 3


def test_payload_size_limit_below_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="payload_size_limit"):
        SessionOptions(payload_size_limit=MIN_PAYLOAD_SIZE - 1)
    with pytest.raises(ValueError, match="payload_size_limit"):
        SessionOptions(payload_size_limit=10, negotiation=NegotiationOptions(enabled=False))
    assert SessionOptions(payload_size_limit=MIN_PAYLOAD_SIZE).payload_size_limit == 147


def pongs_of(link: Link) -> Callable[[bytes], bool]:
    """A drop rule for b's datagrams that carry a negotiation pong (b's pings pass)."""

    def drop(datagram: bytes) -> bool:
        key = link.b.session._kx.send_key
        if key is None:
            return False
        try:
            messages = open_packet(datagram, [key]).messages
        except SecureioError:
            return False  # key exchange
        return any(
            m.type == MessageType.NEGOTIATION and m.payload[0] == SUBTYPE_PONG
            for m in iter_messages(messages)
        )

    return drop


def test_a_renegotiation_that_times_out_keeps_the_established_session() -> None:
    """Finding 2: b restarts and a sizes the path again, but none of b's pongs reach a.
    At a's read timeout the session used to close ("negotiation read timeout"); now it
    keeps its size, counts the timeout, and its END lets the restarted b (whose own
    probing worked) finish too."""
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    a = link.a.session
    new_b = restart_b(link, PathRules(drop=pongs_of(link)))
    link.run(1.0)
    assert any(isinstance(e, PeerRestarted) for e in link.a.events)
    assert new_b.state == SessionState.NEGOTIATING  # waits for a's END
    link.run(OPTIONS.negotiation.read_timeout + 1)
    assert not any(isinstance(e, Closed) for e in link.a.events), a.close_reason
    assert a.state == SessionState.ESTABLISHED and a.payload_size == P
    assert a.path_mtu_stats.renegotiation_timeouts == 1
    assert new_b.is_established and new_b.payload_size == P
    assert send_and_count(link, 1000) == 1
    new_b.write_message(RW, b"and back", link.now)
    link.pump()
    link.run(0.5)
    assert link.a.messages(RW)[-1:] == [b"and back"]
    link.run(120.0)  # nothing is left pending that could close it later
    assert a.state == SessionState.ESTABLISHED


def test_a_renegotiation_with_a_peer_that_never_ends_keeps_the_session() -> None:
    """Nothing larger than a key exchange gets from the restarted b to a: b's own probing
    fails (its initial negotiation, its business), a's re-negotiation gets neither pongs
    nor an END. a stays established at its size through both of its timeouts."""
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    a = link.a.session
    restart_b(link, PathRules(max_datagram=KX_PACKET_SIZE))
    link.run(OPTIONS.negotiation.total_timeout + 1)
    assert any(isinstance(e, PeerRestarted) for e in link.a.events)
    assert not any(isinstance(e, Closed) for e in link.a.events), a.close_reason
    assert a.state == SessionState.ESTABLISHED and a.payload_size == P
    assert a.path_mtu_stats.renegotiation_timeouts == 1
    assert a.get_timer() is None or a.get_timer() > link.now  # nothing overdue


def test_a_renegotiation_refused_by_the_kernel_keeps_the_session() -> None:
    """EMSGSIZE even for the smallest probe while re-negotiating (a route change in the
    middle of it): the first negotiation fails on that, a re-negotiation keeps the size
    in use and counts it."""
    link = make_link()
    link.run_until(lambda: both_established(link), timeout=10)
    a = link.a.session
    sent_before = len(link.a.sent)
    restart_b(link, PathRules(drop=pongs_of(link)))  # keeps a's re-negotiation going
    link.run(1.0)
    assert any(isinstance(e, PeerRestarted) for e in link.a.events)
    smallest = MIN_PAYLOAD_SIZE + 53
    refused = [d for d in link.a.sent[sent_before:] if len(d) == smallest]
    a.report_too_big(smallest, link.now, refused[-1])
    link.pump()
    assert a.state == SessionState.ESTABLISHED and a.payload_size == P
    assert a.path_mtu_stats.renegotiation_timeouts == 1
    assert not any(isinstance(e, Closed) for e in link.a.events)
    assert send_and_count(link, 1000) == 1


def test_both_sides_establish_over_a_lossy_reordering_path() -> None:
    """A netns stress run (5 % loss, 10 % reordered) once left b in Negotiating for 15 s:
    all three of a's back-to-back ENDs were lost while a was established. 400 handshakes
    over 20 % loss must all reach Established on both sides within 10 virtual seconds
    (before the late END copies, 6 of 300 hung)."""
    hung = []
    for seed in range(400):
        a = session(ID_A, ID_B, 1_700_000_000_000_000_000, 2 * seed + 1)
        b = session(ID_B, ID_A, 1_700_000_000_000_000_001, 2 * seed + 2)
        link = Link(a, b, PathRules(loss=0.2, reorder=0.1), seed=seed)
        link.start()
        link.run(10.0, until=lambda link=link: both_established(link))
        if not (a.is_established and b.is_established):
            hung.append((seed, a.state.name, b.state.name))
    assert hung == []
