"""The 146-byte key-exchange message (PROTOCOL §7.1).

``signature(64) || SessionID(16) || Ed25519 public(32) || X25519 public(32) ||
AnswersMode(1) || Flags(1)``; the signature covers the 82 bytes after it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Final, Protocol

from .constants import KX_FLAG_IS_ANSWER, KX_PAYLOAD_SIZE, KX_SIGNED_SIZE
from .errors import MalformedError
from .wire import SessionID

_SIGNED: Final = struct.Struct("<QQ32s32sBB")
SIGNATURE_SIZE: Final = 64


class AnswersMode(enum.IntEnum):
    """How key-exchange messages are answered and what confirms a rotation (§7.5).

    Both peers must use the same mode; the reference closes the session on a mismatch,
    we ignore such a message unless its signature verifies (§13 item 15).
    """

    ANSWER_AND_WAIT = 1
    ANSWER = 2
    DISABLE = 3


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    def verify(self, signature: bytes, data: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class KeyExchangeMessage:
    session_id: SessionID
    identity_key: bytes
    """The sender's Ed25519 public key (ignored by receivers that pin the peer's key)."""
    x25519_public: bytes
    answers_mode: int
    is_answer: bool
    signature: bytes = b""

    def signed_bytes(self) -> bytes:
        if len(self.identity_key) != 32 or len(self.x25519_public) != 32:
            raise ValueError("key-exchange keys must be 32 bytes each")
        return _SIGNED.pack(
            self.session_id.created_at,
            self.session_id.random,
            self.identity_key,
            self.x25519_public,
            self.answers_mode,
            KX_FLAG_IS_ANSWER if self.is_answer else 0,
        )

    def signed_by(self, signer: Signer) -> KeyExchangeMessage:
        return replace(self, signature=signer.sign(self.signed_bytes()))

    def encode(self) -> bytes:
        if len(self.signature) != SIGNATURE_SIZE:
            raise ValueError("key-exchange message is not signed")
        return self.signature + self.signed_bytes()

    @classmethod
    def decode(cls, payload: bytes | memoryview) -> KeyExchangeMessage:
        """Bytes beyond 146 are ignored, as the reference does."""
        if len(payload) < KX_PAYLOAD_SIZE:
            raise MalformedError(f"key-exchange payload of {len(payload)} bytes, need 146")
        created_at, rnd, ed_pub, x_pub, mode, flags = _SIGNED.unpack_from(payload, SIGNATURE_SIZE)
        return cls(
            SessionID(created_at, rnd),
            ed_pub,
            x_pub,
            mode,
            bool(flags & KX_FLAG_IS_ANSWER),
            bytes(payload[:SIGNATURE_SIZE]),
        )

    def verify(self, key: Verifier) -> bool:
        """True only if ``key`` made the signature; never raises for forged input."""
        return key.verify(self.signature, self.signed_bytes())


assert _SIGNED.size == KX_SIGNED_SIZE
