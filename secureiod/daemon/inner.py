"""Sanity of a decrypted inner packet's IP header, checked before it reaches the TUN.

An authenticated peer can still send an IP packet whose header lies about its length. The
kernel would drop most such packets itself, but only after we counted them as delivered
(``rx_packets``), and a header that disagrees with the bytes around it is exactly what
parser bugs further along feed on. So the receive path asks ``inner_packet_problem`` once
per packet and drops and counts by the reason it returns.

This runs per packet: a few index operations, no ``struct``, no exceptions. It checks only
what the IP header says about the packet's own size; the inner *source* address is the
router's business (allowed-ips). A coalesced (GSO) packet passes when its IP header carries
the length of the whole super-packet, which is how the kernel and our coalescer write it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "INNER_BAD_HEADER_LENGTH",
    "INNER_BAD_LENGTH",
    "INNER_BAD_VERSION",
    "INNER_DROP_REASONS",
    "INNER_TRUNCATED",
    "inner_packet_problem",
]

INNER_TRUNCATED: Final = "inner-truncated"
"""Shorter than the fixed header of its version (or empty)."""
INNER_BAD_VERSION: Final = "inner-bad-version"
"""The version nibble is neither 4 nor 6."""
INNER_BAD_HEADER_LENGTH: Final = "inner-bad-header-length"
"""IPv4 only: IHL below 5 words, or a header longer than the total length."""
INNER_BAD_LENGTH: Final = "inner-bad-length"
"""The length field disagrees with the bytes received (this also refuses IPv6 jumbograms,
whose payload length is 0: nothing we carry can be one)."""

INNER_DROP_REASONS: Final = (
    INNER_TRUNCATED,
    INNER_BAD_VERSION,
    INNER_BAD_HEADER_LENGTH,
    INNER_BAD_LENGTH,
)
"""Every value ``inner_packet_problem`` can return: stable names, used as counter keys."""


def inner_packet_problem(packet: bytes | bytearray | memoryview, offset: int = 0) -> str | None:
    """None when the IP packet starting at ``offset`` is consistent with its length, else
    the drop reason. ``offset`` is 10 when a virtio-net header precedes the packet.

    The checks run in a fixed order, so one packet always gets the same reason: truncated,
    version, (IPv4) header length, then total length.
    """
    size = len(packet) - offset
    if size < 1:
        return INNER_TRUNCATED
    first = packet[offset]
    version = first >> 4
    if version == 4:
        if size < 20:
            return INNER_TRUNCATED
        header = (first & 0x0F) << 2
        total = (packet[offset + 2] << 8) | packet[offset + 3]
        if header < 20 or header > total:
            return INNER_BAD_HEADER_LENGTH
        if total != size:
            return INNER_BAD_LENGTH
        return None
    if version == 6:
        if size < 40:
            return INNER_TRUNCATED
        if 40 + ((packet[offset + 4] << 8) | packet[offset + 5]) != size:
            return INNER_BAD_LENGTH
        return None
    return INNER_BAD_VERSION
