"""Message types, SessionIDs and the message framing inside a packet (PROTOCOL §3.1, §5, §7.3).

Parsing never trusts a length from the wire: every slice is checked against the buffer,
and a truncated header or a length that runs past the end raises ``MalformedError`` after
the complete messages before it were yielded, as the reference delivers them too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .constants import MESSAGE_FLAG_CONFIDENTIAL, MESSAGE_HEADER_SIZE, SESSION_ID_SIZE
from .errors import MalformedError

MESSAGE_HEADER: Final = struct.Struct("<IIB")
_SESSION_ID: Final = struct.Struct("<QQ")


class MessageType:
    """The uint32 message types. User channels are ``channel(n) = n + 1``."""

    UNDEFINED: Final = 0x00000000
    KEY_EXCHANGE: Final = 0xFFFFFFFE
    NEGOTIATION: Final = 0xFFFFFFFD
    READ_WRITE: Final = 0xFFFFFFFC
    RESERVED_ABOVE: Final = 0xFFFFFFED
    """Types from here up (and the three above) are not user channels."""
    MAX_CHANNEL: Final = 0xFFFFFFEB

    @staticmethod
    def channel(n: int) -> int:
        """The type of user channel ``n`` (0 <= n <= 0xFFFFFFEB)."""
        if not 0 <= n <= MessageType.MAX_CHANNEL:
            raise ValueError(f"channel id must be in 0..{MessageType.MAX_CHANNEL}, got {n}")
        return n + 1

    @staticmethod
    def is_internal(message_type: int) -> bool:
        """Internal types bypass the payload limit and aggregation (§5.3)."""
        return message_type in (MessageType.KEY_EXCHANGE, MessageType.NEGOTIATION)

    @staticmethod
    def name(message_type: int) -> str:
        names = {
            MessageType.KEY_EXCHANGE: "key-exchange",
            MessageType.NEGOTIATION: "negotiation",
            MessageType.READ_WRITE: "read-write",
            MessageType.UNDEFINED: "undefined",
        }
        if message_type in names:
            return names[message_type]
        if 1 <= message_type <= MessageType.MAX_CHANNEL + 1:
            return f"channel-{message_type - 1}"
        return f"reserved-0x{message_type:08x}"


@dataclass(frozen=True, slots=True, order=True)
class SessionID:
    """A session's identity on the wire: ``LE64(CreatedAt) || LE64(Random)``.

    ``created_at`` is UnixNano of the session's creation; a peer restart shows as a larger
    value, which is how a receiver tells a restart from a replay (§13 item 10).
    """

    created_at: int
    random: int

    def to_bytes(self) -> bytes:
        return _SESSION_ID.pack(self.created_at, self.random)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SessionID:
        if len(data) != SESSION_ID_SIZE:
            raise MalformedError(f"SessionID must be {SESSION_ID_SIZE} bytes, got {len(data)}")
        created_at, random = _SESSION_ID.unpack(data)
        return cls(created_at, random)

    def __str__(self) -> str:
        return self.to_bytes().hex()


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a packet: its type, flags and payload (a view into the packet)."""

    type: int
    flags: int
    payload: bytes | memoryview


def encode_message(
    message_type: int, payload: bytes | memoryview, flags: int = MESSAGE_FLAG_CONFIDENTIAL
) -> bytes:
    return MESSAGE_HEADER.pack(message_type, len(payload), flags) + payload


def iter_messages(buf: bytes | memoryview) -> Iterator[Message]:
    """Walk the 9-byte headers of an opened packet's message area.

    Payloads are memoryviews into ``buf`` so that splitting an aggregated packet copies
    nothing. Raises ``MalformedError`` at the first truncated header or overlong length.
    """
    view = memoryview(buf).cast("B")  # lengths in bytes whatever the buffer's item size
    end = len(view)
    pos = 0
    unpack = MESSAGE_HEADER.unpack_from
    while pos < end:
        if end - pos < MESSAGE_HEADER_SIZE:
            raise MalformedError(f"truncated message header at offset {pos}")
        mtype, length, flags = unpack(view, pos)
        start = pos + MESSAGE_HEADER_SIZE
        stop = start + length
        if stop > end:
            raise MalformedError(f"message length {length} at offset {pos} runs past the end")
        yield Message(mtype, flags, view[start:stop])
        pos = stop


def split_messages(buf: bytes | memoryview) -> tuple[list[tuple[int, int, bytes]], bool]:
    """All messages of an opened packet at once: ``([(type, flags, payload), ...],
    complete)``; ``complete`` is False when a truncated header or an overlong length
    ended the walk, after the messages before it (as ``iter_messages`` raises there).

    The receive path's shape: one call per packet, payloads as their own bytes (a small
    packet is copied once anyway, to outlive the receive buffer). The reference for
    ``_accel.split_messages``, which the session uses when it is built.
    """
    out: list[tuple[int, int, bytes]] = []
    try:
        for m in iter_messages(buf):
            out.append((m.type, m.flags, bytes(m.payload)))
    except MalformedError:
        return out, False
    return out, True
