"""Key exchange against replays and floods: the review of daemon v2 (issue 10, findings 1-3).

The key-exchange message orders nothing within a session (no counter, no timestamp but the
SessionID's CreatedAt), and anyone who saw one can send it again from anywhere. So:

* every key the current remote session showed is remembered: an old one replayed, however
  old, is refused, and it never moves the endpoint while session packets vouch for it;
* a key this session of ours never saw (it began after the peer's) may still be old: the
  peer's own traffic shows which key it uses, and that key comes back within a second;
* what cannot change anything (an older SessionID, bytes already checked) costs no
  signature check, and strangers have their own budget, so a flood does not keep a
  restarted peer out for long;
* after the peer restarts we send under our newest key, the only one it can know.

Sans-IO sessions over the wire double where the rule is exact, whole devices over the
in-memory wire (``fakes.py``) where the reviewer measured it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import Tunnel, boot, two_sites
from identities import ID_A, ID_B
from wire_double import ADDR_A, ADDR_B, Link, PathRules

from secureiod.secureio import KeyExchangeMessage, MessageType, PacketKey, open_packet, seal
from secureiod.secureio.constants import KX_PACKET_SIZE
from secureiod.secureio.events import PathChanged, PeerRestarted, SessionState
from secureiod.secureio.identity import Identity
from secureiod.secureio.keyexchange import KeyExchangeOptions, _KeyMemory
from secureiod.secureio.path import Address
from secureiod.secureio.session import Session, SessionOptions
from secureiod.secureio.wire import SessionID, encode_message

RW = MessageType.READ_WRITE
KX = MessageType.KEY_EXCHANGE
EVE: Address = ("203.0.113.66", 40000)
ATTACKER: Address = ("198.18.0.66", 6666)
T0_NS = 1_700_000_000_000_000_000


def new_session(
    identity: Identity, peer: Identity, created_at: int, seed: int, **kw: object
) -> Session:
    opt = SessionOptions(send_delay=0, **kw)  # type: ignore[arg-type]
    endpoint = ADDR_B if identity is ID_A else ADDR_A
    return Session(
        identity,
        peer.public_key,
        created_at_ns=created_at,
        options=opt,
        random=random.Random(seed).randbytes,
        endpoint=endpoint,
    )


def make_link(**kw: object) -> Link:
    a = new_session(ID_A, ID_B, T0_NS, 1, **kw)
    b = new_session(ID_B, ID_A, T0_NS + 1, 2, **kw)
    link = Link(a, b, set_endpoints=False)
    link.start()
    link.run_until(lambda: a.is_established and b.is_established)
    return link


def replace_session(link: Link, side: str, session: Session) -> Session:
    """The peer on ``side`` restarts: a new session (larger CreatedAt) on the same address."""
    ep = link.a if side == "a" else link.b
    link.rules[id(session)] = link.rules[id(ep.session)]
    ep.session = session
    session.start(link.now)
    link.pump()
    return session


def kx_datagrams(sent: list[bytes]) -> list[bytes]:
    return [d for d in sent if len(d) == KX_PACKET_SIZE]


def kx_key(datagram: bytes) -> bytes:
    """The X25519 key a clear key-exchange datagram carries."""
    payload = open_packet(datagram, [PacketKey.clear()]).messages[9:]
    return KeyExchangeMessage.decode(payload).x25519_public


def talk(link: Link, seconds: float, step: float = 0.05) -> tuple[list[bytes], list[bytes]]:
    """Both sides write a numbered message every ``step``; returns what each wrote."""
    to_b: list[bytes] = []
    to_a: list[bytes] = []
    for i in range(round(seconds / step)):
        for ep, out in ((link.a, to_b), (link.b, to_a)):
            out.append(b"%d" % i)
            ep.session.write_message(RW, out[-1], link.now)
        link.pump()
        link.run(step)
    link.run(0.2)
    return to_b, to_a


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts Ed25519 verifications of key-exchange messages (the cost a flood buys)."""
    count = [0]
    original = KeyExchangeMessage.verify

    def counting(self: KeyExchangeMessage, key: object) -> bool:
        count[0] += 1
        return original(self, key)  # type: ignore[arg-type]

    monkeypatch.setattr(KeyExchangeMessage, "verify", counting)
    yield count


# -- finding 1: an old key exchange, replayed, moved the endpoint and rolled keys back --------


def test_every_key_of_the_remote_session_is_refused_again_however_old() -> None:
    """The reviewer: C rotating every 60 s, a 19-minute-old key exchange replayed once
    moved D's endpoint and rolled its key back (only the last 16 keys were remembered).
    Here 40 rotations, then every captured key exchange replayed in a cycle from Eve
    while both sides talk: nothing moves, nothing is lost."""
    link = make_link(key_exchange=KeyExchangeOptions(key_update_interval=1.0))
    a, b = link.a.session, link.b.session
    link.run(40.0)
    captured = kx_datagrams(link.a.sent)
    assert len({kx_key(d) for d in captured}) >= 40
    current = a.key_rotations[0]
    for i, datagram in enumerate(captured):
        link.inject(link.b, datagram, delay=0.02 * i, src=EVE)
    to_b, to_a = talk(link, 0.02 * len(captured) + 0.5)
    assert link.b.messages(RW)[-len(to_b) :] == to_b
    assert link.a.messages(RW)[-len(to_a) :] == to_a
    assert b.endpoint == ADDR_A
    assert not [e for e in link.b.events if isinstance(e, PathChanged)]
    assert link.elsewhere == []
    assert b.stats.drops["kx-replayed"] >= len(captured) - 6  # (A's newest key: a no-op)
    # b's view of A's keys moved only with A's own rotations, never back.
    assert b.key_rotations[1] == a.key_rotations[0] >= current


def test_a_replayed_old_key_costs_no_signature_check(verifications: list[int]) -> None:
    link = make_link(key_exchange=KeyExchangeOptions(key_update_interval=1.0))
    link.run(20.0)
    old = kx_datagrams(link.a.sent)[:10]
    before = verifications[0]
    for datagram in old * 50:
        link.inject(link.b, datagram, src=EVE)
    link.run(0.01)
    assert verifications[0] == before
    assert link.b.session.stats.drops["kx-rate-limited"] == 0


def test_old_key_exchange_replayed_once_after_17_minutes(tmp_path: Path) -> None:
    """The reviewer's in-memory repro, whole devices with the defaults (rotation every
    60 s): a's first key exchange replayed to b once, from elsewhere, after 17 minutes.
    Before: b's endpoint moved to the attacker and pings were lost until a restart."""
    tunnel = Tunnel(two_sites(tmp_path), start=[])
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    cap = tunnel.sim.wire.capture(lambda dg: dg.src == a_addr and len(dg.data) == KX_PACKET_SIZE)
    tunnel.start("a")
    tunnel.start("b")
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(17 * 60 + 5)
    peer_a = tunnel.peer("b", "a")
    rotations = peer_a.session.key_rotations
    assert rotations[1] >= 17
    tunnel.sim.wire.inject(ATTACKER, b_addr, cap[0].data)
    a_tun = tunnel.nodes["a"].tun
    a_tun.written.clear()
    sent = []
    for tick in range(300):  # 30 s of b->a pings, 10 a second
        sent.append(tunnel.ping("b", "a", tick))
        tunnel.sim.run_for(0.1)
        assert peer_a.endpoint == a_addr
    assert a_tun.packets() == sent
    assert peer_a.session.key_rotations[1] == rotations[1]  # (no rotation of a in 30 s)
    assert peer_a.session.stats.drops["kx-replayed"] == 1
    assert peer_a.counters.roams == 0
    assert peer_a.counters.restarts == tunnel.peer("a", "b").counters.restarts == 0


def test_thirty_old_key_exchanges_replayed_every_20_ms_with_rotations_every_second(
    tmp_path: Path,
) -> None:
    """The reviewer's second run: rotations every second, 30 captured key exchanges of a
    replayed in a cycle every 20 ms. Before: 78 % ping loss and 48 endpoint moves."""
    builder = two_sites(tmp_path)
    for spec in builder.nodes.values():
        spec.interface["key_update_interval"] = 1
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    cap = tunnel.sim.wire.capture(lambda dg: dg.src == a_addr and len(dg.data) == KX_PACKET_SIZE)
    tunnel.sim.run_for(30.0)
    old = [dg.data for dg in cap][:30]
    assert len({kx_key(d) for d in old}) >= 15
    peer_a = tunnel.peer("b", "a")
    a_tun = tunnel.nodes["a"].tun
    a_tun.written.clear()
    sent = []
    for tick in range(500):  # 10 s
        tunnel.sim.wire.inject(ATTACKER, b_addr, old[tick % len(old)])
        if tick % 5 == 0:
            sent.append(tunnel.ping("b", "a", tick))
        tunnel.sim.run_for(0.02)
        assert peer_a.endpoint == a_addr
    tunnel.sim.run_for(0.1)
    assert a_tun.packets() == sent
    assert peer_a.counters.roams == 0
    assert peer_a.counters.restarts == tunnel.peer("a", "b").counters.restarts == 0


def test_a_key_this_session_never_saw_is_taken_back_within_a_second() -> None:
    """What memory cannot catch: B's session began after A's, so A's earlier keys are
    new to it. Replayed from Eve, a burst of them changes B's idea of A's key, but not its
    endpoint; A keeps sealing with its real key, B asks, A's answer brings it back."""
    link = make_link(key_exchange=KeyExchangeOptions(key_update_interval=2.0))
    a = link.a.session
    link.run(20.0)  # ~10 rotations of A, all seen by the first B
    old = kx_datagrams(link.a.sent)[:-2]
    b = replace_session(link, "b", new_session(ID_B, ID_A, T0_NS + 10**12, 3))
    link.run_until(lambda: b.is_established)
    link.run(0.5)
    assert any(isinstance(e, PeerRestarted) for e in link.a.events)
    for datagram in old:  # one burst, from elsewhere
        link.inject(link.b, datagram, src=EVE)
    start = link.now
    to_b, to_a = talk(link, 3.0)
    assert b.endpoint == ADDR_A and link.elsewhere == []
    assert b.stats.rx_kx_restored >= 1
    assert link.b.messages(RW)[-len(to_b) :] == to_b  # A -> B never stopped
    got = link.a.messages(RW)
    lost = [m for m in to_a if m not in got]
    assert len(lost) * 0.05 <= 1.2, f"B -> A lost {len(lost)} messages after {start}"
    assert a.state == b.state == SessionState.ESTABLISHED


def test_unseen_old_keys_replayed_to_a_restarted_device_cost_about_a_second(
    tmp_path: Path,
) -> None:
    """The same with whole devices: b restarts after 10 minutes, then a's key exchanges
    from before that are replayed to it. Without the take-back, b's pings were lost for
    15 s, until a's dead-peer timer restarted the session."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    cap = tunnel.sim.wire.capture(lambda dg: dg.src == a_addr and len(dg.data) == KX_PACKET_SIZE)
    tunnel.sim.run_for(10 * 60 + 5)
    old = [dg.data for dg in cap]
    tunnel.devices["b"].close()
    tunnel.devices["b"] = boot(tunnel.nodes["b"], tunnel.builder.load("b"))
    tunnel.wait_established(timeout=10)
    tunnel.sim.run_for(5.0)
    peer_a = tunnel.peer("b", "a")
    for datagram in old[:8]:
        tunnel.sim.wire.inject(ATTACKER, b_addr, datagram)
    a_tun = tunnel.nodes["a"].tun
    a_tun.written.clear()
    sent = [tunnel.ping("b", "a", 0)]
    for tick in range(1, 100):  # 10 s
        tunnel.sim.run_for(0.1)
        sent.append(tunnel.ping("b", "a", tick))
    tunnel.sim.run_for(0.1)
    delivered = a_tun.packets()
    lost = [i for i, packet in enumerate(sent) if packet not in delivered]
    assert len(lost) <= 12, lost  # about a second...
    assert not lost or lost[-1] < 15, lost  # ...right after the replay, then every one
    assert peer_a.endpoint == a_addr
    assert peer_a.counters.restarts == tunnel.peer("a", "b").counters.restarts == 0


def test_key_memory_is_bounded_and_matches_whole_fingerprints_only() -> None:
    memory = _KeyMemory(4)
    keys = [bytes([i]) * 32 for i in range(1, 7)]
    for key in keys:
        memory.add(key)
    assert len(memory) == 4
    assert [k in memory for k in keys] == [False, False, True, True, True, True]
    # Eight bytes that straddle two stored fingerprints are not a key of ours.
    assert bytes([4] * 4 + [5] * 4) + bytes(24) not in memory
    memory.clear()
    assert len(memory) == 0 and keys[-1] not in memory


def test_a_long_remote_session_is_remembered_up_to_the_bound() -> None:
    """4096 keys (8 bytes each) by default; a small bound shows the window slides."""
    kx = KeyExchangeOptions(key_update_interval=1.0, max_remote_keys=8)
    link = make_link(key_exchange=kx)
    link.run(20.0)
    sent = kx_datagrams(link.a.sent)
    b = link.b.session
    recent = sent[-12]  # a key of the last eight
    link.inject(link.b, recent, src=EVE)
    link.run(0.01)
    assert b.stats.drops["kx-replayed"] == 1


# -- path validation: a new key alone is no proof of where the peer is -------------------------


def test_an_unseen_key_from_elsewhere_moves_nothing_while_the_peer_is_heard() -> None:
    link = make_link(key_exchange=KeyExchangeOptions(key_update_interval=2.0))
    link.run(10.0)
    old = kx_datagrams(link.a.sent)[0]
    b = replace_session(link, "b", new_session(ID_B, ID_A, T0_NS + 10**12, 3))
    link.run_until(lambda: b.is_established)
    link.inject(link.b, old, src=EVE)  # a key b's new session never saw
    talk(link, 1.0)
    assert b.endpoint == ADDR_A
    assert not [e for e in link.b.events if isinstance(e, PathChanged)]
    assert link.elsewhere == []


# -- finding 2: floods spent the budget of signature checks before any check ------------------


def _kx_datagram(msg: KeyExchangeMessage, packet_id: int) -> bytes:
    return seal(PacketKey.clear(), packet_id, encode_message(KX, msg.encode(), 0))


def test_stale_session_flood_costs_no_check_and_does_not_delay_a_restart(
    verifications: list[int],
) -> None:
    """The reviewer: A's key exchanges from older sessions at 1,400/s from elsewhere kept
    A's restart out for 21 s. An older SessionID is refused before any check."""
    link = make_link()
    old_sessions = kx_datagrams(link.a.sent)
    for n in (1, 2):  # two more sessions of A, each replacing the last
        a = replace_session(link, "a", new_session(ID_A, ID_B, T0_NS + n * 10**12, 10 + n))
        link.run_until(lambda a=a: a.is_established)
        if n == 1:
            old_sessions += kx_datagrams(link.a.sent)
    b = link.b.session
    before = verifications[0]
    for i in range(2000):  # one instant, from Eve and spoofed from A's own address
        link.inject(link.b, old_sessions[i % len(old_sessions)], src=EVE if i % 2 else None)
    link.run(0.001)
    assert verifications[0] == before
    assert b.stats.drops["kx-stale-session"] == 2000
    a = replace_session(link, "a", new_session(ID_A, ID_B, T0_NS + 3 * 10**12, 13))
    link.run(0.05)
    assert b.remote_session_id == a.session_id
    assert b.stats.drops["kx-rate-limited"] == 0


def test_a_demultiplexer_can_ask_before_a_signature_check(verifications: list[int]) -> None:
    """``refuses_key_exchange``: the same cheap refusal, for a stranger's datagram."""
    link = make_link(key_exchange=KeyExchangeOptions(key_update_interval=1.0))
    link.run(5.0)
    b = link.b.session

    def message(datagram: bytes) -> tuple[KeyExchangeMessage, bytes]:
        payload = open_packet(datagram, [PacketKey.clear()]).messages[9:]
        return KeyExchangeMessage.decode(payload), bytes(payload)

    old, newest = kx_datagrams(link.a.sent)[0], kx_datagrams(link.a.sent)[-1]
    before = verifications[0]
    assert b.refuses_key_exchange(*message(old))
    assert not b.refuses_key_exchange(*message(newest))
    a2 = new_session(ID_A, ID_B, T0_NS - 1, 9)  # an older session of A
    a2.start(link.now)
    assert b.refuses_key_exchange(
        *message(kx_datagrams([d for d, _ in a2.datagrams_to_send(link.now)])[0])
    )
    assert verifications[0] == before  # asking costs no signature check


def test_strangers_cannot_spend_the_budget_of_the_peers_own_address() -> None:
    """Forged key exchanges (a newer SessionID, A's identity key, a junk signature) from
    elsewhere take their own budget: A's restart from its own address gets through at
    once, in the same instant as the flood."""
    link = make_link()
    rng = random.Random(5)
    for i in range(1000):
        msg = KeyExchangeMessage(
            SessionID(T0_NS + 10**15, i),
            ID_A.public_key.raw,
            rng.randbytes(32),
            1,
            False,
            rng.randbytes(64),
        )
        link.inject(link.b, _kx_datagram(msg, 7 + i), src=EVE)
    a = replace_session(link, "a", new_session(ID_A, ID_B, T0_NS + 10**12, 7))
    link.run(0.005)
    b = link.b.session
    assert b.stats.drops["kx-rate-limited"] >= 900
    assert b.remote_session_id == a.session_id


def test_the_same_bytes_are_checked_once(verifications: list[int]) -> None:
    """One forgery sent 1,000 times costs one check; so does a peer's retransmission."""
    link = make_link()
    b = link.b.session
    attacker = Identity.from_seed(b"\x42" * 32)
    forged = KeyExchangeMessage(
        link.a.session.session_id, attacker.public_key.raw, b"\x05" * 32, 1, False
    ).signed_by(attacker)
    before = verifications[0]
    for i in range(1000):
        link.inject(link.b, _kx_datagram(forged, 100 + i))
    link.run(0.001)
    assert verifications[0] - before == 1
    assert b.stats.drops["kx-bad-signature"] == 1000
    assert b.stats.drops["kx-rate-limited"] == 0
    genuine = kx_datagrams(link.a.sent)[-1]  # known already: its check is remembered
    before = verifications[0]
    for _ in range(100):
        link.inject(link.b, genuine)
    link.run(0.001)
    assert verifications[0] == before
    assert b.stats.rx_kx_duplicates >= 100


def _restart_under_forged_flood(tmp_path: Path, seed: int, rate: float) -> float | None:
    """Whole devices: forged key exchanges naming a's identity, spoofed from a's own
    address at ``rate``, while a restarts. How long until a's first ping reaches b?"""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    tunnel.sim.wire.link(tunnel.nodes["a"].ip, tunnel.nodes["b"].ip, jitter=0.01)
    rng = random.Random(seed)
    identity = tunnel.builder.nodes["a"].identity.public_key.raw
    step = 0.01

    def flood(seconds: float) -> None:
        end = tunnel.sim.now + seconds
        while tunnel.sim.now < end - 1e-9:
            for _ in range(round(rate * step)):
                msg = KeyExchangeMessage(
                    SessionID(tunnel.sim.clock.wall_ns() + 10**18, rng.getrandbits(64)),
                    identity,
                    rng.randbytes(32),
                    1,
                    False,
                    rng.randbytes(64),
                )
                datagram = _kx_datagram(msg, rng.getrandbits(62) + 1)
                tunnel.sim.wire.inject(a_addr, b_addr, datagram, delay=rng.uniform(0, step))
            tunnel.sim.run_for(step)

    flood(1.0 + rng.uniform(0, step))
    tunnel.devices["a"].close()
    tunnel.devices["a"] = boot(tunnel.nodes["a"], tunnel.builder.load("a"))
    start = tunnel.sim.now
    b_tun = tunnel.nodes["b"].tun
    b_tun.written.clear()
    for seq in range(100):  # 10 s at most
        tunnel.ping("a", "b", seq)
        flood(0.1)
        if b_tun.packets():
            return tunnel.sim.now - start
    return None


def test_restart_under_a_spoofed_flood_of_forgeries(tmp_path: Path) -> None:
    """The reviewer: 1,200 forged key exchanges a second, spoofed from A's address, kept
    A's restart out for 8.5 s. Only the signature tells them apart, so the budget decides:
    200 checks a second for the peer's own address (~1 % of a core), and a restarting peer
    re-sends its first request every 0.25 s. Before, in memory: 3 of these 10 runs were
    still out after 10 s, the median 3.6 s.

    With the budget a run still loses now and then: each request of a's, one every
    0.25 s, competes with six forgeries for a check (40 seeds: 1 or 2 still out after
    10 s, depending on unrelated timing such as the negotiation's late ENDs). So at most
    one of ten may be out, where the old code had three."""
    took = [_restart_under_forged_flood(tmp_path / str(seed), seed, 1200.0) for seed in range(10)]
    assert took.count(None) <= 1, took
    assert sorted(t if t is not None else 99.0 for t in took)[7] < 3.0, took


# -- finding 3: after a peer restart, send under the only key it can know ----------------------


def test_after_a_peer_restart_we_send_under_our_newest_key() -> None:
    """A rotated while B was down, so A's rotation was unconfirmed and A still sent under
    its previous key, which the restarted B never learns: B could open nothing of A's
    until A's retries got an answer (11 s in the reviewer's sweep)."""
    link = make_link()
    a = link.a.session
    link.rules[id(a)] = PathRules(loss=1.0)  # B is gone: nothing of A's arrives
    link.run(a.options.key_exchange.key_update_interval + 2)
    assert a.key_rotations[0] == 2
    link.rules[id(a)] = PathRules()
    b = replace_session(link, "b", new_session(ID_B, ID_A, T0_NS + 10**12, 4))
    link.run_until(lambda: a.is_established and b.is_established, timeout=2.0)
    assert b.stats.drops["auth"] == 0
    a.write_message(RW, b"after the restart", link.now)
    link.pump()
    link.run(0.1)
    assert link.b.messages(RW) == [b"after the restart"]


RESTART_TIMINGS = [
    (down, offset) for down in (3.0, 10.0, 14.0, 20.0) for offset in (30.0, 50.0, 58.0)
]


@pytest.mark.parametrize(("down", "offset"), RESTART_TIMINGS)
def test_restart_sweep_recovers_within_a_few_seconds(
    tmp_path: Path, down: float, offset: float
) -> None:
    """The reviewer's sweep: b restarts after ``down`` seconds away, ``offset`` seconds
    into a's 60 s rotation period. Both directions must work again well within 3 s (they
    took 11.1 s when b's downtime spanned a's rotation)."""
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(offset)
    tunnel.devices["b"].close()
    a_ip, b_ip = tunnel.nodes["a"].ip, tunnel.nodes["b"].ip
    tunnel.sim.wire.cut(a_ip, b_ip)
    tunnel.sim.run_for(down)
    tunnel.sim.wire.heal(a_ip, b_ip)
    tunnel.devices["b"] = boot(tunnel.nodes["b"], tunnel.builder.load("b"))
    start = tunnel.sim.now
    a_tun, b_tun = tunnel.nodes["a"].tun, tunnel.nodes["b"].tun
    a_tun.written.clear()
    b_tun.written.clear()
    took: dict[str, float] = {}
    for seq in range(30):
        tunnel.ping("b", "a", seq)
        tunnel.ping("a", "b", seq)
        tunnel.sim.run_for(0.1)
        for name, tun in (("b->a", a_tun), ("a->b", b_tun)):
            if tun.packets() and name not in took:
                took[name] = tunnel.sim.now - start
        if len(took) == 2:
            break
    assert set(took) == {"b->a", "a->b"} and max(took.values()) < 3.0, took


# -- the first request of a session is re-sent sooner ----------------------------------------


def test_a_lost_first_request_costs_a_quarter_second() -> None:
    dropped: list[bytes] = []

    def drop_first_request(datagram: bytes) -> bool:
        if len(datagram) == KX_PACKET_SIZE and not dropped:
            dropped.append(datagram)
            return True
        return False

    a = new_session(ID_A, ID_B, T0_NS, 1)
    b = new_session(ID_B, ID_A, T0_NS + 1, 2)
    link = Link(a, b, PathRules(drop=drop_first_request), PathRules(), set_endpoints=False)
    start = link.now
    link.start()
    link.run_until(lambda: a.is_established and b.is_established, timeout=5.0)
    assert dropped
    assert link.now - start < 0.4


def test_first_requests_slow_down_to_the_retry_interval() -> None:
    kx = KeyExchangeOptions(timeout=None)
    a = new_session(ID_A, ID_B, T0_NS, 1, key_exchange=kx)
    b = new_session(ID_B, ID_A, T0_NS + 1, 2, key_exchange=kx)
    link = Link(a, b, PathRules(loss=1.0), PathRules(loss=1.0), set_endpoints=False)
    link.start()
    link.run(10.0)
    times = len(kx_datagrams(link.a.sent))
    # 0 s, then every 0.25 s until 4 s (16), then every second (6 more by 10 s).
    assert 20 <= times <= 24, times
