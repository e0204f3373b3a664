"""Keys derived from the pre-shared key and from X25519 (PROTOCOL §6.2, §6.4, §4.4)."""

from __future__ import annotations

from dataclasses import dataclass

from .constants import LABEL_AUX_KEY, LABEL_PSK_MASK, PACKET_ID_SIZE, SALT
from .crypto import salted_hash, x25519_shared, xchacha20_xor, xor_bytes


@dataclass(frozen=True, slots=True)
class PskKeys:
    """Everything a PSK contributes: the aux cipher key, the mask XORed into every session
    key, and the constant mask XORed into PacketIDs on the wire.

    An empty PSK is still PSK mode, as in the reference (``psk = b""`` differs from none).
    """

    aux_key: bytes
    psk_mask: bytes
    packet_id_mask: int

    @classmethod
    def from_psk(cls, psk: bytes, salt: bytes = SALT) -> PskKeys:
        aux = salted_hash(psk, salt, LABEL_AUX_KEY)
        mask = salted_hash(psk, salt, LABEL_PSK_MASK)
        pid_mask = xchacha20_xor(aux, bytes(24), bytes(PACKET_ID_SIZE))
        return cls(aux, mask, int.from_bytes(pid_mask, "little"))

    def __repr__(self) -> str:
        return "PskKeys(<secret>)"


def derive_cipher_key(local_private: bytes, remote_public: bytes, psk: PskKeys | None) -> bytes:
    """The session cipher key: raw X25519 output, XORed with the PSK mask when one is set.

    No KDF is applied: that is the wire format, and changing it would break interop.
    Raises ``InvalidKeyError`` for a low-order remote key.
    """
    shared = x25519_shared(local_private, remote_public)
    return xor_bytes(shared, psk.psk_mask) if psk is not None else shared
