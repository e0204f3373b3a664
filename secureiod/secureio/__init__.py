"""secureio, sans-IO: the wire format, crypto and state machines of the secureio protocol.

Bytes and times go in; bytes, events and timers come out. Nothing here opens a socket,
starts a thread or reads a clock, so the protocol can be tested without a network and
lifted out as a library. Wire-compatible with xaionaro-go/secureio (HEAD e0fcfed).
"""

from .demux import Demultiplexer, DemuxStats
from .errors import (
    AuthenticationError,
    IdentityError,
    InvalidKeyError,
    MalformedError,
    PayloadTooBigError,
    SecureioError,
)
from .events import PathChanged
from .fragment import FragmentHeader
from .keys import PskKeys, derive_cipher_key
from .kx_message import AnswersMode, KeyExchangeMessage
from .negotiation_message import (
    NegotiationControl,
    NegotiationProbe,
    decode_negotiation,
    encode_ping,
    pong_for,
)
from .packet import OpenedPacket, PacketClass, PacketKey, open_packet, seal
from .path import Address, path_key, same_path
from .replay import ReplayWindow
from .wire import Message, MessageType, SessionID, encode_message, iter_messages

__all__ = [
    "Address",
    "AnswersMode",
    "AuthenticationError",
    "Demultiplexer",
    "DemuxStats",
    "FragmentHeader",
    "IdentityError",
    "InvalidKeyError",
    "KeyExchangeMessage",
    "MalformedError",
    "Message",
    "MessageType",
    "NegotiationControl",
    "NegotiationProbe",
    "OpenedPacket",
    "PacketClass",
    "PacketKey",
    "PathChanged",
    "PayloadTooBigError",
    "PskKeys",
    "ReplayWindow",
    "SecureioError",
    "SessionID",
    "decode_negotiation",
    "derive_cipher_key",
    "encode_message",
    "encode_ping",
    "iter_messages",
    "open_packet",
    "path_key",
    "pong_for",
    "same_path",
    "seal",
]
