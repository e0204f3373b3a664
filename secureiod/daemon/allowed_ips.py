"""Cryptokey routing: which peer owns an inner IP address (longest-prefix match).

Outbound, a packet goes to the peer whose allowed_ips hold its destination; inbound, a
packet is accepted from a peer only if its source routes back to that same peer (the rule
WireGuard users know). Lookups are per packet, so they are a handful of dict probes: one
dict per prefix length actually in use, longest first, keyed by the masked address int;
and an address's answer is remembered until the table changes (``MEMO_LIMIT``), so a flow's
packets after its first cost one dict probe on the address bytes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, Generic, TypeVar

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MEMO_LIMIT: Final = 4096
"""Addresses (4 or 16 raw bytes) whose owner, or lack of one, is remembered. Why: the
longest-prefix match in Python (``int.from_bytes``, then a probe per prefix length) cost
0.43 µs a packet, a tenth of a small packet's whole cost in the daemon; a memo hit costs a
slice and one probe. Bounded because the addresses are the network's to choose (a peer's
inner sources, anything local apps send to): at the limit the memo starts over."""
_MISS: Final = object()


class _Table(Generic[T]):
    __slots__ = ("_bits", "_levels", "_masks")

    def __init__(self, bits: int) -> None:
        self._bits = bits
        self._levels: list[tuple[int, dict[int, T]]] = []  # (mask, table), longest first
        self._masks: dict[int, dict[int, T]] = {}

    def insert(self, network: Network, value: T) -> None:
        plen = network.prefixlen
        table = self._masks.get(plen)
        if table is None:
            table = self._masks[plen] = {}
            self._rebuild()
        table[int(network.network_address)] = value

    def remove(self, network: Network) -> None:
        table = self._masks.get(network.prefixlen)
        if table is not None:
            table.pop(int(network.network_address), None)
            if not table:
                del self._masks[network.prefixlen]
                self._rebuild()

    def _rebuild(self) -> None:
        full = (1 << self._bits) - 1
        self._levels = [
            (full ^ ((1 << (self._bits - plen)) - 1), self._masks[plen])
            for plen in sorted(self._masks, reverse=True)
        ]

    def lookup(self, address: int) -> T | None:
        for mask, table in self._levels:
            value = table.get(address & mask)
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[T]):
    """Maps IPv4/IPv6 networks to owners (peers)."""

    def __init__(self) -> None:
        self._v4: _Table[T] = _Table(32)
        self._v6: _Table[T] = _Table(128)
        self._entries: dict[Network, T] = {}
        self._memo: dict[bytes, T | None] = {}
        """Raw address bytes -> owner (or None), valid until the next change."""
        self.generation = 0
        """Bumped by every change: a cache of lookups (the C lone-packet hop's
        destinations, ``_memo``) is valid while it stays the same."""

    def insert(self, network: Network, value: T) -> None:
        self._table(network).insert(network, value)
        self._entries[network] = value
        self._changed()

    def insert_all(self, networks: Iterable[Network], value: T) -> None:
        for n in networks:
            self.insert(n, value)

    def remove_value(self, value: T) -> None:
        for network in [n for n, v in self._entries.items() if v is value]:
            self._table(network).remove(network)
            del self._entries[network]
            self._changed()

    def _changed(self) -> None:
        self.generation += 1
        self._memo.clear()

    def entries(self) -> dict[Network, T]:
        return dict(self._entries)

    def _table(self, network: Network) -> _Table[T]:
        return self._v4 if network.version == 4 else self._v6

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> T | None:
        table = self._v4 if address.version == 4 else self._v6
        return table.lookup(int(address))

    def lookup_destination(self, packet: bytes | memoryview, offset: int = 0) -> T | None:
        """The owner of the destination of the IP packet at ``packet[offset:]``; None for
        non-IP or truncated input. (``offset`` skips a virtio-net header without a copy.)"""
        return self._lookup(packet, offset, 16, 24)

    def lookup_source(self, packet: bytes | memoryview, offset: int = 0) -> T | None:
        """The owner of the source of the IP packet at ``packet[offset:]``, as
        ``lookup_destination``."""
        return self._lookup(packet, offset, 12, 8)

    def _lookup(self, packet: bytes | memoryview, offset: int, at4: int, at6: int) -> T | None:
        """The owner of the address at ``at4`` (IPv4) or ``at6`` (IPv6) in the header."""
        n = len(packet) - offset
        if n >= 20 and packet[offset] >> 4 == 4:
            key = packet[offset + at4 : offset + at4 + 4]
        elif n >= 40 and packet[offset] >> 4 == 6:
            key = packet[offset + at6 : offset + at6 + 16]
        else:
            return None
        if type(key) is not bytes:  # a view: looked up, not remembered (callers pass bytes)
            return self._match(key)
        owner = self._memo.get(key, _MISS)
        return self._resolve(key) if owner is _MISS else owner  # type: ignore[return-value]

    def _match(self, key: bytes | memoryview) -> T | None:
        """The longest-prefix match for a 4- or 16-byte address."""
        table = self._v4 if len(key) == 4 else self._v6
        return table.lookup(int.from_bytes(key, "big"))

    def _resolve(self, key: bytes) -> T | None:
        """``_match``, remembered. A miss costs about twice an unremembered lookup (the
        insert, and a clear every ``MEMO_LIMIT`` misses): a peer cycling its sources pays
        that on its own packets only."""
        owner = self._match(key)
        memo = self._memo
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        memo[key] = owner
        return owner
