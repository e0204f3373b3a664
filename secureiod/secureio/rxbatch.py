"""Opening a run of received datagrams (one UDP GRO read) in one C call (``_rxbatch.c``).

The C function only reports what each datagram of the run is; every rule (the replay
window, key slots, fragment rules, counters, path validation) stays where it is defined
(``session.py``, ``replay.py``, ``reassembly.py``), and ``Session.receive_datagram_run``
applies them so that a run gives exactly the events and counters that feeding its
datagrams one by one to ``Session.receive_datagram`` gives.

The batch path is optional: without the extension, with ``SECUREIOD_PURE_PYTHON=1`` (the
pure-Python reference) or with ``SECUREIOD_NO_BATCH=1`` (to compare, or to rule it out)
runs are fed datagram by datagram.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

from .packet import KeyRing


def _load() -> object | None:
    if os.environ.get("SECUREIOD_PURE_PYTHON") or os.environ.get("SECUREIOD_NO_BATCH"):
        return None
    try:
        from . import _rxbatch  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _rxbatch


RXBATCH: Final = _load()
MAX_RUN_DATAGRAMS: Final = 4096
"""The C function's bound on one run (UDP GRO coalesces at most 64); longer runs are fed
one by one."""
MAX_RUN_BYTES: Final = 4 << 20
"""The C function's bound on one run's bytes (a GRO read is at most 64 KiB)."""

NOT_OPENED_MALFORMED: Final = 1
NOT_OPENED_AUTH: Final = 2

Group = (
    int
    | tuple[int, int]
    | tuple[int, int, int, bytes]
    | tuple[int, int, int, int, int, int, int, int, bytes, int]
)
"""One entry of ``RunPlan.groups``, in datagram order:

* ``i``: datagram ``i`` was not tried (a run beyond the C bounds): fed the usual way;
* ``(i, why)``: datagram ``i`` did not open under the session's keys, ``why`` is
  ``NOT_OPENED_MALFORMED`` or ``NOT_OPENED_AUTH`` (what ``open_packet`` would raise): the
  session counts it without decrypting it again, and a demultiplexer may look for
  another owner;
* ``(i, key_index, packet_id, messages)``: datagram ``i`` opened, ``messages`` is its
  plaintext message area;
* ``(i, count, key_index, first_packet_id, type, chain_id, total, start, chunks,
  wire_bytes)``: datagrams ``i .. i+count-1`` opened under one key with consecutive
  PacketIDs, each one fragment message of ``chain_id`` whose chunks are contiguous from
  ``start``; ``chunks`` is them joined, ``wire_bytes`` the datagrams' total size.
"""


def split_run(
    data: bytes | bytearray | memoryview, segment_size: int
) -> list[bytes | bytearray | memoryview]:
    """The datagrams of a run, to feed one by one: ``segment_size`` bytes each, the last
    shorter. A nonsense ``segment_size`` (0 or less) makes the whole run one datagram, so
    it is still counted, never an exception in the loop; an empty run is one empty one."""
    step = segment_size if segment_size > 0 else len(data) or 1
    return [data[start : start + step] for start in range(0, len(data) or 1, step)]


@dataclass(frozen=True, slots=True)
class RunPlan:
    """A run opened under the keys the session had: ``keys_version`` tells whether they
    are still the keys it has (a key exchange in the run may change them)."""

    data: bytes | bytearray | memoryview
    segment_size: int
    ring: KeyRing
    keys_version: int
    groups: list[Group]

    def datagram(self, index: int) -> bytes | bytearray | memoryview:
        start = index * self.segment_size
        return self.data[start : start + self.segment_size]

    def group_datagrams(self, group: Group) -> list[bytes | bytearray | memoryview]:
        """The datagrams of ``group``, to feed one by one."""
        if type(group) is int:
            return [self.datagram(group)]
        first = group[0]  # type: ignore[index]
        count = 1 if len(group) in (2, 4) else group[1]  # type: ignore[arg-type, index]
        return [self.datagram(i) for i in range(first, first + count)]


def open_run(
    data: bytes | bytearray | memoryview, segment_size: int, ring: KeyRing, packet_id_mask: int
) -> list[Group]:
    """The groups of ``data`` (datagrams of ``segment_size`` bytes, the last shorter).

    A run beyond the C function's bounds comes back as "not opened" for every datagram
    (fed one by one, so counted as usual) instead of raising: the caller's checks are
    not the only thing standing between a large read and an exception in the loop."""
    if segment_size > 0 and (
        len(data) > MAX_RUN_BYTES or -(-len(data) // segment_size) > MAX_RUN_DATAGRAMS
    ):
        return list(range(-(-len(data) // segment_size)))
    return RXBATCH.open_run(data, segment_size, ring.pairs, packet_id_mask)  # type: ignore[attr-defined, no-any-return]
