"""Negotiation (path-size probing) messages (PROTOCOL §8.2).

A ping or pong is ``subtype(1) || SHA-512(bytes 65..) || LE32(iteration) || filler`` whose
total length *is* the probed size; the filler byte at offset 69+k is ``k mod 256``.
A control message is ``0 || LE32(largest) || flags``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from .constants import NEGOTIATION_CONTROL_SIZE, NEGOTIATION_FLAG_END, NEGOTIATION_PING_MIN_SIZE
from .errors import MalformedError

SUBTYPE_CONTROL: Final = 0
SUBTYPE_PING: Final = 1
SUBTYPE_PONG: Final = 2
_CONTROL: Final = struct.Struct("<BIB")
_U32: Final = struct.Struct("<I")
_FILLER: Final = bytes(range(256)) * 256


@dataclass(frozen=True, slots=True)
class NegotiationControl:
    largest: int
    """Named ``LargestRTT`` in the reference, but it is the largest pong size received."""
    end: bool

    def encode(self) -> bytes:
        return _CONTROL.pack(SUBTYPE_CONTROL, self.largest, NEGOTIATION_FLAG_END if self.end else 0)


@dataclass(frozen=True, slots=True)
class NegotiationProbe:
    """A ping or a pong; ``size`` is the whole payload length, the quantity probed."""

    is_pong: bool
    iteration: int
    size: int


def encode_ping(iteration: int, size: int) -> bytes:
    if size < NEGOTIATION_PING_MIN_SIZE:
        raise ValueError(f"probe size must be at least {NEGOTIATION_PING_MIN_SIZE}")
    tail = _U32.pack(iteration) + _FILLER[: size - NEGOTIATION_PING_MIN_SIZE]
    return bytes([SUBTYPE_PING]) + hashlib.sha512(tail).digest() + tail


def pong_for(ping: bytes | memoryview) -> bytes:
    """The pong is the ping with byte 0 set to 2; pings are answered without checks."""
    return bytes([SUBTYPE_PONG]) + bytes(ping[1:])


def decode_negotiation(payload: bytes | memoryview) -> NegotiationControl | NegotiationProbe:
    """Raises ``MalformedError`` for unknown subtypes, short payloads and bad checksums."""
    if len(payload) < 1:
        raise MalformedError("empty negotiation message")
    subtype = payload[0]
    if subtype == SUBTYPE_CONTROL:
        if len(payload) < NEGOTIATION_CONTROL_SIZE:
            raise MalformedError(f"negotiation control of {len(payload)} bytes, need 6")
        _, largest, flags = _CONTROL.unpack_from(payload)
        return NegotiationControl(largest, bool(flags & NEGOTIATION_FLAG_END))
    if subtype in (SUBTYPE_PING, SUBTYPE_PONG):
        if len(payload) < NEGOTIATION_PING_MIN_SIZE:
            raise MalformedError(f"negotiation probe of {len(payload)} bytes, need 69")
        digest = hashlib.sha512(payload[65:]).digest()
        if not hmac.compare_digest(digest, bytes(payload[1:65])):
            raise MalformedError("negotiation probe checksum mismatch")
        (iteration,) = _U32.unpack_from(payload, 65)
        return NegotiationProbe(subtype == SUBTYPE_PONG, iteration, len(payload))
    raise MalformedError(f"unknown negotiation subtype {subtype}")
