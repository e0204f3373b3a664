"""A PacketID lent to an executor outside the session (``Session.reserve_message``,
``secureio/reservation.py``): the daemon's C lone-packet hop seals with it.

The executor here is Python (``packet.seal`` with the reservation's fields), so these tests
need no C build; ``tests/test_fastpath_c.py`` checks that the C hop seals the same bytes.
What must hold: the datagram is the one ``seal_message_now`` makes on a twin session, the
session's counters and timers come out as if it had sent it, an unused PacketID comes back,
and no PacketID can be used twice whatever the executor does.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import asdict
from typing import Any

import pytest
from identities import ID_A, ID_B
from test_lone_path import ADDR_A, ADDR_B, RW, _established, _session, _state

from secureiod.secureio import MessageType
from secureiod.secureio.constants import MESSAGE_HEADER_SIZE
from secureiod.secureio.errors import SecureioError
from secureiod.secureio.events import MessageReceived
from secureiod.secureio.packet import KeyRing, open_ring, seal
from secureiod.secureio.pmtu import CONFIRM_MIN_SIZE
from secureiod.secureio.reservation import (
    ReceiveReservation,
    ReceiveUse,
    Reservation,
    ReservationUse,
)
from secureiod.secureio.session import Session
from secureiod.secureio.wire import MESSAGE_HEADER


class Executor:
    """Plays the C hop: seals one message with a reservation, or not."""

    def __init__(self) -> None:
        self.reservation: Reservation | None = None
        self.sent: ReservationUse | None = None
        self.settles = 0

    def arm(self, s: Session) -> Reservation | None:
        self.reservation = s.reserve_message(RW, self.settle)
        self.sent = None
        return self.reservation

    def send(self, payload: bytes, now: float) -> bytes | None:
        r = self.reservation
        if r is None or self.sent is not None or len(payload) > r.max_payload:
            return None
        messages = MESSAGE_HEADER.pack(r.message_type, len(payload), r.flags) + payload
        datagram = seal(r.key, r.packet_id, messages, r.packet_id_mask)
        self.sent = ReservationUse(now, len(datagram), len(payload))
        return datagram

    def settle(self) -> ReservationUse | None:
        self.settles += 1
        self.reservation = None
        return self.sent


@pytest.mark.parametrize("psk", [None, b"a pre-shared key"])
def test_a_used_reservation_is_seal_message_now_byte_for_byte(psk: bytes | None) -> None:
    hop_a, hop_b, now = _established(psk=psk, send_delay=50e-6)
    twin_a, twin_b, _ = _established(psk=psk, send_delay=50e-6)
    ex = Executor()
    for size in (84, 0, 300, 84, CONFIRM_MIN_SIZE):
        payload = bytes((size + i) % 256 for i in range(size))
        now += 0.02
        r = ex.arm(hop_a)
        assert r is not None and r.endpoint == ADDR_B
        datagram = ex.send(payload, now)
        assert datagram is not None
        sealed = twin_a.seal_message_now(RW, payload, now)
        assert sealed == (datagram, ADDR_B)
        settles = ex.settles
        hop_a.settle_reservation()
        assert ex.settles == settles + 1
        assert _state(hop_a) == _state(twin_a)
        hop_b.receive_datagram(datagram, ADDR_A, now)
        twin_b.receive_datagram(sealed[0], ADDR_A, now)
        assert hop_b.next_event() == twin_b.next_event()
    assert hop_a.stats == twin_a.stats and hop_a.last_sent == now


def test_an_unused_packet_id_comes_back_and_the_next_datagram_is_unchanged() -> None:
    a, _, now = _established(send_delay=50e-6)
    twin, _, _ = _established(send_delay=50e-6)
    before = _state(a)
    ex = Executor()
    assert ex.arm(a) is not None
    assert a._next_pid == before["next_pid"] + 1  # lent out
    a.settle_reservation()
    assert _state(a) == before
    # the general path goes on with the same PacketID the twin uses
    a.write_message(RW, b"after", now)
    a.flush(now)
    twin.write_message(RW, b"after", now)
    twin.flush(now)
    assert a.datagrams_to_send(now) == twin.datagrams_to_send(now)


def test_a_settle_that_fails_never_gives_the_packet_id_back() -> None:
    a, _, now = _established()
    used: list[int] = []

    def broken() -> ReservationUse | None:
        raise RuntimeError("executor lost track")

    r = a.reserve_message(RW, broken)
    assert r is not None
    used.append(r.packet_id)
    with pytest.raises(RuntimeError):
        a.settle_reservation()
    a.write_message(RW, b"next", now)
    a.flush(now)
    assert a._next_pid > r.packet_id + 1  # the general path sealed with a new PacketID
    assert a._reservation is None


# Every public Session method either settles a lent PacketID first or only reads state
# that the daemon settles right after each wait. A new public method must be put in one of
# the two lists, which makes its author decide.
SETTLES: dict[str, Any] = {
    "start": lambda s, now: s.start(now),
    "set_endpoint": lambda s, now: s.set_endpoint(ADDR_B),
    "receive_datagram": lambda s, now: s.receive_datagram(b"junk" * 20, ADDR_B, now),
    "receive_datagram_run": lambda s, now: s.receive_datagram_run(b"j" * 200, 100, ADDR_B, now),
    "open_run": lambda s, now: s.open_run(b"j" * 200, 100),
    "receive_group": lambda s, now: s.receive_group(None, 0, ADDR_B, now),
    "write_message": lambda s, now: s.write_message(RW, b"x", now),
    "write_messages": lambda s, now: s.write_messages(RW, [b"x"], now),
    "seal_message_now": lambda s, now: s.seal_message_now(RW, b"x", now),
    "reserve_message": lambda s, now: s.reserve_message(RW, lambda: None),
    "reserve_receive": lambda s, now: s.reserve_receive(RW, lambda: None),
    "settle_reservation": lambda s, now: s.settle_reservation(),
    "flush": lambda s, now: s.flush(now),
    "handle_timer": lambda s, now: s.handle_timer(now),
    "report_too_big": lambda s, now: s.report_too_big(1500, now),
    "report_path_limit": lambda s, now: s.report_path_limit(1200, now),
    "close": lambda s, now: s.close(now),
    "datagrams_to_send": lambda s, now: s.datagrams_to_send(now),
    "datagram_runs_to_send": lambda s, now: s.datagram_runs_to_send(now),
}
READS_ONLY = {
    "get_timer",
    "next_event",
    "take_events",
    "put_back_events",
    "take_lone_message",
    "owns_datagram",
    "refuses_key_exchange",
}


def test_every_public_method_is_classified() -> None:
    public = {
        name
        for name, member in inspect.getmembers(Session)
        if not name.startswith("_") and inspect.isfunction(member)
    }
    assert public == set(SETTLES) | READS_ONLY


@pytest.mark.parametrize("method", sorted(SETTLES))
def test_each_method_that_can_seal_or_change_the_rules_settles_first(method: str) -> None:
    """Both kinds lent out: every method takes both back before it does anything, but
    each ``reserve_*`` only its own kind (the daemon arms a lane's two halves in turn)."""
    a, _, now = _established()
    order: list[str] = []
    pid_before = a._next_pid

    def settle() -> ReservationUse | None:
        order.append("send")
        assert a._next_pid == pid_before + 1  # nothing sealed after the lent PacketID yet
        return None

    def settle_receive() -> ReceiveUse | None:
        order.append("receive")
        return None

    assert a.reserve_message(RW, settle) is not None
    assert a.reserve_receive(RW, settle_receive) is not None
    assert order == [] and a._lent
    # junk arguments may be refused: what matters is that the settle came first
    with contextlib.suppress(Exception):
        SETTLES[method](a, now + 0.01)
    expected = {"reserve_message": ["send"], "reserve_receive": ["receive"]}
    assert order == expected.get(method, ["receive", "send"]), method
    if not method.startswith("reserve_"):
        assert a._reservation is None and a._receive_reservation is None and not a._lent
    assert a._lent == (a._reservation is not None or a._receive_reservation is not None)


def test_reserve_declines_whenever_seal_message_now_would() -> None:
    a, _, now = _established(send_delay=50e-6)
    ex = Executor()
    a.write_message(RW, b"batched", now)
    before = _state(a)
    assert ex.arm(a) is None and _state(a) == before
    a.flush(now)
    assert ex.arm(a) is None  # a sealed datagram waits to go out
    a.datagrams_to_send(now)
    a.set_endpoint(None)
    assert ex.arm(a) is None
    a.set_endpoint(ADDR_B)
    assert a.reserve_message(MessageType.KEY_EXCHANGE, ex.settle) is None
    assert ex.arm(a) is not None
    a.close(now)
    assert ex.settles == 1
    assert ex.arm(a) is None
    fresh = _session(ID_A, ID_B, 1, ADDR_B)
    assert ex.arm(fresh) is None  # not established


def test_the_size_limit_keeps_the_prober_deadline_with_the_general_path() -> None:
    a, _, now = _established()
    assert a._prober.active
    a._largest_sent = 0
    ex = Executor()
    r = ex.arm(a)
    assert r is not None
    assert r.max_payload == min(a.payload_size, CONFIRM_MIN_SIZE)
    # a size seal_message_now would decline is one the executor must not send either
    assert ex.send(b"x" * (CONFIRM_MIN_SIZE + 1), now) is None
    a.settle_reservation()
    assert a.seal_message_now(RW, b"x" * (CONFIRM_MIN_SIZE + 1), now) is None


# -- receiving ---------------------------------------------------------------------------------


class ReceiveExecutor:
    """Plays the C hop's receive side: takes one datagram under the reservation's rules."""

    def __init__(self, s: Session) -> None:
        self.session = s
        self.reservation: ReceiveReservation | None = None
        self.used: ReceiveUse | None = None
        self.delivered: list[bytes] = []

    def arm(self) -> ReceiveReservation | None:
        self.reservation = self.session.reserve_receive(RW, self.settle)
        self.used = None
        return self.reservation

    def take(self, datagram: bytes, addr: Any, now: float) -> bool:
        r = self.reservation
        if r is None or self.used is not None or addr != r.endpoint:
            return False
        keys = [k for k in self.session._ring.keys if (k.stream_key, k.mac_seed) in r.keys]
        try:
            pid, _, messages = open_ring(datagram, KeyRing(keys), r.packet_id_mask)
        except SecureioError:
            return False
        if pid <= r.latest or len(messages) < MESSAGE_HEADER_SIZE:
            return False
        mtype, length, flags = MESSAGE_HEADER.unpack_from(messages)
        if (mtype, flags) != (r.message_type, r.flags) or length + 9 != len(messages):
            return False
        self.delivered.append(messages[MESSAGE_HEADER_SIZE:])
        self.used = ReceiveUse(pid, now, len(datagram))
        return True

    def settle(self) -> ReceiveUse | None:
        self.reservation = None
        return self.used


def _rx_state(s: Session) -> dict[str, Any]:
    return {
        "stats": asdict(s.stats),
        "latest": s._replay.latest,
        "bitmap": s._replay._bitmap,
        "last_received": s.last_received,
        "failures": s._decrypt_failures,
        "heard": s._heard_session_packet,
        "timer": s.get_timer(),
    }


@pytest.mark.parametrize("psk", [None, b"a pre-shared key"])
def test_a_used_receipt_is_receive_datagram_and_next_event(psk: bytes | None) -> None:
    a, hop_b, now = _established(psk=psk)
    _, twin_b, _ = _established(psk=psk)
    ex = ReceiveExecutor(hop_b)
    for size in (84, 0, CONFIRM_MIN_SIZE, 84):
        payload = bytes((size + i) % 256 for i in range(size))
        now += 0.02
        datagram, _ = a.seal_message_now(RW, payload, now)  # type: ignore[misc]
        assert ex.arm() is not None
        assert ex.take(datagram, ADDR_A, now)
        hop_b.settle_reservation()
        twin_b.receive_datagram(datagram, ADDR_A, now)
        assert twin_b.next_event() == MessageReceived(RW, payload)
        assert ex.delivered[-1] == payload
        assert hop_b.next_event() is None  # the executor delivered it
        assert _rx_state(hop_b) == _rx_state(twin_b)
        # a replay of it is refused by the window, with or without a reservation
        assert ex.arm() is not None
        assert not ex.take(datagram, ADDR_A, now)
        hop_b.receive_datagram(datagram, ADDR_A, now)
        twin_b.receive_datagram(datagram, ADDR_A, now)
        assert _rx_state(hop_b) == _rx_state(twin_b)


def test_an_unused_receipt_changes_nothing() -> None:
    _, b, _now = _established()
    before = _rx_state(b)
    ex = ReceiveExecutor(b)
    assert ex.arm() is not None
    b.settle_reservation()
    assert _rx_state(b) == before and not b._lent


def test_a_receipt_that_breaks_the_window_rule_is_counted_not_taken() -> None:
    """An executor that reports a PacketID not above the lent ``latest`` broke the rules:
    the window does not move and the datagram counts as a replay."""
    a, b, now = _established()
    datagram, _ = a.seal_message_now(RW, b"x" * 84, now)  # type: ignore[misc]
    b.receive_datagram(datagram, ADDR_A, now)
    latest = b._replay.latest
    r = b.reserve_receive(RW, lambda: ReceiveUse(latest, now, 137))
    assert r is not None and r.latest == latest
    before = _rx_state(b)
    b.settle_reservation()
    after = _rx_state(b)
    assert (
        after["latest"] == before["latest"]
        and after["stats"]["rx_packets"] == before["stats"]["rx_packets"]
    )
    assert after["stats"]["drops"].get("replay", 0) == before["stats"]["drops"].get("replay", 0) + 1


def test_receive_declines_outside_the_steady_state() -> None:
    _, b, _ = _established()
    fresh = _session(ID_B, ID_A, 2, ADDR_A)
    assert fresh.reserve_receive(RW, lambda: None) is None  # not established
    assert b.reserve_receive(MessageType.KEY_EXCHANGE, lambda: None) is None
    b._kx.watching = True
    assert b.reserve_receive(RW, lambda: None) is None
    b._kx.watching = False
    b.set_endpoint(None)
    assert b.reserve_receive(RW, lambda: None) is None
    b.set_endpoint(ADDR_A)
    r = b.reserve_receive(RW, lambda: None)
    assert r is not None and r.endpoint == ADDR_A and r.keys
    assert all(pair in b._ring.pairs for pair in r.keys)
    assert b._fallback.mac_seed not in [seed for _, seed in r.keys]
