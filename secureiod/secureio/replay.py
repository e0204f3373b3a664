"""The PacketID replay window (PROTOCOL §10), with a correct shift.

The reference empties its bitmap on jumps of 65..255 (§13 item 16), reopening the window
to replays; here the bitmap is one Python int shifted by the exact distance, so every ID
inside the window stays remembered whatever the jump.
"""

from __future__ import annotations

from typing import Final

DEFAULT_WINDOW: Final = 256


class ReplayWindow:
    """Accepts each PacketID at most once and refuses IDs older than the window.

    ``size``: 0 → the default 256; 1 → strictly increasing IDs only; < 0 → no check at all
    (the reference's "disabled"); otherwise rounded up to a multiple of 64.
    """

    __slots__ = ("_bitmap", "_latest", "_mask", "size")

    def __init__(self, size: int = 0) -> None:
        if size == 0:
            size = DEFAULT_WINDOW
        elif size > 1:
            size = -(-size // 64) * 64
        self.size = size
        self._latest = 0
        self._bitmap = 0
        self._mask = (1 << size) - 1 if size > 1 else 0

    @property
    def latest(self) -> int:
        return self._latest

    def check(self, packet_id: int) -> bool:
        """Would ``accept`` take this ID? Does not change the window."""
        if self.size < 0:
            return True
        latest = self._latest
        if packet_id > latest:
            return True
        if self.size == 1:
            return False
        distance = latest - packet_id
        return 0 < distance < self.size and not (self._bitmap >> distance) & 1

    def accept(self, packet_id: int) -> bool:
        """Record ``packet_id`` if it is new; False means drop it as a replay or too old."""
        if self.size < 0:
            return True
        latest = self._latest
        if packet_id > latest:
            if self.size > 1:
                shift = packet_id - latest
                # Never shift by more than the window: a forged jump of 2^60 would
                # otherwise allocate a 2^60-bit integer.
                if shift >= self.size:
                    self._bitmap = 1
                else:
                    self._bitmap = ((self._bitmap << shift) | 1) & self._mask
            self._latest = packet_id
            return True
        if self.size == 1:
            return False
        distance = latest - packet_id
        if distance == 0 or distance >= self.size or (self._bitmap >> distance) & 1:
            return False
        self._bitmap |= 1 << distance
        return True

    def accept_consecutive(self, first: int, count: int) -> bool:
        """``accept`` of ``first, first+1, ..., first+count-1`` in one step, when all lie
        above ``latest`` (a run of fresh datagrams in order: every one would be taken).
        Otherwise changes nothing and returns False: the caller takes them one by one."""
        if self.size < 0:
            return count >= 1
        latest = self._latest
        if count < 1 or first <= latest:
            return False
        last = first + count - 1
        if self.size > 1:
            shift = last - latest
            fresh = (1 << min(count, self.size)) - 1
            if shift >= self.size:
                self._bitmap = fresh & self._mask
            else:
                self._bitmap = ((self._bitmap << shift) | fresh) & self._mask
        self._latest = last
        return True

    def reset(self) -> None:
        """Forget everything: used when the peer starts a new session (new SessionID)."""
        self._latest = 0
        self._bitmap = 0
