"""One datagram's PacketID lent to an executor outside the session.

The daemon's C lone-packet hop (``daemon/lone.py``) seals and sends the only packet of a
wake-up between two waits, without returning to Python: a cold Python wake-up costs more
than the system calls around it. The session stays the one owner of its PacketIDs: it
lends the next one (``Session.reserve_message``), with everything needed to seal one
message exactly as ``Session.seal_message_now`` would, and takes it back before it does
anything else (``Settle``). A PacketID is therefore used at most once whatever the executor
does: the session reuses one only on the executor's word that it never went out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .packet import PacketKey
from .path import Address


class Reservation(NamedTuple):
    """Seal at most one message: ``MESSAGE_HEADER(message_type, len(payload), flags) +
    payload`` with ``packet.seal(key, packet_id, ..., packet_id_mask)``, only if
    ``len(payload) <= max_payload``, and send it to ``endpoint``."""

    key: PacketKey
    packet_id: int
    packet_id_mask: int
    message_type: int
    flags: int
    max_payload: int
    """Bytes; the session's packet size, lower while the path prober waits to confirm a
    size (a larger datagram would move ``get_timer`` earlier behind the session's back)."""
    endpoint: Address


class ReservationUse(NamedTuple):
    """What the executor did with a reservation it used."""

    sent_at: float
    """Monotonic seconds (the clock the session's ``now`` comes from)."""
    datagram_size: int
    """Bytes of the sealed datagram (44 + 9 + payload)."""
    payload_size: int
    """Bytes of the message's payload."""


Settle = Callable[[], ReservationUse | None]
"""Disarms the executor; ``None`` only when the PacketID certainly never went out."""


class ReceiveReservation(NamedTuple):
    """Take at most one datagram: from ``endpoint`` only, opening under one of ``keys``
    (``(stream_key, mac_seed)`` pairs, tried in order, as ``packet.open_ring`` tries
    them), PacketID (after ``packet_id_mask``) above ``latest``, plaintext exactly one
    message ``MESSAGE_HEADER(message_type, length, flags)`` whose length fills it. Anything
    else goes to ``Session.receive_datagram`` as it came, with nothing changed."""

    keys: tuple[tuple[bytes | None, bytes], ...]
    packet_id_mask: int
    latest: int
    message_type: int
    flags: int
    endpoint: Address


class ReceiveUse(NamedTuple):
    """What the executor received with a receive reservation it used."""

    packet_id: int
    received_at: float
    """Monotonic seconds."""
    datagram_size: int
    """Bytes of the datagram as it arrived."""


SettleReceive = Callable[[], ReceiveUse | None]
"""Disarms the executor; ``None`` when it took no datagram."""
