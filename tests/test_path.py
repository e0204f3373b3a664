"""Path validation in the sans-IO core: who may move a session's endpoint (issue 10 item 1).

In memory, over the wire double: A at ADDR_A, B at ADDR_B, an attacker at EVE. The rule
under test: a datagram from an address other than the endpoint moves it only if it opened
under a session key, passed the replay window and is newer than anything accepted, or if
it carried a signed key exchange that restarted the remote session, or one that brought a
new key while no session packet vouches for the path (the handshake, or the peer quiet
for 15 s). More on replayed key exchanges in ``test_kx_hardening.py``.
"""

from __future__ import annotations

import random

from identities import ID_A, ID_B
from wire_double import ADDR_A, ADDR_B, Link, PathRules

from secureiod.secureio import MessageType, PacketKey, open_packet
from secureiod.secureio.constants import KX_PACKET_SIZE
from secureiod.secureio.events import Event, PathChanged, SessionState
from secureiod.secureio.keyexchange import KeyExchangeOptions
from secureiod.secureio.path import Address, path_key, same_path
from secureiod.secureio.session import Session, SessionOptions

RW = MessageType.READ_WRITE
EVE: Address = ("203.0.113.66", 40000)
ROAMED: Address = ("198.18.7.7", 61000)


def make_link(
    options: SessionOptions | None = None,
    *,
    b_passive: bool = False,
    seed: int = 1,
    rules: PathRules | None = None,
) -> Link:
    rng = random.Random(seed)
    opt = options or SessionOptions(send_delay=0)
    a = Session(
        ID_A,
        ID_B.public_key,
        created_at_ns=1_700_000_000_000_000_000,
        options=opt,
        random=rng.randbytes,
        endpoint=ADDR_B,
    )
    b = Session(
        ID_B,
        ID_A.public_key,
        created_at_ns=1_700_000_000_000_000_001,
        options=opt,
        random=rng.randbytes,
        endpoint=None if b_passive else ADDR_A,
    )
    link = Link(a, b, rules or PathRules(), seed=seed, set_endpoints=False)
    link.start()
    return link


def established(link: Link) -> Link:
    link.run_until(lambda: link.a.session.is_established and link.b.session.is_established)
    return link


def path_changes(events: list[Event]) -> list[PathChanged]:
    return [e for e in events if isinstance(e, PathChanged)]


def kx_datagrams(sent: list[bytes]) -> list[bytes]:
    return [d for d in sent if len(d) == KX_PACKET_SIZE]


def take_output(session: Session, now: float) -> list[bytes]:
    """What ``session`` would send now, kept off the wire (as a capture would see it)."""
    return [d for d, _ in session.datagrams_to_send(now)]


# -- the four regression cases of the issue ----------------------------------------------------


def test_replayed_key_exchange_from_another_address_never_moves_the_endpoint() -> None:
    """Issue 10 row 1: a captured clear key exchange of A, replayed to B from another address
    every 20 ms, diverted B's traffic for A to the attacker."""
    link = established(make_link())
    link.run_past_late_ends()
    a, b = link.a.session, link.b.session
    captured = kx_datagrams(link.a.sent)
    newest, oldest = captured[-1], captured[0]  # validly signed, carrying A's current key
    rx_before = b.stats.rx_packets
    for i in range(250):  # five virtual seconds
        link.inject(link.b, newest if i % 2 else oldest, src=EVE)
        a.write_message(RW, b"a%d" % i, link.now)
        b.write_message(RW, b"b%d" % i, link.now)
        link.pump()
        link.run(0.02)
        assert b.endpoint == ADDR_A
    link.run(0.5)
    assert path_changes(link.b.events) == []
    assert link.elsewhere == []  # nothing of B's went to the attacker
    assert link.a.messages(RW) == [b"b%d" % i for i in range(250)]
    assert link.b.messages(RW) == [b"a%d" % i for i in range(250)]
    # The replays did pass the signature check (they are A's genuine messages): what kept
    # the endpoint is that they changed nothing, not a budget or a broken signature.
    assert b.stats.rx_kx_duplicates >= 250
    assert b.stats.rx_packets - rx_before == 250  # the data only: replays are not "received"
    assert b.state == SessionState.ESTABLISHED


def test_genuine_datagram_and_replayed_copy_in_one_batch() -> None:
    """Issue 10 row 2: a genuine datagram and a copy of it from another address in the same
    read batch moved the endpoint to the copy (the old test was ``last_received == now``)."""
    link = established(make_link())
    a, b = link.a.session, link.b.session
    a.write_message(RW, b"first", link.now)
    first = take_output(a, link.now)[0]
    a.write_message(RW, b"second", link.now)
    second = take_output(a, link.now)[0]
    # Genuine first, then its copy from Eve.
    link.deliver_now([(link.b, first, ADDR_A), (link.b, first, EVE)])
    assert b.endpoint == ADDR_A
    # A copy Eve kept of an earlier datagram first, then the genuine one: both orders. (A copy
    # of a datagram B has not seen yet is indistinguishable from the original: it is the
    # first of the two to arrive, and whoever sends first is where the peer is.)
    link.deliver_now([(link.b, first, EVE), (link.b, second, ADDR_A)])
    assert b.endpoint == ADDR_A
    assert link.b.messages(RW) == [b"first", b"second"]
    assert b.stats.drops["replay"] == 2
    # The same with a key exchange that changes the key state (A's next rotation).
    old_kx = kx_datagrams(link.a.sent)[-1]
    link.now += a.options.key_exchange.key_update_interval
    a.handle_timer(link.now)
    rekey = [d for d in take_output(a, link.now) if len(d) == KX_PACKET_SIZE]
    assert len(rekey) == 1
    link.deliver_now([(link.b, rekey[0], ADDR_A), (link.b, rekey[0], EVE)])
    assert b.endpoint == ADDR_A
    link.deliver_now([(link.b, old_kx, EVE), (link.b, rekey[0], ADDR_A), (link.b, old_kx, EVE)])
    assert b.endpoint == ADDR_A
    assert path_changes(link.b.events) == []
    assert link.elsewhere == []


def test_roaming_follows_the_first_newer_authenticated_datagram_once() -> None:
    link = established(make_link())
    a, b = link.a.session, link.b.session
    link.a.address = ROAMED  # A's datagrams now come from a new address (a NAT rebinding)
    for i in range(20):
        a.write_message(RW, b"m%d" % i, link.now)
        link.pump()
        link.run(0.01)
    assert b.endpoint == ROAMED
    assert path_changes(link.b.events) == [PathChanged(ADDR_A, ROAMED)]
    b.write_message(RW, b"reply", link.now)
    link.pump()
    link.run(0.1)
    assert link.a.messages(RW) == [b"reply"]
    assert link.elsewhere == []
    assert a.endpoint == ADDR_B and path_changes(link.a.events) == []


def test_roaming_by_key_exchange_alone() -> None:
    """No data flowing: A's next rotation (a key exchange that changes the key state) is
    enough evidence, since nothing has been heard from A's old address for a minute."""
    link = established(make_link())
    b = link.b.session
    link.a.address = ROAMED
    link.run(link.a.session.options.key_exchange.key_update_interval + 1)
    assert b.endpoint == ROAMED
    assert path_changes(link.b.events) == [PathChanged(ADDR_A, ROAMED)]
    # Only what B sent before it knew (its own rotation, at the same time) went astray.
    assert {dst for dst, _ in link.elsewhere} <= {ADDR_A}
    stray = len(link.elsewhere)
    b.write_message(RW, b"found you", link.now)
    link.pump()
    link.run(0.1)
    assert link.a.messages(RW) == [b"found you"]
    assert len(link.elsewhere) == stray
    assert link.a.session.state == b.state == SessionState.ESTABLISHED


def test_a_new_key_does_not_move_a_path_the_peer_is_heard_on() -> None:
    """While session packets keep coming, a key exchange with a new key is no proof of
    where the peer is (the key may be an old one this session of ours never saw, captured
    before it began). A's rotation from a new address changes the keys but not the path;
    A's next session packet from there moves it (in the daemon: a keepalive within 5 s)."""
    link = established(make_link())
    a, b = link.a.session, link.b.session
    assert a.options.key_exchange.key_update_interval == 60.0
    for _ in range(11):  # A speaks every 5 s until just before its rotation
        a.write_message(RW, b"tick", link.now)
        link.pump()
        link.run(5.0)
    assert b.key_rotations[1] == 1
    link.a.address = ROAMED
    link.run(6.0)  # A's rotation request comes from ROAMED
    assert b.key_rotations[1] == 2  # b took A's new key...
    assert b.endpoint == ADDR_A  # ...but not its address
    assert path_changes(link.b.events) == []
    a.write_message(RW, b"here now", link.now)
    link.pump()
    link.run(0.1)
    assert link.b.messages(RW)[-1:] == [b"here now"]
    assert b.endpoint == ROAMED
    assert path_changes(link.b.events) == [PathChanged(ADDR_A, ROAMED)]
    link.run(a.options.key_exchange.retry_interval + 0.1)  # b's answer now reaches A
    b.write_message(RW, b"found you", link.now)
    link.pump()
    link.run(0.1)
    assert link.a.messages(RW) == [b"found you"]
    assert a.key_rotations[0] == 2
    assert a.state == b.state == SessionState.ESTABLISHED


def test_late_older_datagram_from_another_address_does_not_move_it() -> None:
    link = established(make_link())
    a, b = link.a.session, link.b.session
    a.write_message(RW, b"older", link.now)
    older = take_output(a, link.now)[0]
    a.write_message(RW, b"newer", link.now)
    newer = take_output(a, link.now)[0]
    link.deliver_now([(link.b, newer, ADDR_A)])
    link.deliver_now([(link.b, older, ROAMED)])  # genuine, unseen, but older: delivered only
    assert link.b.messages(RW) == [b"newer", b"older"]
    assert b.endpoint == ADDR_A
    assert path_changes(link.b.events) == []


# -- first contact, application addresses, details ---------------------------------------------


def test_passive_peer_learns_the_address_on_first_contact_without_waiting_a_retry() -> None:
    link = make_link(b_passive=True)
    b = link.b.session
    start = link.now
    established(link)
    assert b.endpoint == ADDR_A
    assert path_changes(link.b.events) == [PathChanged(None, ADDR_A)]
    # B's own request at start had nowhere to go; it is re-sent on contact instead of
    # after the 1 s retry interval.
    assert b.stats.drops["no-endpoint"] >= 1
    assert link.now - start < 0.5


def test_nothing_is_sent_without_an_endpoint() -> None:
    link = make_link(b_passive=True, rules=PathRules(loss=1.0))  # A never reaches B
    link.run(3.0)
    b = link.b.session
    assert b.endpoint is None
    assert link.b.sent == []
    assert b.stats.drops["no-endpoint"] >= 3  # the first request and its retries


def test_set_endpoint_redirects_without_an_event() -> None:
    link = established(make_link())
    b = link.b.session
    b.set_endpoint(EVE)
    b.write_message(RW, b"to eve", link.now)
    link.pump()
    assert b.endpoint == EVE
    assert [dst for dst, _ in link.elsewhere] == [EVE]
    assert path_changes(link.b.events) == []


def test_replayed_key_exchange_does_not_count_as_liveness() -> None:
    link = established(make_link())
    b = link.b.session
    captured = kx_datagrams(link.a.sent)[-1]
    link.run(5.0)
    last = b.last_received
    link.inject(link.b, captured)  # from A's own address, even
    link.run(0.01)
    assert b.last_received == last


def test_forged_and_unsigned_datagrams_from_another_address_move_nothing() -> None:
    link = established(make_link())
    b = link.b.session
    opened = open_packet(kx_datagrams(link.a.sent)[-1], [PacketKey.clear()])
    from secureiod.secureio import seal

    tampered = bytearray(opened.messages)
    tampered[-1] ^= 1  # breaks the signature
    for datagram in (b"\x00" * 100, seal(PacketKey.clear(), 99, bytes(tampered))):
        link.inject(link.b, datagram, src=EVE)
    link.run(0.1)
    assert b.endpoint == ADDR_A
    assert b.stats.drops["kx-bad-signature"] == 1


def test_without_a_replay_window_only_key_exchange_moves_the_path() -> None:
    opt = SessionOptions(send_delay=0, replay_window=-1)
    link = established(make_link(opt))
    a, b = link.a.session, link.b.session
    link.a.address = ROAMED
    a.write_message(RW, b"data", link.now)
    link.pump()
    link.run(0.1)
    assert link.b.messages(RW) == [b"data"]
    assert b.endpoint == ADDR_A  # data cannot prove it is not a replay here
    link.run(a.options.key_exchange.key_update_interval + 1)
    assert b.endpoint == ROAMED


def test_peer_restart_from_a_new_address_moves_the_path() -> None:
    link = established(make_link(SessionOptions(key_exchange=KeyExchangeOptions())))
    old_a = link.a.session
    new_a = Session(
        ID_A,
        ID_B.public_key,
        created_at_ns=old_a.session_id.created_at + 10**9,
        random=random.Random(3).randbytes,
        endpoint=ADDR_B,
    )
    link.a.session = new_a
    link.rules[id(new_a)] = link.rules[id(old_a)]
    link.a.address = ROAMED
    new_a.start(link.now)
    link.pump()
    link.run_until(lambda: new_a.is_established)
    assert link.b.session.endpoint == ROAMED


def test_ipv6_flowinfo_is_not_a_new_path_but_scope_id_is() -> None:
    base: Address = ("fd00:5ec::1", 5800, 0, 0)
    assert same_path(base, ("fd00:5ec::1", 5800, 12345, 0))
    assert not same_path(base, ("fd00:5ec::1", 5800, 0, 2))
    assert not same_path(base, ("fd00:5ec::1", 5801, 0, 0))
    assert same_path(None, None) and not same_path(None, base)
    assert path_key(base) == ("fd00:5ec::1", 5800, 0)
    assert path_key(("198.18.0.1", 1)) == ("198.18.0.1", 1)

    link = established(make_link())
    a, b = link.a.session, link.b.session
    b.set_endpoint(base)
    for src in (("fd00:5ec::1", 5800, 777, 0), ("fd00:5ec::1", 5800, 0, 3)):
        a.write_message(RW, b"x", link.now)
        link.deliver_now([(link.b, take_output(a, link.now)[0], src)])
    assert path_changes(link.b.events) == [PathChanged(base, ("fd00:5ec::1", 5800, 0, 3))]


def test_aggregated_batch_goes_out_when_drained_after_its_deadline() -> None:
    link = established(make_link(SessionOptions(send_delay=0.01)))
    a = link.a.session
    a.write_message(RW, b"batched", link.now)
    assert a.datagrams_to_send(link.now) == []
    out = a.datagrams_to_send(link.now + 0.02)
    assert [dst for _, dst in out] == [ADDR_B]
    assert ADDR_B != ADDR_A  # (sanity: the wire double's two addresses differ)
