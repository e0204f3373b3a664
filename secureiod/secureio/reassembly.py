"""Fragmentation and reassembly (PROTOCOL §9), with the fixes §9.2 and §13 recommend.

Wire format is the reference's: each fragment is one message of the original type with the
fragmented flag, whose payload is ``ChainID || StartPos || TotalMessageLength`` (24 bytes)
and a chunk. What differs is behaviour:

* Our fragments are CONFIDENTIAL (flags 0x03), so they travel in session packets; the
  reference sends 0x02 and thus in clear/aux packets (§13 item 3). A Go receiver ignores
  the confidential bit on receipt, so this stays wire compatible (§12).
* Several chains are reassembled at once. The reference throws away every partial chain
  whenever a new ChainID shows up (§13 item 23), which loses concurrent large writes.
* Coverage is tracked exactly (a merged interval list) instead of per 64-byte word, and
  exactly ``TotalMessageLength`` bytes are delivered (§13 item 24: Go could deliver stale
  bytes or declare completion early).
* ``TotalMessageLength`` and the type must stay the same across a chain's fragments.
* A fragment of a chain that already completed is a quiet duplicate: in Go it panics the
  whole process (§13 item 22). Completed ChainIDs are remembered (bounded) for this.
* Memory is bounded: a cap on partial chains, on the sum of their sizes, and on how
  scattered one chain may get; the oldest partial chain gives way to a new one.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque

from .constants import FRAGMENT_HEADER_SIZE, MESSAGE_FLAG_CONFIDENTIAL, MESSAGE_FLAG_FRAGMENTED
from .errors import MalformedError
from .fragment import FRAGMENT_HEADER
from .wire import MESSAGE_HEADER, MessageType

FRAGMENT_FLAGS = MESSAGE_FLAG_CONFIDENTIAL | MESSAGE_FLAG_FRAGMENTED
"""0x03: what we send. The reference sends 0x02 (the confidential bit lost to a bug)."""


def fragment_message(
    msg_type: int, payload: bytes | memoryview, chain_id: int, max_payload: int
) -> list[bytes]:
    """Split ``payload`` into encoded fragment messages, one per packet.

    ``max_payload`` is E, the largest message payload one packet may carry, so each chunk
    is ``F = E - 24`` bytes (the last may be shorter), as the reference cuts them. Chunks
    are returned in order; the reference sends them concurrently, so a receiver must not
    rely on order anyway.
    """
    chunk_size = max_payload - FRAGMENT_HEADER_SIZE
    if chunk_size <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room after the fragment header")
    if not payload:
        raise ValueError("an empty message is never fragmented")
    if MessageType.is_internal(msg_type):
        raise ValueError("internal messages are exempt from E and never fragmented")
    view = memoryview(payload)
    total = len(view)
    pack_message = MESSAGE_HEADER.pack
    pack_fragment = FRAGMENT_HEADER.pack
    out = []
    for start in range(0, total, chunk_size):
        chunk = view[start : start + chunk_size]
        out.append(
            pack_message(msg_type, FRAGMENT_HEADER_SIZE + len(chunk), FRAGMENT_FLAGS)
            + pack_fragment(chain_id, start, total)
            + chunk
        )
    return out


class _Chain:
    """One partial message: its buffer and the sorted, disjoint, non-adjacent byte
    intervals ``[starts[k], ends[k])`` received so far."""

    __slots__ = ("buf", "covered", "ends", "msg_type", "starts", "total")

    def __init__(self, msg_type: int, total: int) -> None:
        self.msg_type = msg_type
        self.total = total
        self.buf = bytearray(total)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def new_bytes(self, start: int, end: int) -> tuple[int, int, int]:
        """How many bytes of ``[start, end)`` are new, and the slice of intervals that
        overlap or touch it (to merge)."""
        lo = bisect_left(self.ends, start)  # first interval ending at or after start
        hi = bisect_right(self.starts, end)  # past the last one starting at or before end
        fresh = end - start
        for k in range(lo, hi):
            overlap = min(end, self.ends[k]) - max(start, self.starts[k])
            if overlap > 0:
                fresh -= overlap
        return fresh, lo, hi

    def merge(self, start: int, end: int, chunk: memoryview, lo: int, hi: int) -> None:
        """Copy only the uncovered parts of the chunk (first writer wins, so a later
        overlapping fragment cannot rewrite bytes already accepted) and merge."""
        cur = start
        for k in range(lo, hi):
            a, b = max(self.starts[k], start), min(self.ends[k], end)
            if a > cur:
                self.buf[cur:a] = chunk[cur - start : a - start]
            cur = max(cur, b)
        if cur < end:
            self.buf[cur:end] = chunk[cur - start :]
        new_start = min(start, self.starts[lo]) if hi > lo else start
        new_end = max(end, self.ends[hi - 1]) if hi > lo else end
        self.starts[lo:hi] = [new_start]
        self.ends[lo:hi] = [new_end]


class Reassembler:
    """Collects fragments per ChainID and returns each message once, when complete.

    Raises ``MalformedError`` for fragments that cannot belong to a valid message (the
    session counts and drops them); duplicates are not errors, just counted.
    """

    def __init__(
        self,
        *,
        max_message_size: int = 65536,
        max_chains: int = 8,
        byte_budget: int = 1 << 20,
        max_chain_id_diff: int = 8,
        remember_completed: int = 64,
        max_intervals: int = 1024,
    ) -> None:
        if max_chains < 1 or byte_budget < 1 or max_message_size < 1:
            raise ValueError("max_chains, byte_budget and max_message_size must be positive")
        self.max_message_size = max_message_size
        self.max_chains = max_chains
        self.byte_budget = byte_budget
        self.max_chain_id_diff = max_chain_id_diff
        self.max_intervals = max_intervals
        """Holes a chain may have: bounds the work per fragment for hostile chunking (Go's
        sender tiles with chunks of at least 123 bytes, far below this)."""
        self._remember = max(1, remember_completed)
        self.duplicates = 0
        self.evictions = 0
        """Partial chains dropped to make room (count or byte budget)."""
        self.expired = 0
        """Partial chains dropped because they fell more than max_chain_id_diff behind."""
        self.completed = 0
        self._chains: dict[int, _Chain] = {}  # insertion order = age
        self._bytes = 0
        self._last_chain = 0
        self._done_ids: set[int] = set()
        self._done_order: deque[int] = deque()

    @property
    def partial_chains(self) -> int:
        return len(self._chains)

    @property
    def bytes_reserved(self) -> int:
        """Sum of the sizes of the partial chains (bounded by ``byte_budget``)."""
        return self._bytes

    def reset(self) -> None:
        """Forget every chain (a peer restart); the counters are kept as statistics."""
        self._chains.clear()
        self._bytes = 0
        self._last_chain = 0
        self._done_ids.clear()
        self._done_order.clear()

    def add(self, msg_type: int, payload: bytes | memoryview) -> bytes | None:
        """Take one fragment message's payload; return the whole message when this
        fragment completes its chain, else ``None``.

        Every check that can raise runs before any state changes, so a rejected fragment
        leaves the reassembler exactly as it was.
        """
        if len(payload) < FRAGMENT_HEADER_SIZE:
            raise MalformedError(f"fragment of {len(payload)} bytes is shorter than its header")
        chain_id, start, total = FRAGMENT_HEADER.unpack_from(payload)
        chunk = memoryview(payload)[FRAGMENT_HEADER_SIZE:]
        end = start + len(chunk)
        if total == 0:
            raise MalformedError("fragment of an empty message (TotalMessageLength 0)")
        if total > self.max_message_size:
            raise MalformedError(
                f"fragmented message of {total} bytes exceeds {self.max_message_size}"
            )
        if not chunk:
            raise MalformedError("fragment with an empty chunk")
        if end > total:
            raise MalformedError(f"fragment [{start}, {end}) runs past the message end {total}")
        if chain_id in self._done_ids:
            self.duplicates += 1
            return None
        if self._last_chain - chain_id > self.max_chain_id_diff:
            raise MalformedError(
                f"fragment of chain {chain_id} is more than {self.max_chain_id_diff} chains "
                f"behind {self._last_chain}"
            )
        chain = self._chains.get(chain_id)
        if chain is not None:
            if chain.total != total:
                raise MalformedError(
                    f"chain {chain_id}: TotalMessageLength {total} differs from {chain.total}"
                )
            if chain.msg_type != msg_type:
                raise MalformedError(
                    f"chain {chain_id}: type 0x{msg_type:08x} differs from 0x{chain.msg_type:08x}"
                )
            ends = chain.ends
            if ends[-1] == start:
                # In order (the common case): the chunk extends the last interval and
                # nothing lies beyond it, so there is nothing to merge.
                chain.buf[start:end] = chunk
                ends[-1] = end
                chain.covered += end - start
                if chain.covered < total:
                    return None
                return self._complete(chain_id, chain)
            fresh, lo, hi = chain.new_bytes(start, end)
            if fresh == 0:
                self.duplicates += 1
                return None
            if hi - lo == 0 and len(chain.starts) >= self.max_intervals:
                raise MalformedError(f"chain {chain_id} is split into too many pieces")
        else:
            if total > self.byte_budget:
                raise MalformedError(
                    f"fragmented message of {total} bytes exceeds the reassembly budget"
                )
            fresh, lo, hi = end - start, 0, 0

        # -- accepted: from here on, state changes --
        if chain_id > self._last_chain:
            self._last_chain = chain_id
            self._expire_old_chains()
        if chain is None:
            self._make_room(total)
            chain = _Chain(msg_type, total)
            self._chains[chain_id] = chain
            self._bytes += total
        chain.merge(start, end, chunk, lo, hi)
        chain.covered += fresh
        if chain.covered < total:
            return None
        return self._complete(chain_id, chain)

    def add_span(
        self, msg_type: int, chain_id: int, total: int, start: int, chunks: bytes
    ) -> bytes | bool | None:
        """Take consecutive fragments of one chain whose chunks, joined, are ``chunks``
        from ``start`` (non-empty, within ``total``), as ``add`` would take them one by one.

        Only the cases where that is one step are done here: a new chain, or one whose
        received bytes end exactly at ``start``. Returns the whole message when the span
        completes the chain, ``None`` when it does not, and ``False`` (changing nothing)
        when the caller must call ``add`` per fragment: an unknown chain too large or too
        old, a completed chain (duplicates), a mismatch, or an out-of-order span.
        """
        end = start + len(chunks)
        if (
            not chunks
            or total == 0
            or end > total
            or total > self.max_message_size
            or chain_id in self._done_ids
            or self._last_chain - chain_id > self.max_chain_id_diff
        ):
            return False
        chain = self._chains.get(chain_id)
        if chain is not None:
            ends = chain.ends
            if chain.total != total or chain.msg_type != msg_type or ends[-1] != start:
                return False
            chain.buf[start:end] = chunks
            ends[-1] = end
            chain.covered += end - start
            if chain.covered < total:
                return None
            return self._complete(chain_id, chain)
        if total > self.byte_budget:
            return False
        # -- a new chain, as its first fragment would make it --
        if chain_id > self._last_chain:
            self._last_chain = chain_id
            self._expire_old_chains()
        self._make_room(total)
        if start == 0 and end == total:  # whole: made and completed at once
            self._remember_done(chain_id)
            self.completed += 1
            return chunks
        chain = _Chain(msg_type, total)
        self._chains[chain_id] = chain
        self._bytes += total
        chain.buf[start:end] = chunks
        chain.starts.append(start)
        chain.ends.append(end)
        chain.covered = end - start
        return None

    def _complete(self, chain_id: int, chain: _Chain) -> bytes:
        del self._chains[chain_id]
        self._bytes -= chain.total
        self._remember_done(chain_id)
        self.completed += 1
        return bytes(chain.buf)

    def _expire_old_chains(self) -> None:
        """Chains too far behind the newest can never receive another fragment (they would
        be rejected as too old), so free them now."""
        horizon = self._last_chain - self.max_chain_id_diff
        for cid in [c for c in self._chains if c < horizon]:
            self._bytes -= self._chains.pop(cid).total
            self.expired += 1

    def _make_room(self, total: int) -> None:
        while self._chains and (
            len(self._chains) >= self.max_chains or self._bytes + total > self.byte_budget
        ):
            oldest = next(iter(self._chains))
            self._bytes -= self._chains.pop(oldest).total
            self.evictions += 1

    def _remember_done(self, chain_id: int) -> None:
        self._done_ids.add(chain_id)
        self._done_order.append(chain_id)
        if len(self._done_order) > self._remember:
            self._done_ids.discard(self._done_order.popleft())
