"""A run of sealed datagrams in one buffer, in the layout of one UDP GSO ``sendmsg``.

Why a type of its own: a fragmented message is sealed by one C call into one buffer
(``packet.seal_fragments``); handing it to the socket as that buffer, instead of as a
list of datagrams that the socket joins again, saves a copy and ~50 Python objects per
64 KiB segment. ``datagrams()`` gives the same bytes one by one for callers without GSO.
"""

from __future__ import annotations

from dataclasses import dataclass

from .path import Address


@dataclass(frozen=True, slots=True)
class DatagramRun:
    buffer: bytes
    """``count`` datagrams back to back: each ``segment_size`` bytes, the last one shorter
    or equal."""
    segment_size: int
    count: int
    address: Address

    def datagrams(self) -> list[bytes]:
        """The datagrams of the run, each as its own bytes object."""
        if self.count == 1:
            return [self.buffer]
        view = memoryview(self.buffer)
        step = self.segment_size
        return [bytes(view[i : i + step]) for i in range(0, len(view), step)]
