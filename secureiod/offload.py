"""TUN offload between two secureiod peers: whole TCP segments instead of MTU packets.

With ``IFF_VNET_HDR`` and TSO enabled on the TUN device, the kernel hands the daemon TCP
segments of up to 64 KiB, each behind a 10-byte ``virtio_net_hdr`` saying how to split it
(``gso_type``, ``gso_size``) and where its checksum goes. The sender carries header and
segment as ONE secureio message (type ``VNET_TYPE``; secureio fragments it into
path-sized, encrypted packets), and the receiving daemon writes it to its own TUN device
unchanged, where the kernel takes it as one large packet. One system call and one pass
through the kernel's TCP code per 64 KiB instead of per 1.4 KiB, on both ends.

Only peers that said so (a ``CAPS_TYPE`` message after establishment) get such messages;
the device turns TSO on only while every established peer accepts them and none reports
a lossy path (``CAP_LOSSY``: one lost datagram loses a whole chain). Plain packets still
travel as ``READ_WRITE`` messages, so a peer without offload interoperates. Reference Go
peers drop both reserved types silently (PROTOCOL §5.4).

A received header is checked before the kernel sees it: known GSO types only (TCP over
IPv4 or IPv6, optionally ECN), flags limited to NEEDS_CSUM/DATA_VALID, and checksum offsets
inside the packet. The fields are little-endian (the TUN default on little-endian hosts).
"""

from __future__ import annotations

import struct
from typing import Final

VNET_TYPE: Final = 0xFFFFFFEF
"""Message type: virtio-net header + IP packet (reserved range, §3.1)."""
CAPS_TYPE: Final = 0xFFFFFFF0
"""Message type: u32 LE capability bits of the sending daemon (reserved range)."""
CAP_VNET: Final = 0x1
"""The sender of the caps takes VNET_TYPE messages."""
CAP_LOSSY: Final = 0x2
"""...but loses whole-segment chains on this path: please let the kernel segment (TSO off).
Segments already on their way are still welcome, so nothing is dropped at the switch."""

VNET_HDR_SIZE: Final = 10
ZERO_HDR: Final = bytes(VNET_HDR_SIZE)
_HDR: Final = struct.Struct("<BBHHHH")
_CAPS: Final = struct.Struct("<I")

GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80
F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
MAX_SEGMENT: Final = 65535 + VNET_HDR_SIZE


def encode_caps(caps: int) -> bytes:
    return _CAPS.pack(caps)


def decode_caps(payload: bytes | memoryview) -> int | None:
    """The peer's capability bits; None for a malformed message (ignored)."""
    if len(payload) < _CAPS.size:
        return None
    (caps,) = _CAPS.unpack_from(payload)
    return caps


def header_acceptable(message: bytes | memoryview) -> bool:
    """Is ``message`` (header + IP packet) safe to hand to the kernel as it is?"""
    if len(message) < VNET_HDR_SIZE + 20:
        return False
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(message)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        return False
    base = gso_type & ~GSO_ECN
    version = message[VNET_HDR_SIZE] >> 4
    packet_len = len(message) - VNET_HDR_SIZE
    if base == GSO_TCPV4:
        if version != 4 or not 0 < gso_size < packet_len:
            return False
    elif base == GSO_TCPV6:
        if version != 6 or not 0 < gso_size < packet_len:
            return False
    elif base != GSO_NONE or gso_type & GSO_ECN:
        return False
    if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > packet_len:
        return False
    return hdr_len <= packet_len
