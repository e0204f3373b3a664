"""Sealing and opening the 44-byte-header secureio container (PROTOCOL §4).

Three packet classes share one construction and differ only in keys:

=========  ===========================================  =================================
class      stream key                                   Poly1305 key input ``K``
=========  ===========================================  =================================
SESSION    HChaCha20(cipherKey, SenderSessionID)        cipherKey
AUX        auxKey (PSK)                                 auxKey
CLEAR      none: bytes 8.. travel in the clear          32 zero bytes
=========  ===========================================  =================================

For SESSION, XChaCha20 with nonce ``SessionID || LE64(PacketID)`` equals DJB ChaCha20 under
the HChaCha20 subkey with nonce ``LE64(PacketID)``; for AUX the nonce is the same
``LE64(PacketID)`` under auxKey. So every class is "ChaCha20(stream_key, pid)" and the
subkey is computed once per key and session, never per packet.

Opening checks the header tag on the first 36 plaintext bytes before decrypting the rest
(fast rejection of wrong keys and garbage), compares tags in constant time, and reports
which class and key opened the packet so the session can refuse anything but key exchange
from AUX/CLEAR packets before the replay window moves.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from blake3 import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305

from .constants import CONTAINER_HEADER_SIZE, KEY_SIZE, POLY_KEY_XOR, SESSION_ID_SIZE, TAG_SIZE
from .crypto import hchacha20, tags_equal
from .errors import AuthenticationError, MalformedError
from .reassembly import fragment_message
from .wire import MessageType

_ZERO8: Final = bytes(8)
_U32: Final = struct.Struct("<I")
_POLY_XOR_PID: Final = int.from_bytes(POLY_KEY_XOR[:8], "little")
_POLY_XOR_KEY: Final = int.from_bytes(POLY_KEY_XOR[8:32], "little")
_HEAD_PLAIN: Final = CONTAINER_HEADER_SIZE - 8  # 36: both tags and Length
_UINT64_MASK: Final = (1 << 64) - 1


def _load_accel() -> object | None:
    """The optional C implementation (``_accel.c``); ``SECUREIOD_PURE_PYTHON=1`` or a
    missing build selects the pure-Python functions below, which define the behaviour."""
    if os.environ.get("SECUREIOD_PURE_PYTHON"):
        return None
    try:
        from . import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _accel


ACCEL: Final = _load_accel()


def crypto_backend() -> str:
    """What seals and opens packets in this process, for the start-up log and ``status``:
    ``"openssl+libsodium"`` (the C path, OpenSSL for long inputs), ``"libsodium"`` (the C
    path where OpenSSL offers no ChaCha20/POLY1305, e.g. a FIPS-only configuration: slower
    on long inputs) or ``"python"`` (no C build, or ``SECUREIOD_PURE_PYTHON=1``: ~10x slower)."""
    if ACCEL is None:
        return "python"
    return "openssl+libsodium" if getattr(ACCEL, "OPENSSL", False) else "libsodium"


BATCH_SEAL: Final = (
    ACCEL is not None
    and hasattr(ACCEL, "seal_fragments")
    and not os.environ.get("SECUREIOD_NO_BATCH")
    and not os.environ.get("SECUREIOD_NO_TX_BATCH")
)
"""Fragmented messages are sealed by one C call into one UDP GSO buffer (``seal_fragments``);
``SECUREIOD_NO_BATCH=1`` (every batch path) or ``SECUREIOD_NO_TX_BATCH=1`` (this one only)
keeps the one-call-per-fragment path, to measure or compare."""
MAX_BATCH_PAYLOAD: Final = 1 << 17
"""The largest message ``seal_fragments`` takes (the C limit); larger ones go one by one."""
_OPEN_ERRORS: Final = {
    1: MalformedError,
    2: AuthenticationError,
    3: AuthenticationError,
    4: MalformedError,
}
_OPEN_REASONS: Final = {
    1: "shorter than a header, or packet id 0",
    2: "no key verifies it",
    3: "header tag verified but messages tag not",
    4: "Length disagrees with the datagram",
}


class PacketClass(enum.IntEnum):
    SESSION = 0
    """Encrypted under a session key: the only class that may carry data."""
    AUX = 1
    """Encrypted under the static PSK-derived auxKey: key exchange (and Go's fragments)."""
    CLEAR = 2
    """Not encrypted, MAC key derived from the public PacketID: authenticates nothing."""


@dataclass(frozen=True, slots=True)
class PacketKey:
    """One way to seal or open packets, with its per-key work done up front."""

    packet_class: PacketClass
    stream_key: bytes | None
    """DJB ChaCha20 key; ``None`` for CLEAR packets."""
    mac_seed: bytes
    """``K[0:24] ⊕ C32[8:32]``: the part of the Poly1305 key input fixed for this key."""

    @classmethod
    def session(cls, cipher_key: bytes, sender_session_id: bytes) -> PacketKey:
        if len(cipher_key) != KEY_SIZE or len(sender_session_id) != SESSION_ID_SIZE:
            raise ValueError("session key needs a 32-byte key and a 16-byte SessionID")
        return cls(
            PacketClass.SESSION, hchacha20(cipher_key, sender_session_id), _mac_seed(cipher_key)
        )

    @classmethod
    def aux(cls, aux_key: bytes) -> PacketKey:
        if len(aux_key) != KEY_SIZE:
            raise ValueError("aux key must be 32 bytes")
        return cls(PacketClass.AUX, aux_key, _mac_seed(aux_key))

    @classmethod
    def clear(cls) -> PacketKey:
        return cls(PacketClass.CLEAR, None, _mac_seed(bytes(KEY_SIZE)))

    def poly_key(self, packet_id: int) -> bytes:
        """``BLAKE3((LE64(pid) || K[0:24]) ⊕ C32)`` with the key half pre-XORed."""
        return blake3((packet_id ^ _POLY_XOR_PID).to_bytes(8, "little") + self.mac_seed).digest()

    def __repr__(self) -> str:
        return f"PacketKey({self.packet_class.name})"


def _mac_seed(key: bytes) -> bytes:
    return (int.from_bytes(key[:24], "little") ^ _POLY_XOR_KEY).to_bytes(24, "little")


@dataclass(frozen=True, slots=True)
class OpenedPacket:
    packet_id: int
    packet_class: PacketClass
    key_index: int
    """Index into the candidate keys that opened the packet (the fallback is last)."""
    messages: bytes
    """The plaintext message area: exactly ``Length`` bytes."""


def seal(key: PacketKey, packet_id: int, messages: bytes, packet_id_mask: int = 0) -> bytes:
    """Build one datagram: ``pid' || E(HeadersTag || MessagesTag || LE32(Length) || messages)``."""
    if ACCEL is not None and 0 < packet_id <= _UINT64_MASK:
        return ACCEL.seal(key.stream_key, key.mac_seed, packet_id, messages, packet_id_mask)  # type: ignore[attr-defined]
    return seal_python(key, packet_id, messages, packet_id_mask)


def seal_python(key: PacketKey, packet_id: int, messages: bytes, packet_id_mask: int = 0) -> bytes:
    """The reference implementation of ``seal`` (and the fallback without ``_accel``)."""
    if not 0 < packet_id <= _UINT64_MASK:
        raise ValueError("packet id must be in 1..2^64-1")
    pk = key.poly_key(packet_id)
    length = _U32.pack(len(messages))
    plain = Poly1305.generate_tag(pk, length) + Poly1305.generate_tag(pk, messages) + length
    pid8 = packet_id.to_bytes(8, "little")
    wire_pid = (packet_id ^ packet_id_mask).to_bytes(8, "little") if packet_id_mask else pid8
    if key.stream_key is None:
        return wire_pid + plain + messages
    enc = Cipher(algorithms.ChaCha20(key.stream_key, _ZERO8 + pid8), mode=None).encryptor()
    return wire_pid + enc.update(plain) + enc.update(messages)


def seal_fragments(
    key: PacketKey,
    first_packet_id: int,
    packet_id_mask: int,
    msg_type: int,
    payload: bytes | memoryview,
    chain_id: int,
    max_payload: int,
) -> tuple[bytes, int, int]:
    """Fragment ``payload`` (as ``fragment_message``) and seal fragment ``i`` with PacketID
    ``first_packet_id + i`` (as ``seal``), all back to back in one buffer: returns
    ``(buffer, count, segment_size)``, every datagram ``segment_size`` bytes but the last,
    which may be shorter -- the layout one UDP GSO ``sendmsg`` takes as it is."""
    if MessageType.is_internal(msg_type):
        raise ValueError("internal messages are exempt from E and never fragmented")
    if (
        ACCEL is not None
        and 0 < len(payload) <= MAX_BATCH_PAYLOAD
        and 0 < first_packet_id <= _UINT64_MASK
        and hasattr(ACCEL, "seal_fragments")
    ):
        return ACCEL.seal_fragments(  # type: ignore[attr-defined,no-any-return]
            key.stream_key,
            key.mac_seed,
            first_packet_id,
            packet_id_mask,
            msg_type,
            payload,
            chain_id,
            max_payload,
        )
    return seal_fragments_python(
        key, first_packet_id, packet_id_mask, msg_type, payload, chain_id, max_payload
    )


def seal_fragments_python(
    key: PacketKey,
    first_packet_id: int,
    packet_id_mask: int,
    msg_type: int,
    payload: bytes | memoryview,
    chain_id: int,
    max_payload: int,
) -> tuple[bytes, int, int]:
    """The reference for ``seal_fragments``: ``fragment_message`` then ``seal_python``."""
    fragments = fragment_message(msg_type, payload, chain_id, max_payload)
    if first_packet_id + len(fragments) - 1 > _UINT64_MASK:
        raise ValueError("packet ids must stay in 1..2^64-1")
    sealed = [
        seal_python(key, first_packet_id + i, m, packet_id_mask) for i, m in enumerate(fragments)
    ]
    return b"".join(sealed), len(sealed), len(sealed[0])


class KeyRing:
    """The keys a session tries on receipt, with the per-call work done once.

    ``open_ring`` is the session's hot path: it takes the candidate keys as one prepared
    tuple instead of rebuilding them for every datagram.
    """

    __slots__ = ("keys", "pairs")

    def __init__(self, keys: Sequence[PacketKey]) -> None:
        self.keys: tuple[PacketKey, ...] = tuple(keys)
        self.pairs = tuple((k.stream_key, k.mac_seed) for k in self.keys)


def open_ring(
    data: bytes | memoryview, ring: KeyRing, packet_id_mask: int = 0
) -> tuple[int, int, bytes]:
    """``open_packet`` for a prepared ``KeyRing``: returns (packet_id, key index, messages)."""
    if ACCEL is None:
        opened = open_python(data, ring.keys, packet_id_mask)
        return opened.packet_id, opened.key_index, opened.messages
    result = ACCEL.open(data, ring.pairs, packet_id_mask)  # type: ignore[attr-defined]
    if type(result) is int:
        raise _OPEN_ERRORS[result](f"datagram of {len(data)} bytes: {_OPEN_REASONS[result]}")
    return result  # type: ignore[no-any-return]


def read_packet_id(data: bytes | memoryview, packet_id_mask: int = 0) -> int:
    if len(data) < CONTAINER_HEADER_SIZE:
        raise MalformedError(f"datagram of {len(data)} bytes is shorter than a packet header")
    return int.from_bytes(data[:8], "little") ^ packet_id_mask


def open_packet(
    data: bytes | memoryview, keys: Sequence[PacketKey], packet_id_mask: int = 0
) -> OpenedPacket:
    """Open a datagram with the first key whose header tag verifies (see ``open_python``)."""
    ring = KeyRing(keys)
    pid, index, messages = open_ring(data, ring, packet_id_mask)
    return OpenedPacket(pid, ring.keys[index].packet_class, index, messages)


def open_python(
    data: bytes | memoryview, keys: Sequence[PacketKey], packet_id_mask: int = 0
) -> OpenedPacket:
    """Open a datagram with the first key whose header tag verifies.

    ``keys`` are tried in order (the session passes RB, RL, RR, PREV, then aux or clear).
    A header tag that verifies under a key while the body tag does not is a forgery or
    corruption, not a wrong key, so trial stops there as in the reference.
    Raises ``MalformedError`` or ``AuthenticationError``; the caller drops and counts.
    """
    view = memoryview(data)
    pid = read_packet_id(view, packet_id_mask)
    if pid == 0:
        raise MalformedError("packet id 0 is never valid")
    pid8 = pid.to_bytes(8, "little")
    head_ct = view[8:CONTAINER_HEADER_SIZE]
    body_ct = view[CONTAINER_HEADER_SIZE:]
    for index, key in enumerate(keys):
        if key.stream_key is None:
            head = bytes(head_ct)
            dec = None
        else:
            dec = Cipher(algorithms.ChaCha20(key.stream_key, _ZERO8 + pid8), mode=None).decryptor()
            head = dec.update(head_ct)
        pk = key.poly_key(pid)
        if not tags_equal(Poly1305.generate_tag(pk, head[32:_HEAD_PLAIN]), head[:TAG_SIZE]):
            continue
        body = bytes(body_ct) if dec is None else dec.update(body_ct)
        if not tags_equal(Poly1305.generate_tag(pk, body), head[TAG_SIZE : 2 * TAG_SIZE]):
            raise AuthenticationError(f"packet {pid}: header tag verified but messages tag not")
        (length,) = _U32.unpack_from(head, 32)
        if length != len(body):
            raise MalformedError(f"packet {pid}: Length {length} but {len(body)} message bytes")
        return OpenedPacket(pid, key.packet_class, index, body)
    raise AuthenticationError(f"packet {pid}: no key verifies it")
