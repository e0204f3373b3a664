"""The demultiplexer: which of many sessions owns a datagram (issue 10 item 2).

A hub with one socket and one session per peer, and real peer sessions, all in memory with
a virtual clock: no sockets. Every test checks the address map against the sessions'
endpoints afterwards (``assert_consistent``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from secureiod.secureio import MessageType
from secureiod.secureio.constants import KX_PACKET_SIZE
from secureiod.secureio.demux import Demultiplexer
from secureiod.secureio.events import MessageReceived, PathChanged
from secureiod.secureio.identity import Identity
from secureiod.secureio.negotiation import END_RESEND_DELAYS
from secureiod.secureio.path import Address, path_key
from secureiod.secureio.session import Session, SessionOptions

RW = MessageType.READ_WRITE
HUB: Address = ("198.18.0.1", 5800)
HUB_ID = Identity.from_seed(b"\x01" * 32)
EVE: Address = ("203.0.113.66", 40000)


@dataclass
class Peer:
    name: str
    identity: Identity
    session: Session
    address: Address
    received: list[bytes] = field(default_factory=list)


class Net:
    """The hub's demultiplexer and sessions, and each peer's own session, on one wire.

    Delivery is immediate; ``run`` advances the virtual clock through timers.
    """

    def __init__(
        self,
        names: list[str],
        *,
        psk: dict[str, bytes] | None = None,
        hub_knows_addresses: bool = False,
        **demux_options: float,
    ) -> None:
        self.now = 1000.0
        self.rng = random.Random(7)
        self.demux: Demultiplexer[str] = Demultiplexer(**demux_options)  # type: ignore[arg-type]
        self.peers: dict[str, Peer] = {}
        self.hub_messages: dict[str, list[bytes]] = {}
        self.hub_events: dict[str, list[object]] = {}
        self.returned: list[str | None] = []
        for i, name in enumerate(names):
            ident = Identity.from_seed(bytes([0x10 + i]) * 32)
            opt = SessionOptions(send_delay=0, psk=(psk or {}).get(name))
            address: Address = (f"198.18.1.{i + 1}", 6000 + i)
            session = Session(
                ident,
                HUB_ID.public_key,
                created_at_ns=1_700_000_000_000_000_000 + i,
                options=opt,
                random=self.rng.randbytes,
                endpoint=HUB,
            )
            self.peers[name] = Peer(name, ident, session, address)
            hub_side = Session(
                HUB_ID,
                ident.public_key,
                created_at_ns=1_700_000_000_000_000_100 + i,
                options=opt,
                random=self.rng.randbytes,
                endpoint=address if hub_knows_addresses else None,
            )
            self.demux.add(name, hub_side)
            self.hub_messages[name] = []
            self.hub_events[name] = []

    def hub(self, name: str) -> Session:
        return self.demux.session(name)

    def start(self, *names: str) -> None:
        for name in names or self.peers:
            self.peers[name].session.start(self.now)
        self.pump()

    def to_hub(self, data: bytes, src: Address) -> str | None:
        owner = self.demux.receive_datagram(data, src, self.now)
        self.returned.append(owner)
        return owner

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            for peer in self.peers.values():
                for data, dst in peer.session.datagrams_to_send(self.now):
                    assert dst == HUB
                    self.to_hub(data, peer.address)
                    moved = True
                while (ev := peer.session.next_event()) is not None:
                    if isinstance(ev, MessageReceived):
                        peer.received.append(ev.payload)
            for name in self.peers:
                hub_side = self.hub(name)
                for data, dst in hub_side.datagrams_to_send(self.now):
                    moved = True
                    for peer in self.peers.values():
                        if path_key(peer.address) == path_key(dst):
                            peer.session.receive_datagram(data, HUB, self.now)
                while (ev := hub_side.next_event()) is not None:
                    self.hub_events[name].append(ev)
                    if isinstance(ev, MessageReceived):
                        self.hub_messages[name].append(ev.payload)
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            sessions = [p.session for p in self.peers.values()]
            sessions += [self.hub(n) for n in self.peers]
            for s in sessions:
                timer = s.get_timer()
                if timer is not None and timer <= self.now:
                    s.handle_timer(self.now)
            self.pump()

    def send(self, name: str, payload: bytes) -> None:
        self.peers[name].session.write_message(RW, payload, self.now)
        self.pump()

    def all_established(self) -> bool:
        return all(
            p.session.is_established and self.hub(n).is_established for n, p in self.peers.items()
        )

    def assert_consistent(self) -> None:
        """The map names a session at its endpoint; a session's endpoint is mapped to it,
        or (after another owner took the address over) to that owner, or to nobody."""
        for name in self.peers:
            endpoint = self.hub(name).endpoint
            if endpoint is not None:
                owner = self.demux.owner_at(endpoint)
                if owner is not None and owner != name:
                    assert path_key(self.hub(owner).endpoint) == path_key(endpoint)  # type: ignore[arg-type]
        for peer in self.peers.values():
            owner = self.demux.owner_at(peer.address)
            if owner is not None:
                assert self.hub(owner).endpoint is not None
                assert path_key(self.hub(owner).endpoint) == path_key(peer.address)  # type: ignore[arg-type]


def established_net(names: list[str], **kw: object) -> Net:
    net = Net(names, **kw)  # type: ignore[arg-type]
    net.start()
    net.run(2.0)
    assert net.all_established()
    return net


def test_first_contact_of_passive_sessions_is_identified_by_key_exchange() -> None:
    net = Net(["p1", "p2", "p3"])
    assert all(net.hub(n).endpoint is None for n in net.peers)
    net.start()
    net.run(1.0)
    assert net.all_established()
    for name, peer in net.peers.items():
        assert net.hub(name).endpoint == peer.address
        assert net.demux.owner_at(peer.address) == name
        assert [e for e in net.hub_events[name] if isinstance(e, PathChanged)] == [
            PathChanged(None, peer.address)
        ]
    assert net.demux.stats.identified_kx == 3
    assert net.demux.stats.unknown_source == 0
    net.assert_consistent()


def test_data_from_known_addresses_takes_the_map_and_reaches_its_owner() -> None:
    net = established_net(["p1", "p2", "p3"])
    identified = (net.demux.stats.identified_kx, net.demux.stats.identified_trial)
    for i in range(20):
        for name in net.peers:
            net.send(name, f"{name}-{i}".encode())
    for name in net.peers:
        assert net.hub_messages[name] == [f"{name}-{i}".encode() for i in range(20)]
    assert (net.demux.stats.identified_kx, net.demux.stats.identified_trial) == identified
    net.assert_consistent()


def test_roaming_by_data_is_found_by_trial_decryption() -> None:
    net = established_net(["p1", "p2", "p3"])
    old = net.peers["p2"].address
    new: Address = ("198.18.9.9", 7777)
    net.peers["p2"].address = new
    net.send("p2", b"from the new address")
    assert net.hub_messages["p2"] == [b"from the new address"]
    assert net.hub("p2").endpoint == new
    assert net.demux.owner_at(new) == "p2" and net.demux.owner_at(old) is None
    assert net.demux.stats.identified_trial == 1
    net.hub("p2").write_message(RW, b"back", net.now)
    net.pump()
    assert net.peers["p2"].received == [b"back"]
    net.assert_consistent()


def test_roaming_by_key_exchange_is_found_by_its_signature() -> None:
    net = established_net(["p1", "p2", "p3"])
    net.run(max(END_RESEND_DELAYS))  # no late END from p3 finds the new address first
    new: Address = ("198.18.9.10", 7778)
    net.peers["p3"].address = new
    kx_before = net.demux.stats.identified_kx
    net.run(net.peers["p3"].session.options.key_exchange.key_update_interval + 1)
    assert net.hub("p3").endpoint == new
    assert net.demux.owner_at(new) == "p3"
    assert net.demux.stats.identified_kx > kx_before
    assert net.all_established()
    net.assert_consistent()


def test_unknown_garbage_is_counted_and_returns_none() -> None:
    net = established_net(["p1", "p2"])
    rng = random.Random(3)
    drops_before = {n: dict(net.hub(n).stats.drops) for n in net.peers}
    for size in (0, 1, 43, 44, 100, KX_PACKET_SIZE, 1400):
        assert net.to_hub(rng.randbytes(size), EVE) is None
    assert net.demux.stats.unknown_source == 7
    # Trial decryption asks without touching the sessions' counters.
    assert {n: dict(net.hub(n).stats.drops) for n in net.peers} == drops_before
    net.assert_consistent()


def test_identification_budget_bounds_the_work_and_recovers() -> None:
    net = established_net(["p1", "p2"], key_checks_per_second=10.0)
    rng = random.Random(4)
    for i in range(200):  # one instant: a flood from random addresses
        assert net.to_hub(rng.randbytes(120), ("203.0.113.1", 10000 + i)) is None
    stats = net.demux.stats
    assert stats.rate_limited >= 195
    assert stats.unknown_source == 200
    # The budget refills: a real roam a second later is identified.
    net.now += 1.0
    net.peers["p1"].address = ("198.18.9.11", 7779)
    net.send("p1", b"roamed after the flood")
    assert net.hub_messages["p1"][-1:] == [b"roamed after the flood"]
    assert net.hub("p1").endpoint == ("198.18.9.11", 7779)
    net.assert_consistent()


def test_above_the_trial_limit_only_key_exchange_identifies() -> None:
    net = established_net(["p1", "p2", "p3"], trial_peer_limit=2)
    new: Address = ("198.18.9.12", 7780)
    net.peers["p1"].address = new
    net.send("p1", b"lost")
    assert net.hub_messages["p1"] == []
    assert net.demux.stats.identified_trial == 0
    assert net.hub("p1").endpoint != new
    net.run(net.peers["p1"].session.options.key_exchange.key_update_interval + 1)
    assert net.hub("p1").endpoint == new  # its rotation proved where it is
    net.assert_consistent()


def test_replayed_key_exchange_from_another_address_is_identified_but_moves_nothing() -> None:
    net = Net(["p1", "p2"])
    captured: list[bytes] = []
    original = net.peers["p1"].session.datagrams_to_send

    def capture(now: float) -> list[tuple[bytes, Address]]:
        out = original(now)
        captured.extend(d for d, _ in out if len(d) == KX_PACKET_SIZE)
        return out

    net.peers["p1"].session.datagrams_to_send = capture  # type: ignore[method-assign]
    net.start()
    net.run(2.0)
    assert captured and net.all_established()
    for _ in range(10):
        assert net.to_hub(captured[-1], EVE) == "p1"
    net.pump()
    assert net.hub("p1").endpoint == net.peers["p1"].address
    assert net.demux.owner_at(EVE) is None
    net.assert_consistent()


def test_an_address_taken_over_by_another_peer_keeps_the_map_consistent() -> None:
    """A NAT gives p1's old public address to p2: p2's datagrams arrive from an address the
    map says is p1's. p1's session cannot open them, identification finds p2, p2's session
    validates the address and the map follows. p1 keeps its endpoint (the hub cannot tell
    this from finding 3's attack) until its own next datagram, from its new address."""
    net = established_net(["p1", "p2", "p3"])
    shared = net.peers["p1"].address
    net.peers["p1"].address = ("198.18.9.20", 7790)  # p1 moved away, quietly
    net.peers["p2"].address = shared
    net.send("p2", b"p2 from p1's old address")
    assert net.hub_messages["p2"] == [b"p2 from p1's old address"]
    assert net.demux.owner_at(shared) == "p2"
    assert net.hub("p2").endpoint == shared
    assert net.hub("p1").endpoint == shared
    assert net.demux.stats.reassigned == 1 and net.demux.stats.path_takeovers == 1
    net.assert_consistent()
    # p1 shows up from its new address and is found again.
    net.send("p1", b"p1 again")
    assert net.hub_messages["p1"][-1:] == [b"p1 again"]
    assert net.hub("p1").endpoint == ("198.18.9.20", 7790)
    net.assert_consistent()


def test_psk_peers_are_identified_by_their_aux_key() -> None:
    net = Net(["plain", "secret", "secret2"], psk={"secret": b"k" * 32, "secret2": b"k" * 32})
    assert len(net.demux.fallback_keys) == 2  # clear, and the one PSK both share
    net.start()
    net.run(1.0)
    assert net.all_established()
    assert net.demux.stats.identified_kx == 3
    net.assert_consistent()


def test_key_exchange_sealed_the_wrong_way_for_its_peer_is_not_identified() -> None:
    """A clear key exchange signed by a PSK peer (e.g. captured from a misconfigured Go peer)
    names that peer, but its session would refuse it: identification stops there."""
    net = Net(["plain", "secret"], psk={"secret": b"k" * 32})
    stranger = Session(
        net.peers["secret"].identity,
        HUB_ID.public_key,
        created_at_ns=1_800_000_000_000_000_000,
        options=SessionOptions(send_delay=0),
        endpoint=HUB,
    )
    stranger.start(net.now)
    (kx, _), *_ = stranger.datagrams_to_send(net.now)
    assert net.to_hub(kx, EVE) is None
    assert net.demux.stats.identified_kx == 0


def test_add_replace_remove_and_set_endpoint_keep_the_map() -> None:
    net = established_net(["p1", "p2"])
    demux = net.demux
    a1 = net.peers["p1"].address
    replacement = Session(
        HUB_ID,
        net.peers["p1"].identity.public_key,
        created_at_ns=1_700_000_000_000_000_500,
        endpoint=("198.18.5.5", 5555),
    )
    demux.add("p1", replacement)
    assert demux.session("p1") is replacement
    assert demux.owner_at(a1) is None and demux.owner_at(("198.18.5.5", 5555)) == "p1"
    demux.set_endpoint("p1", ("198.18.5.6", 5556))
    assert replacement.endpoint == ("198.18.5.6", 5556)
    assert demux.owner_at(("198.18.5.5", 5555)) is None
    assert demux.owner_at(("198.18.5.6", 5556)) == "p1"
    # Told that p2 is where p1 is: the address maps to p2, p1 keeps sending there.
    demux.set_endpoint("p2", ("198.18.5.6", 5556))
    assert demux.owner_at(("198.18.5.6", 5556)) == "p2"
    assert replacement.endpoint == ("198.18.5.6", 5556)
    # p2 goes: the address is p1's again (its endpoint never left).
    demux.remove("p2")
    assert "p2" not in demux and len(demux) == 1
    assert demux.owner_at(("198.18.5.6", 5556)) == "p1"
    demux.set_endpoint("p1", None)
    assert demux.owner_at(("198.18.5.6", 5556)) is None
    with pytest.raises(KeyError):
        demux.set_endpoint("p2", None)


def test_a_new_session_is_started_on_first_contact_only() -> None:
    net = Net(["p1"])
    hub_side = net.hub("p1")
    assert hub_side.state.name == "NEW"
    net.to_hub(b"\x00" * 60, EVE)  # garbage does not start it
    assert hub_side.state.name == "NEW"
    net.start()
    assert hub_side.state.name != "NEW"


# -- review of issue 10 -----------------------------------------------------------------


def test_one_peers_fresh_datagram_from_anothers_address_leaves_that_one_its_endpoint() -> None:
    """Finding 3: someone holds back a fresh datagram of p2 and sends it from p1's address.
    p2's session validates the address (any roam looks like that), and the hub used to set
    p1's endpoint to None: hub -> p1 traffic was dropped until p1's next datagram. Now the
    address maps to p2 but p1 keeps its endpoint, and p1's next datagram maps it back
    without spending the identification budget."""
    net = established_net(["p1", "p2"])
    p1, p2 = net.peers["p1"], net.peers["p2"]
    p2.session.write_message(RW, b"held back", net.now)
    ((held, _),) = p2.session.datagrams_to_send(net.now)
    assert net.to_hub(held, p1.address) == "p2"
    net.pump()
    assert net.hub("p2").endpoint == p1.address
    assert net.hub("p1").endpoint == p1.address
    assert net.demux.owner_at(p1.address) == "p2"
    assert net.demux.stats.path_takeovers == 1
    net.assert_consistent()
    net.hub("p1").write_message(RW, b"to p1", net.now)
    net.pump()
    assert p1.received[-1:] == [b"to p1"]
    trials = net.demux.stats.identified_trial
    net.send("p1", b"p1 speaks")
    assert net.hub_messages["p1"][-1:] == [b"p1 speaks"]
    assert net.demux.owner_at(p1.address) == "p1"
    net.send("p1", b"and again")
    assert net.hub_messages["p1"][-1:] == [b"and again"]
    assert net.demux.stats.identified_trial == trials  # the displaced owner was tried first
    net.assert_consistent()
    # p2's own next datagram brings it home (found by trial decryption).
    net.send("p2", b"p2 home")
    assert net.hub_messages["p2"][-1:] == [b"p2 home"]
    assert net.hub("p2").endpoint == p2.address
    assert net.demux.owner_at(p2.address) == "p2" and net.demux.owner_at(p1.address) == "p1"
    net.assert_consistent()


def test_a_replayed_datagram_from_a_displaced_owners_address_reclaims_nothing() -> None:
    net = established_net(["p1", "p2"])
    p1, p2 = net.peers["p1"], net.peers["p2"]
    p1.session.write_message(RW, b"old", net.now)
    ((old, _),) = p1.session.datagrams_to_send(net.now)
    net.to_hub(old, p1.address)
    p2.session.write_message(RW, b"held back", net.now)
    ((held, _),) = p2.session.datagrams_to_send(net.now)
    net.to_hub(held, p1.address)
    assert net.demux.owner_at(p1.address) == "p2"
    net.to_hub(old, p1.address)  # a replay: p1's session refuses it
    assert net.demux.owner_at(p1.address) == "p2"
    assert net.hub("p1").stats.drops["replay"] == 1
    net.assert_consistent()


GARBAGE_SIZES = (0, 1, 7, 35, 36, 52, 1392 + 53 + 1, 8000, 65507)


def test_garbage_of_impossible_sizes_costs_no_identification() -> None:
    """Finding 4: shorter than a packet header plus a message header, or longer than any
    session's payload limit allows: dropped before any work, without a token."""
    net = established_net(["p1", "p2"], identifications_per_second=5.0)
    stats = net.demux.stats
    spent = stats.signature_checks, stats.key_checks  # the first contacts'
    rng = random.Random(5)
    for i, size in enumerate(GARBAGE_SIZES * 10):
        assert net.to_hub(rng.randbytes(size), ("203.0.113.2", 10000 + i)) is None
    n = len(GARBAGE_SIZES) * 10
    assert stats.bad_size == stats.unknown_source == n
    assert (stats.signature_checks, stats.key_checks) == spent and stats.rate_limited == 0


def test_key_exchange_sized_garbage_spends_a_token_only_when_it_names_a_peer() -> None:
    """Finding 4: a key-exchange-sized datagram first has to open under a fallback key and
    name a configured peer (about 2 µs per fallback key); only then does it take a token
    for the Ed25519 check (about 75 µs)."""
    from secureiod.secureio import KeyExchangeMessage, PacketKey, SessionID, seal
    from secureiod.secureio.wire import encode_message

    net = established_net(["p1", "p2"], identifications_per_second=5.0)
    stats = net.demux.stats
    spent, checks = stats.signature_checks, stats.key_checks
    rng = random.Random(6)
    for i in range(1000):
        assert net.to_hub(rng.randbytes(KX_PACKET_SIZE), ("203.0.113.3", i + 1)) is None
    assert stats.signature_checks == spent and stats.rate_limited == 0
    assert stats.key_checks == checks + 1000  # one fallback key (clear) each

    def forged(identity_key: bytes) -> bytes:
        signer = Identity.from_seed(b"\x66" * 32)
        msg = KeyExchangeMessage(SessionID(1, 2), identity_key, b"\x09" * 32, 1, False)
        payload = msg.signed_by(signer).encode()
        datagram = seal(PacketKey.clear(), 77, encode_message(MessageType.KEY_EXCHANGE, payload, 0))
        assert len(datagram) == KX_PACKET_SIZE
        return datagram

    stranger = Identity.from_seed(b"\x77" * 32).public_key.raw
    identified = stats.identified_kx
    assert net.to_hub(forged(stranger), EVE) is None
    assert stats.signature_checks == spent
    assert net.to_hub(forged(net.peers["p1"].identity.public_key.raw), EVE) is None
    assert stats.signature_checks == spent + 1 and stats.identified_kx == identified


def test_the_cheap_key_exchange_check_has_a_bound_of_its_own() -> None:
    net = established_net(["p1", "p2"], key_checks_per_second=100.0)
    net.now += 10.0  # a full bucket
    spent = net.demux.stats.signature_checks
    rng = random.Random(8)
    for i in range(300):
        net.to_hub(rng.randbytes(KX_PACKET_SIZE), ("203.0.113.4", i + 1))
    assert net.demux.stats.rate_limited == 200  # one fallback key (clear): 100 a second
    assert net.demux.stats.signature_checks == spent


def test_a_roaming_peer_is_identified_through_a_flood_of_garbage() -> None:
    """The reviewer's flood: 9,000 datagrams a second from random addresses, of the sizes
    of /tmp/rv10/atk.py plus the key-exchange size. Before, each one took one of the 500
    identification tokens a second, so a roaming peer's first datagrams were dropped
    unexamined (0 of 10 roams in 20 s got through). Now impossible sizes cost nothing,
    key-exchange-sized garbage no signature check, and the rest a trial of 2 sessions
    from the cheap-check budget, which the flood does not exhaust."""
    net = established_net(["p1", "p2"])
    stats = net.demux.stats
    spent, trials = stats.signature_checks, stats.identified_trial
    rng = random.Random(9)
    sizes = (0, 1, 7, 35, 36, 53, 100, 300, 1400, 1472, 8000, 65507, KX_PACKET_SIZE)
    roams = 0
    for i in range(9000 * 5):  # five seconds
        net.now += 1 / 9000
        src = (f"203.0.{i % 250}.{i % 199 + 1}", 1024 + i)
        net.to_hub(rng.randbytes(rng.choice(sizes)), src)
        if i % 9000 == 4500:
            roams += 1
            net.peers["p1"].address = (f"198.18.9.{roams}", 7800)
            net.send("p1", f"roam {roams}".encode())
            assert net.hub_messages["p1"][-1:] == [f"roam {roams}".encode()]
            assert net.hub("p1").endpoint == net.peers["p1"].address
    assert stats.rate_limited == 0
    assert stats.signature_checks == spent and stats.identified_trial == trials + roams
    net.assert_consistent()


def test_garbage_that_drains_trial_decryption_cannot_starve_a_roaming_key_exchange() -> None:
    """Session-sized garbage costs a trial of every session (32 units a datagram at the
    trial limit) and may exhaust that bucket; a key exchange's cheap check has a bucket of
    its own, so a peer that restarted somewhere else is still found by its key exchange."""
    net = established_net(["p1", "p2", "p3", "p4"], key_checks_per_second=200.0)
    p1 = net.peers["p1"]
    p1.address = ("198.18.9.40", 7900)
    p1.session = Session(  # p1 restarted behind a new address
        p1.identity,
        HUB_ID.public_key,
        created_at_ns=1_700_000_000_000_000_000 + 10**9,
        options=p1.session.options,
        random=net.rng.randbytes,
        endpoint=HUB,
    )
    rng = random.Random(10)
    kx_before = net.demux.stats.identified_kx
    for step in range(300):  # 3 s
        for k in range(20):  # 2,000 a second, 4 units each: 8,000 units against 200
            net.to_hub(rng.randbytes(300), ("203.0.113.9", 1024 + step * 20 + k))
        if step == 100:
            p1.session.start(net.now)
        net.run(0.01, step=0.01)
    stats = net.demux.stats
    assert stats.rate_limited > 5000
    assert stats.identified_kx > kx_before
    assert net.hub("p1").endpoint == p1.address
    net.send("p1", b"back after the restart")
    assert net.hub_messages["p1"][-1:] == [b"back after the restart"]
    net.assert_consistent()
