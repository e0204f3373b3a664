"""Cryptographic primitives of secureio, behind one small surface.

The protocol needs ChaCha20 (original DJB layout: 64-bit counter, 64-bit nonce), XChaCha20,
raw Poly1305, BLAKE3, SHA3-256, X25519 and Ed25519. No single maintained binding offers all
of them without private modules, so: ChaCha20 and Poly1305 come from ``cryptography``
(OpenSSL), X25519 and Ed25519 from PyNaCl (libsodium), BLAKE3 from ``blake3``. The choice of
route was measured (``bench/crypto_routes.py``, table in the README).

XChaCha20 is HChaCha20 followed by ChaCha20. HChaCha20 runs once per (key, SessionID) and is
cached by the caller (see ``packet.PacketKey``), so its pure-Python cost never sits on the
per-packet path.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions
from blake3 import blake3
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305

from .constants import KEY_SIZE
from .errors import InvalidKeyError

RandomSource = Callable[[int], bytes]
"""Returns n random bytes; injectable so tests can run deterministically."""

_ZERO8 = bytes(8)
_ZERO32 = bytes(32)
_MASK32 = 0xFFFFFFFF
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_KEY_WORDS = struct.Struct("<8I")
_NONCE16_WORDS = struct.Struct("<4I")


def salted_hash(data: bytes, *salts: bytes) -> bytes:
    """``H(x; s1..sk) = SHA3-256(BLAKE3-256(x || s1..sk) || s1..sk)`` (PROTOCOL §6.1)."""
    salt = b"".join(salts)
    return hashlib.sha3_256(blake3(data + salt).digest() + salt).digest()


def _rotl(v: int, c: int) -> int:
    return ((v << c) & _MASK32) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _MASK32
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _MASK32
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _MASK32
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _MASK32
    s[b] = _rotl(s[b] ^ s[c], 7)


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """The HChaCha20 subkey (draft-irtf-cfrg-xchacha §2.2).

    Pure Python because no maintained binding exposes it; it runs once per key and
    SessionID, never per packet.
    """
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("hchacha20 needs a 32-byte key and a 16-byte nonce")
    s = [*_SIGMA, *_KEY_WORDS.unpack(key), *_NONCE16_WORDS.unpack(nonce16)]
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def chacha20_stream(key: bytes, nonce8: bytes) -> CipherContext:
    """A ChaCha20 keystream context (DJB layout) starting at block 0.

    OpenSSL takes a 16-byte IV of 32-bit counter || 96-bit nonce. With the first eight
    bytes zero that is exactly DJB's 64-bit counter || 64-bit nonce for any message under
    2^32 blocks, far beyond the 64 KiB a secureio packet can hold.
    """
    return Cipher(algorithms.ChaCha20(key, _ZERO8 + nonce8), mode=None).encryptor()


def chacha20_xor(key: bytes, nonce8: bytes, data: bytes) -> bytes:
    return chacha20_stream(key, nonce8).update(data)


def xchacha20_xor(key: bytes, nonce24: bytes, data: bytes) -> bytes:
    return chacha20_xor(hchacha20(key, nonce24[:16]), nonce24[16:24], data)


def poly1305(key: bytes, data: bytes | memoryview) -> bytes:
    return Poly1305.generate_tag(key, data)


def tags_equal(a: bytes | memoryview, b: bytes | memoryview) -> bool:
    """Constant-time comparison; the reference compares tags with memcmp (PROTOCOL §12)."""
    return hmac.compare_digest(a, b)


def x25519_private_from_random(random: RandomSource) -> bytes:
    """A clamped X25519 private scalar (RFC 7748 §5), as the reference stores them."""
    k = bytearray(random(KEY_SIZE))
    if len(k) != KEY_SIZE:
        raise ValueError("random source returned the wrong number of bytes")
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def x25519_public(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def x25519_shared(private: bytes, public: bytes) -> bytes:
    """X25519 with the checks the reference lacks (PROTOCOL §6.3, §13 item 14).

    A public key of low order gives an all-zero shared secret, which would let anyone who
    controls that key predict the session key; it is refused with ``InvalidKeyError``
    instead of crashing the process as the reference does.
    """
    if len(public) != KEY_SIZE:
        raise InvalidKeyError(f"X25519 public key must be 32 bytes, got {len(public)}")
    if public == _ZERO32:
        raise InvalidKeyError("X25519 public key is all zero")
    try:
        shared = nacl.bindings.crypto_scalarmult(private, public)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError) as exc:
        raise InvalidKeyError("X25519 public key is of low order") from exc
    if hmac.compare_digest(shared, _ZERO32):
        raise InvalidKeyError("X25519 public key is of low order")
    return shared


def xor_bytes(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("xor_bytes needs equal lengths")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
