"""Wire constants of secureio (PROTOCOL.md §3), shared by every codec in the package."""

from __future__ import annotations

from typing import Final

CONTAINER_HEADER_SIZE: Final = 44
"""PacketID(8) || HeadersTag(16) || MessagesTag(16) || Length(4)."""
PACKET_ID_SIZE: Final = 8
TAG_SIZE: Final = 16
MESSAGE_HEADER_SIZE: Final = 9
"""Type(4) || Length(4) || Flags(1)."""
PACKET_OVERHEAD: Final = CONTAINER_HEADER_SIZE + MESSAGE_HEADER_SIZE  # 53
KX_PAYLOAD_SIZE: Final = 146
KX_SIGNED_SIZE: Final = 82
KX_PACKET_SIZE: Final = PACKET_OVERHEAD + KX_PAYLOAD_SIZE  # 199
FRAGMENT_HEADER_SIZE: Final = 24
NEGOTIATION_CONTROL_SIZE: Final = 6
NEGOTIATION_PING_MIN_SIZE: Final = 69
MAX_POSSIBLE_PACKET_SIZE: Final = 65536 - 256
# 65216: the largest multiple of 16 that fits a packet with its headers.
DEFAULT_PAYLOAD_SIZE_LIMIT: Final = ((MAX_POSSIBLE_PACKET_SIZE - PACKET_OVERHEAD) // 16) * 16
DEFAULT_PAYLOAD_SIZE_LIMIT_UDP: Final = ((1500 - 48 - PACKET_OVERHEAD) // 16) * 16  # 1392
SESSION_ID_SIZE: Final = 16
KEY_SIZE: Final = 32

POLY_KEY_XOR: Final = b"github.com/xaionaro-go/secureio "
"""The 32-byte constant C32 XORed into the Poly1305 key derivation input (§4.3)."""
SALT: Final = b"xaionaro-go/secureio.KeyExchanger"
"""The exported Go ``Salt``; both peers must use the same value."""
LABEL_AUX_KEY: Final = b"auxCipherKey"
LABEL_PSK_MASK: Final = b"cipherKey"

MESSAGE_FLAG_CONFIDENTIAL: Final = 0x01
MESSAGE_FLAG_FRAGMENTED: Final = 0x02

KX_FLAG_IS_ANSWER: Final = 0x01
NEGOTIATION_FLAG_END: Final = 0x01
