"""``Session.write_messages`` and ``SendPath.write_run`` against their one-at-a-time
definitions (review 10b): the edges the random twins of ``test_write_messages`` do not
reach (runts, send_delay 0, closed sessions, lent PacketIDs, views, an exact fill), and
the TUN loop's runs against ``SendPath.write`` for each packet, on real sessions, with
several peers, every session state and every kind of packet in one read."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from identities import ID_A, ID_B
from test_lone_path import ADDR_B, RW, _established, _session, _state

from secureiod.daemon.offload import CAP_VNET, VNET_HDR_SIZE, VNET_TYPE
from secureiod.daemon.peer import DATA_TYPE, PeerCounters
from secureiod.daemon.send import BatchSize, SendPath
from secureiod.secureio.reservation import ReservationUse
from secureiod.secureio.session import Session
from secureiod.secureio.wire import MESSAGE_HEADER_SIZE

# -- Session.write_messages ---------------------------------------------------------------


def _full_state(s: Session) -> dict[str, Any]:
    """``_state`` plus what it sees only through later sends (the batch's size and its
    own deadline: ``get_timer`` shows only the earliest of several deadlines)."""
    return {**_state(s), "batch_size": s._batch_size, "deadline": s._batch_deadline}


def _each(s: Session, payloads: list[Any], now: float, offset: int) -> list[tuple[int, type]]:
    refused = []
    for i, p in enumerate(payloads):
        try:
            s.write_message(RW, p[offset:] if offset else p, now)
        except Exception as exc:  # compared by type with what the batch returns
            refused.append((i, type(exc)))
    return refused


def _same(a1: Session, a2: Session, payloads: list[Any], now: float, offset: int = 0) -> None:
    want = _each(a1, payloads, now, offset)
    got = [(i, type(exc)) for i, exc in a2.write_messages(RW, payloads, now, offset)]
    assert got == want
    assert _full_state(a2) == _full_state(a1)
    for s in (a1, a2):
        s.flush(now)
    assert a2.datagrams_to_send(now) == a1.datagrams_to_send(now)
    assert _full_state(a2) == _full_state(a1)


def _twins(**kw: Any) -> tuple[Session, Session, float]:
    a1, _, now = _established(**kw)
    a2, _, now2 = _established(**kw)
    assert now == now2 and _state(a1) == _state(a2)
    return a1, a2, now


def test_a_runt_below_the_offset_is_an_empty_message_as_write_message_makes_it() -> None:
    """``p[offset:]`` of a payload shorter than ``offset`` is empty: ``write_message``
    sends an empty message; the batch must not pack a negative length (struct.error)
    and leave a message in the batch that its size and deadline do not know about."""
    a1, a2, now = _twins()
    _same(a1, a2, [b"x" * 40, b"abc", b"", b"y" * 40], now, offset=10)


@pytest.mark.parametrize("fragments", [True, False], ids=["fragments", "no-fragments"])
@pytest.mark.parametrize(
    "kind", [bytes, bytearray, memoryview, lambda b: memoryview(bytearray(b))], ids=repr
)
def test_views_and_bytearrays_give_the_same_datagrams(kind: Any, fragments: bool) -> None:
    a1, a2, now = _twins(enable_fragmentation=fragments)
    sizes = [40, 3000, 60, a1.payload_size, a1.payload_size + 1, 9, 0]
    payloads = [kind(bytes([i]) * (n + 10)) for i, n in enumerate(sizes)]
    _same(a1, a2, payloads, now, offset=10)


def test_send_delay_zero_seals_each_message_at_once() -> None:
    a1, a2, now = _twins(send_delay=0.0)
    _same(a1, a2, [bytes([i]) * (i + 1) for i in range(30)], now)
    assert not a2._batch


@pytest.mark.parametrize("how", ["closing", "closed"])
def test_a_closed_session_refuses_every_payload(how: str) -> None:
    a1, a2, now = _twins()
    for s in (a1, a2):
        if how == "closed":
            s.close(now)
        else:
            s._set_state(type(s.state).CLOSING)
    _same(a1, a2, [b"x" * 40, b"y" * 50], now)


@pytest.mark.parametrize("used", [True, False], ids=["used", "unused"])
def test_a_lent_packet_id_is_settled_first(used: bool) -> None:
    a1, a2, now = _twins()
    for s in (a1, a2):
        use = ReservationUse(now, 44 + MESSAGE_HEADER_SIZE + 100, 100) if used else None
        assert s.reserve_message(RW, lambda use=use: use) is not None
    _same(a1, a2, [b"x" * 40, b"y" * 50], now)


def test_an_empty_list_changes_nothing() -> None:
    _, a2, now = _twins()
    before = _full_state(a2)
    assert a2.write_messages(RW, [], now) == []
    assert _full_state(a2) == before


@pytest.mark.parametrize("spare", [-1, 0, 1])
def test_a_batch_that_fills_the_datagram_exactly(spare: int) -> None:
    """The flush rule at its edge: messages that fill one datagram to the byte, one byte
    over, and one byte under."""
    a1, a2, now = _twins()
    first = 200
    last = a1.payload_size - first - 2 * MESSAGE_HEADER_SIZE + spare
    _same(a1, a2, [b"a" * first, b"b" * last, b"c" * 5], now)


def test_a_partial_batch_keeps_its_earlier_deadline() -> None:
    a1, a2, now = _twins()
    for s in (a1, a2):
        s.write_message(RW, b"early", now)
    _same(a1, a2, [b"x" * 40, b"y" * 50], now + 0.00002)


# -- SendPath.write_run: the TUN loop against ``write`` for each packet ----------------------


class _Peer:
    """What the send path uses of a ``daemon.peer.Peer``."""

    def __init__(self, session: Session | None, caps: int) -> None:
        self.session = session
        self.counters = PeerCounters()
        self.offload = type("Offload", (), {"remote_caps": caps})()
        self.timer = None


class _Router:
    """Destination 198.19.0.<n> belongs to ``peers[n]``; anything else has no route."""

    def __init__(self, peers: dict[int, _Peer]) -> None:
        self.peers = peers

    def lookup_destination(self, packet: bytes, offset: int = 0) -> _Peer | None:
        if len(packet) - offset < 20 or packet[offset] >> 4 != 4:
            return None
        if packet[offset + 16 : offset + 19] != bytes([198, 19, 0]):
            return None
        return self.peers.get(packet[offset + 19])


class _WholeBatch(BatchSize):
    """Every read takes a whole batch (no lone-packet shortcut)."""

    def on_wake(self, now: float) -> int:
        return 256


class _Tun:
    def __init__(self, vnet_hdr: bool, bufs: list[bytes]) -> None:
        self.vnet_hdr = vnet_hdr
        self.bufs = bufs

    def read_batch(self, size: int, bufsize: int = 0) -> list[bytes]:
        out, self.bufs = self.bufs[:size], self.bufs[size:]
        return out


_CSUM = struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 6)


def _packet(rng: random.Random, dst: int, size: int) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + size, 0, 0, 64, 17, 0, bytes(4), b"")
    return header[:16] + bytes([198, 19, 0, dst]) + rng.randbytes(size)


def _world(seed: int, fragments: bool) -> tuple[SendPath, dict[int, _Peer], float]:
    """Five peers: established with and without CAP_VNET, started but not established,
    no session, closed."""
    est1, _, now = _established(enable_fragmentation=fragments)
    est2, _, _ = _established(enable_fragmentation=fragments)
    closed, _, _ = _established(enable_fragmentation=fragments)
    closed.close(now)
    waiting = _session(ID_A, ID_B, 3, ADDR_B, enable_fragmentation=fragments)
    waiting.start(now)  # key exchange under way: messages queue
    waiting.datagrams_to_send(now)
    peers = {
        1: _Peer(est1, CAP_VNET),
        2: _Peer(est2, 0),
        3: _Peer(waiting, CAP_VNET),
        4: _Peer(None, CAP_VNET),
        5: _Peer(closed, CAP_VNET),
    }
    send = SendPath(_Tun(False, []), None, _Router(peers), set(), _WholeBatch())  # type: ignore[arg-type]
    return send, peers, now


def _one_at_a_time(send: SendPath, bufs: list[bytes], vnet: bool, now: float) -> None:
    """The TUN loop before ``write_run`` (46ba998^): ``write`` for each packet."""
    for buf in bufs:
        offset = VNET_HDR_SIZE if vnet else 0
        peer = send.router.lookup_destination(buf, offset)
        if peer is None:
            send.no_route += 1
            continue
        if not vnet or (buf[0] == 0 and buf[1] == 0):
            mtype, payload = DATA_TYPE, buf[offset:]
        elif peer.offload.remote_caps & CAP_VNET:
            mtype, payload = VNET_TYPE, buf
        else:
            peer.counters.drops["offload-unsupported"] += 1
            continue
        if send.write(peer, mtype, payload, now):
            peer.counters.tx_packets += 1
            peer.counters.tx_bytes += len(buf) - offset
        send.dirty.add(peer)


def _observed(send: SendPath, peers: dict[int, _Peer], now: float) -> Any:
    out = {
        "no_route": send.no_route,
        "dirty": sorted(n for n, p in peers.items() if p in send.dirty),
    }
    for n, p in peers.items():
        s = p.session
        sent = None
        if s is not None:
            s.flush(now)
            sent = (s.datagrams_to_send(now), _full_state(s))
        out[n] = (p.counters.tx_packets, p.counters.tx_bytes, dict(p.counters.drops), sent)
    return out


@pytest.mark.parametrize("fragments", [True, False], ids=["fragments", "no-fragments"])
@pytest.mark.parametrize("vnet", [True, False], ids=["vnet", "plain"])
@pytest.mark.parametrize("seed", range(4))
def test_runs_count_and_send_as_one_write_at_a_time(seed: int, vnet: bool, fragments: bool) -> None:
    rng = random.Random(seed)
    bufs = []
    for _ in range(rng.randrange(2, 120)):
        dst = rng.choice([1, 1, 1, 2, 3, 4, 5, 9])  # 9: no route
        r = rng.random()
        size = rng.randrange(0, 100) if r < 0.8 else rng.randrange(1300, 4000)
        packet = _packet(rng, dst, size)
        if rng.random() < 0.05:
            packet = packet[: rng.randrange(0, 20)]  # a runt
        if vnet:
            header = bytes(VNET_HDR_SIZE) if rng.random() < 0.6 else _CSUM
            packet = header + packet
        bufs.append(packet)
    old, old_peers, now = _world(seed, fragments)
    new, new_peers, _ = _world(seed, fragments)
    _one_at_a_time(old, bufs, vnet, now)
    new.tun = _Tun(vnet, list(bufs))  # type: ignore[assignment]
    new.on_tun(now)
    assert _observed(new, new_peers, now) == _observed(old, old_peers, now)
