"""What a session reports to its caller, drained with ``Session.next_event()``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .path import Address


class SessionState(enum.IntEnum):
    """Life cycle (§11.1); the numbers are the reference's, local only, never sent."""

    NEW = 0
    CLOSED = 1
    KEY_EXCHANGING = 2
    NEGOTIATING = 3
    ESTABLISHED = 4
    CLOSING = 6


class DropReason(enum.Enum):
    """Why an input datagram or message was dropped; each has a counter in ``SessionStats``."""

    EMPTY = "empty"
    MALFORMED = "malformed"
    """Shorter than a header, Length inconsistent, PacketID 0."""
    AUTH = "auth"
    """No key verifies it: garbage, forgery, or a key we no longer hold."""
    REPLAY = "replay"
    UNENCRYPTED_PAYLOAD = "unencrypted-payload"
    """A clear/aux packet carrying anything but key exchange: the §13 item 1 injection."""
    TRUNCATED_MESSAGE = "truncated-message"
    KX_MALFORMED = "kx-malformed"
    KX_BAD_SIGNATURE = "kx-bad-signature"
    KX_MODE_MISMATCH = "kx-mode-mismatch"
    KX_BAD_KEY = "kx-bad-key"
    KX_STALE_SESSION = "kx-stale-session"
    KX_REPLAYED = "kx-replayed"
    KX_RATE_LIMITED = "kx-rate-limited"
    """More key-exchange messages than any real peer sends: each costs a signature check,
    so beyond the budget they are dropped unchecked."""
    NEGOTIATION_MALFORMED = "negotiation-malformed"
    FRAGMENT_INVALID = "fragment-invalid"
    FRAGMENT_DUPLICATE = "fragment-duplicate"
    NOT_ACCEPTING = "not-accepting"
    """Received while the session is new or closed."""
    EVENT_QUEUE_FULL = "event-queue-full"
    """More events than the caller drained (bounded at 65536)."""
    SEND_TOO_BIG = "send-too-big"
    """The I/O layer reported EMSGSIZE for a non-probe datagram."""
    QUEUED_TOO_BIG = "queued-too-big"
    """Written before establishment, larger than the size negotiation then settled on."""
    NO_ENDPOINT = "no-endpoint"
    """An outgoing datagram produced while the peer's address is unknown (counted per
    datagram, in ``datagrams_to_send``)."""


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: SessionState
    new: SessionState


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The session adopted a new address for its peer (roaming, or the first contact of a
    peer that had none): datagrams now go to ``new``."""

    old: Address | None
    new: Address


@dataclass(slots=True)
class MessageReceived:
    """One message (created per packet: a plain slots class, cheaper than a frozen one)."""

    type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PayloadSizeNegotiated:
    size: int
    """The largest message payload the path carries in one packet (E)."""


@dataclass(frozen=True, slots=True)
class KeyRotated:
    local: bool
    """True for our own rotation, False when the peer's key changed."""


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    """The peer came back with a new SessionID; its old receive state was discarded."""


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event = (
    StateChanged
    | MessageReceived
    | PayloadSizeNegotiated
    | KeyRotated
    | PeerRestarted
    | PathChanged
    | Closed
)
