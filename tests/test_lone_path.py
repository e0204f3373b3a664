"""The lone-packet path (issue 13, ping latency): ``Session.seal_message_now`` and
``Session.take_lone_message``, and the send and receive paths that use them for the only
packet of a wake-up.

They are shortcuts, not a second set of rules: each is checked against the general path
(``write_message`` + ``flush`` + ``datagrams_to_send``; ``next_event``) on twin sessions
built from the same seeds, which must give the same bytes, counters, timers and drops.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fakes import Tunnel, ipv4, ping4, two_sites
from identities import ID_A, ID_B

from secureiod.daemon.peer import DATA_TYPE
from secureiod.daemon.receive import ReceivePath
from secureiod.secureio import MessageType
from secureiod.secureio.errors import MalformedError, PayloadTooBigError
from secureiod.secureio.events import MessageReceived, PathChanged, SessionState, StateChanged
from secureiod.secureio.identity import Identity
from secureiod.secureio.keyexchange import KeyExchangeOptions
from secureiod.secureio.session import (
    QueueFullError,
    Session,
    SessionClosedError,
    SessionOptions,
)

ADDR_A = ("198.18.0.1", 5800)
ADDR_B = ("198.18.0.2", 5800)
RW = MessageType.READ_WRITE


def _session(identity: Identity, remote: Identity, seed: int, endpoint: Any, **kw: Any) -> Session:
    opt = SessionOptions(key_exchange=KeyExchangeOptions(key_update_interval=3.0), **kw)
    return Session(
        identity,
        remote.public_key,
        created_at_ns=1_700_000_000_000_000_000 + seed,
        options=opt,
        random=random.Random(seed).randbytes,
        endpoint=endpoint,
    )


def _established(**kw: Any) -> tuple[Session, Session, float]:
    """A and B established (deterministically: seeded randomness, fixed times), both
    sessions' outputs taken and events drained; returns them and the time."""
    a = _session(ID_A, ID_B, 1, ADDR_B, **kw)
    b = _session(ID_B, ID_A, 2, ADDR_A, **kw)
    now = 1000.0
    a.start(now)
    b.start(now)
    for _ in range(40):
        a.flush(now)
        b.flush(now)
        for d, _ in a.datagrams_to_send(now):
            b.receive_datagram(d, ADDR_A, now)
        for d, _ in b.datagrams_to_send(now):
            a.receive_datagram(d, ADDR_B, now)
        now += 0.05
        a.handle_timer(now)
        b.handle_timer(now)
    assert a.is_established and b.is_established
    for s in (a, b):
        s.flush(now)
        assert not s.datagrams_to_send(now)
        while s.next_event() is not None:
            pass
        s.take_lone_message()  # settle: the handshake's updates are behind us
    return a, b, now


def _state(s: Session) -> dict[str, Any]:
    """Everything a send can change, for before/after comparisons."""
    return {
        "stats": asdict(s.stats),
        "next_pid": s._next_pid,
        "last_sent": s.last_sent,
        "largest_sent": s._largest_sent,
        "timer": s.get_timer(),
        "out": list(s._out),
        "batch": list(s._batch),
        "queued": list(s._queued),
    }


def _general_send(s: Session, payload: bytes, now: float) -> list[tuple[bytes, Any]]:
    """What the daemon's general path does with one packet: write, flush, transmit."""
    s.write_message(RW, payload, now)
    s.flush(now)
    return s.datagrams_to_send(now)


# -- seal_message_now -------------------------------------------------------------------------


@pytest.mark.parametrize("send_delay", [50e-6, 0.0])
@pytest.mark.parametrize("psk", [None, b"a pre-shared key"])
def test_seal_message_now_is_the_general_path_byte_for_byte(
    send_delay: float, psk: bytes | None
) -> None:
    fast_a, fast_b, now = _established(send_delay=send_delay, psk=psk)
    slow_a, slow_b, now2 = _established(send_delay=send_delay, psk=psk)
    assert now == now2 and _state(fast_a) == _state(slow_a)
    rng = random.Random(7)
    for size in (84, 0, 1, 300, 512, 84, 200):
        payload = rng.randbytes(size)
        now += 0.02
        sealed = fast_a.seal_message_now(RW, payload, now)
        assert sealed is not None, size
        assert [sealed] == _general_send(slow_a, payload, now)
        assert sealed[1] == ADDR_B
        assert _state(fast_a) == _state(slow_a)
        for b in (fast_b, slow_b):
            b.receive_datagram(sealed[0], ADDR_A, now)
        assert fast_b.next_event() == slow_b.next_event() == MessageReceived(RW, payload)


def _declines(s: Session, payload: bytes, now: float, mtype: int = RW) -> None:
    before = _state(s)
    assert s.seal_message_now(mtype, payload, now) is None
    assert _state(s) == before


def test_seal_message_now_declines_whenever_the_general_path_has_more_to_do() -> None:
    a, _, now = _established(send_delay=50e-6)
    # something batched: the message joins it (one datagram for both)
    a.write_message(RW, b"first", now)
    _declines(a, b"second", now)
    a.flush(now)
    # something sealed but not yet taken: it goes first
    _declines(a, b"third", now)
    assert len(a.datagrams_to_send(now)) == 1
    # internal types, and payloads above the packet size, are write_message's to refuse
    _declines(a, b"x" * 10, now, MessageType.KEY_EXCHANGE)
    _declines(a, b"x" * (a.payload_size + 1), now)
    # no endpoint: the general path counts the drop
    a.set_endpoint(None)
    _declines(a, b"ping", now)
    a.set_endpoint(ADDR_B)
    assert a.seal_message_now(RW, b"ping", now) is not None
    a.close(now)
    _declines(a, b"ping", now)


def test_seal_message_now_declines_before_establishment() -> None:
    a = _session(ID_A, ID_B, 1, ADDR_B)
    _declines(a, b"ping", 1000.0)
    a.start(1000.0)
    _declines(a, b"ping", 1000.0)


def test_seal_message_now_leaves_the_prober_deadline_to_the_general_path() -> None:
    """A first large message gives the path prober a confirmation deadline: that moves
    ``get_timer`` earlier, which the caller must see, so it takes the general path."""
    a, _, now = _established()
    assert a._prober.active  # path MTU tracking is on by default: the case exists
    a._largest_sent = 0
    _declines(a, b"x" * 1000, now)
    # once as large a message went out, the same size changes no deadline
    assert _general_send(a, b"x" * 1000, now)
    assert a.seal_message_now(RW, b"y" * 1000, now) is not None


# -- take_lone_message ------------------------------------------------------------------------


def test_take_lone_message_is_next_event_for_a_lone_data_datagram() -> None:
    a, b, now = _established()
    payload = b"\x45" + bytes(83)
    a.write_message(RW, payload, now)
    ((datagram, _),) = _general_send(a, b"", now)  # both messages in one datagram
    b.receive_datagram(datagram, ADDR_A, now)
    # two messages in one datagram: not lone
    assert b.take_lone_message() is None
    assert b.next_event() == MessageReceived(RW, payload)
    assert b.next_event() == MessageReceived(RW, b"")
    timer = b.get_timer()
    for i in range(5):
        now += 0.02
        sealed = a.seal_message_now(RW, bytes([i]) * 84, now)
        assert sealed is not None
        b.receive_datagram(sealed[0], ADDR_A, now)
        assert b.take_lone_message() == MessageReceived(RW, bytes([i]) * 84)
        assert b.next_event() is None
        assert b.get_timer() == timer
        # the same datagram again is a replay: nothing to deliver
        b.receive_datagram(sealed[0], ADDR_A, now)
        assert b.take_lone_message() is None
        assert b.stats.drops["replay"] == i + 1


def test_take_lone_message_leaves_other_events_and_output_to_the_general_path() -> None:
    a, b, now = _established()
    # an event queued before: the message stays behind it
    d1 = a.seal_message_now(RW, b"one", now)
    d2 = a.seal_message_now(RW, b"two", now)
    assert d1 is not None and d2 is not None
    b.receive_datagram(d1[0], ADDR_A, now)
    b.receive_datagram(d2[0], ADDR_A, now)
    assert b.take_lone_message() is None
    assert [b.next_event(), b.next_event(), b.next_event()] == [
        MessageReceived(RW, b"one"),
        MessageReceived(RW, b"two"),
        None,
    ]
    # output waiting to be sent: the caller must transmit it
    b.write_message(RW, b"reply", now)
    d3 = a.seal_message_now(RW, b"three", now)
    assert d3 is not None
    b.receive_datagram(d3[0], ADDR_A, now)
    assert b.take_lone_message() is None
    assert b.next_event() == MessageReceived(RW, b"three")
    # a new path: PathChanged comes first
    d4 = a.seal_message_now(RW, b"four", now)
    assert d4 is not None
    b.flush(now)
    b.datagrams_to_send(now)
    b.receive_datagram(d4[0], ("198.18.0.7", 5800), now)
    assert b.take_lone_message() is None


def test_take_events_is_next_event_all_at_once() -> None:
    a, b, now = _established()
    for payload in (b"1", b"22", b"333"):
        a.write_message(RW, payload, now)  # aggregated: one datagram, three messages
    ((datagram, _),) = _general_send(a, b"4444", now)
    before = b.stats.rx_messages
    b.receive_datagram(datagram, ADDR_A, now)
    assert b.stats.rx_messages == before + 4
    assert b.take_events() == [MessageReceived(RW, p) for p in (b"1", b"22", b"333", b"4444")]
    assert b.take_events() == [] and b.next_event() is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_lone_message_never_hides_an_earlier_deadline(seed: int) -> None:
    """Over key rotations (every 3 s), lost answers, path changes and replays: whenever
    ``take_lone_message`` hands a message back, ``get_timer`` did not move earlier and
    nothing else was pending, and the messages delivered are exactly those that the
    general path (``next_event``) delivers on a twin."""
    fast_a, fast_b, now = _established()
    slow_a, slow_b, _ = _established()
    rng = random.Random(seed)
    lone = watched_lone = 0
    delivered: list[list[Any]] = [[], []]
    sent: list[bytes] = []
    for step in range(400):
        now += rng.choice((0.005, 0.02, 0.1, 0.4))
        for i, (a, b) in enumerate(((fast_a, fast_b), (slow_a, slow_b))):
            for s in (a, b):
                timer = s.get_timer()
                if timer is not None and timer <= now:
                    s.handle_timer(now)
            payload = step.to_bytes(2, "big") * rng.randrange(1, 40) if i == 0 else sent[-1]
            if i == 0:
                sent.append(payload)
            a.write_message(RW, payload, now)
            a.flush(now)
            datagrams = [d for d, _ in a.datagrams_to_send(now)]
            if step % 37 == 5 and datagrams:
                datagrams.append(datagrams[-1])  # a replay
            for d in datagrams:
                before = b.get_timer()
                watched = b._kx.watching  # a key slot that may arm a nudge on use
                src = ADDR_A if step % 97 != 50 else ("198.18.0.7", 5800)
                b.receive_datagram(d, src, now)
                if i == 0:
                    ev = b.take_lone_message()
                    watched_lone += watched and ev is not None
                    if ev is not None:
                        lone += 1
                        after = b.get_timer()
                        assert before is None or (after is not None and after >= before)
                        assert b.next_event() is None
                        delivered[0].append(ev)
                while (ev := b.next_event()) is not None:
                    if type(ev) is MessageReceived:
                        delivered[i].append(ev)
            b.flush(now)
            for d, _ in b.datagrams_to_send(now):
                if step % 7 != 3:  # lost answers: A goes on with its previous key a while
                    a.receive_datagram(d, ADDR_B, now)
            while a.next_event() is not None:
                pass
    assert delivered[0] == delivered[1]
    assert len(sent) - 10 < len(delivered[0]) <= len(sent)
    assert fast_a.key_rotations[0] > 3  # the rotations happened
    assert lone > len(sent) // 2
    assert watched_lone == 0


# -- the daemon ------------------------------------------------------------------------------


class Spy:
    """Counts what the session shortcuts hand back (to show the lone path ran), or turns
    them off (the general path, for comparison)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, off: bool = False) -> None:
        self.sealed = self.taken = 0
        seal, take = Session.seal_message_now, Session.take_lone_message

        def seal_now(s: Session, *args: Any) -> Any:
            result = None if off else seal(s, *args)
            self.sealed += result is not None
            return result

        def take_lone(s: Session) -> Any:
            result = None if off else take(s)
            self.taken += result is not None
            return result

        monkeypatch.setattr(Session, "seal_message_now", seal_now)
        monkeypatch.setattr(Session, "take_lone_message", take_lone)


def _pings(tunnel: Tunnel, count: int) -> None:
    for seq in range(1, count + 1):
        tunnel.round_trip("a", "b", seq)
        tunnel.sim.run_for(0.02)


@pytest.mark.parametrize("vnet", [False, True])
def test_pings_take_the_lone_path_and_count_as_the_general_path_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vnet: bool
) -> None:
    results = []
    for off in (False, True):
        with monkeypatch.context() as m:
            spy = Spy(m, off=off)
            tunnel = Tunnel(two_sites(tmp_path / str(off)), vnet_hdr=("a", "b") if vnet else ())
            tunnel.wait_established(timeout=5)
            _pings(tunnel, 20)
            counters = {
                site: {
                    k: v
                    for k, v in asdict(tunnel.peer(site, other).counters).items()
                    if k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drops")
                }
                for site, other in (("a", "b"), ("b", "a"))
            }
            stats = {
                site: {
                    k: v
                    for k, v in asdict(tunnel.peer(site, other).session.stats).items()  # type: ignore[union-attr]
                    if k != "drops"
                }
                for site, other in (("a", "b"), ("b", "a"))
            }
            results.append((counters, stats))
            if off:
                assert spy.sealed == spy.taken == 0
            else:
                # every request and reply took the lone path, but each side's first
                # arrival after the handshake (whose updates it settles)
                assert spy.sealed == 40 and spy.taken == 38, (spy.sealed, spy.taken)
            tunnel.close()
    assert results[0] == results[1]
    assert results[0][0]["a"]["tx_packets"] == results[0][0]["a"]["rx_packets"] == 20


def test_the_lone_receive_path_drops_what_the_general_path_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    _pings(tunnel, 2)
    a = tunnel.nodes["a"]
    b_tun = tunnel.nodes["b"].tun
    drops = tunnel.peer("b", "a").counters.drops
    # a source that does not route back to a (cryptokey routing)
    taken = spy.taken
    a.tun.inject(ping4("198.19.0.77", "198.19.0.2"))
    tunnel.sim.run_for(0.05)
    assert drops["source-not-allowed"] == 1
    # an IP header that disagrees with the packet's length
    bad = bytearray(ipv4("198.19.0.1", "198.19.0.2", b"x" * 40))
    bad[2:4] = (200).to_bytes(2, "big")
    a.tun.inject(bytes(bad))
    tunnel.sim.run_for(0.05)
    assert sum(drops.values()) == 2, drops
    assert spy.taken == taken + 2  # both came the lone way
    assert not [p for p in b_tun.packets() if p == bytes(bad)]
    _pings(tunnel, 2)


def test_lone_sends_keep_the_keepalive_and_dead_peer_timers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lone path leaves the peer out of the wake-up's re-arming; the lazy timer still
    fires, re-arms, and sends keepalives while the tunnel idles, and nobody is declared
    dead."""
    spy = Spy(monkeypatch)
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    _pings(tunnel, 5)
    assert spy.sealed >= 10
    wire = tunnel.sim.wire.capture()
    tunnel.sim.run_for(40.0)
    assert tunnel.established("a", "b") and tunnel.established("b", "a")
    assert len(wire) >= 4  # keepalives (and key rotations) went both ways while idle
    for site, other in (("a", "b"), ("b", "a")):
        s = tunnel.peer(site, other).session
        assert s is not None and s.last_received is not None
        assert s.last_received > tunnel.nodes[site].clock.monotonic() - 10.0
    _pings(tunnel, 2)
    assert DATA_TYPE == RW


@pytest.mark.parametrize("vnet", [False, True])
def test_a_lone_runt_from_the_tun_is_no_route_not_a_crash(tmp_path: Path, vnet: bool) -> None:
    tunnel = Tunnel(two_sites(tmp_path), vnet_hdr=("a", "b") if vnet else ())
    tunnel.wait_established(timeout=5)
    runts = [b"", b"\x00", bytes(10), bytes(10) + b"\x45"]
    for runt in runts:
        tunnel.nodes["a"].tun.inject_raw(runt)
        tunnel.sim.run_for(0.05)  # one wake-up each: the lone path
    assert tunnel.devices["a"].status()["no_route"] == len(runts)
    _pings(tunnel, 2)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PayloadTooBigError("big"), "too-big"),
        (QueueFullError("full"), "queue-full"),
        (SessionClosedError("closed"), "not-established"),
        (MalformedError("odd"), "refused-by-session"),
        (ValueError("odd"), "refused-by-session"),
    ],
)
def test_what_the_session_refuses_is_counted_by_why_in_every_send_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str
) -> None:
    """``write`` and the TUN loop's batch call (``write_run``: ``Session.write_messages``,
    which returns refusals instead of raising them) count refusals alike."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    peer = tunnel.peer("a", "b")
    assert peer.session is not None

    def refusing(*_: Any) -> None:
        raise error

    monkeypatch.setattr(peer.session, "write_message", refusing)
    assert not tunnel.call("a", lambda now: tunnel.devices["a"].send.write(peer, RW, b"x", now))
    assert peer.counters.drops[reason] == 1
    monkeypatch.setattr(
        peer.session,
        "write_messages",
        lambda _t, payloads, *_: [(i, error) for i in range(len(payloads))],
    )
    monkeypatch.setattr(peer.session, "seal_message_now", lambda *_: None)
    for seq in range(20):  # one wake-up reads a batch: the loop
        tunnel.ping("a", "b", seq)
    tunnel.sim.run_for(0.1)
    assert peer.counters.drops[reason] == 21


# -- drain and a failing handler --------------------------------------------------------------


def test_events_after_a_failing_handler_stay_queued_for_the_next_drain() -> None:
    """``drain`` takes the queue in one list: when a handler raises (the loop logs and
    counts it), the events after it go back to the session, not away with the list."""
    a, _, now = _established()
    first = StateChanged(SessionState.ESTABLISHED, SessionState.ESTABLISHED)
    second = PathChanged(("198.18.0.1", 1), ("198.18.0.9", 1))
    a._events.extend([first, second])
    seen: list[object] = []

    def on_event(peer: object, ev: object, now: float) -> None:
        seen.append(ev)
        if len(seen) == 1:
            raise RuntimeError("a handler bug")

    rp = ReceivePath.__new__(ReceivePath)
    rp.router = SimpleNamespace(lookup_source=lambda *args: None)  # type: ignore[assignment]
    rp.tun = SimpleNamespace(vnet_hdr=False)  # type: ignore[assignment]
    rp.on_event = on_event  # type: ignore[method-assign]
    rp.on_caps = lambda *args: None  # type: ignore[method-assign]
    peer = SimpleNamespace(session=a, counters=SimpleNamespace(drops={}))
    with pytest.raises(RuntimeError):
        rp.drain(peer, now)  # type: ignore[arg-type]
    assert seen == [first]
    rp.drain(peer, now + 1)  # type: ignore[arg-type]
    assert seen == [first, second]
    assert a.next_event() is None
