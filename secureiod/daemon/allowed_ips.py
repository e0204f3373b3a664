"""Cryptokey routing: which peer owns an inner IP address (longest-prefix match).

Outbound, a packet goes to the peer whose allowed_ips hold its destination; inbound, a
packet is accepted from a peer only if its source routes back to that same peer (the rule
WireGuard users know). Lookups are per packet, so they are a handful of dict probes: one
dict per prefix length actually in use, longest first, keyed by the masked address int.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        self.generation = 0
        """Bumped by every change: a cache of lookups (the C lone-packet hop's
        destinations) is valid while it stays the same."""

    def insert(self, network: Network, value: T) -> None:
        self._table(network).insert(network, value)
        self._entries[network] = value
        self.generation += 1

    def insert_all(self, networks: Iterable[Network], value: T) -> None:
        for n in networks:
            self.insert(n, value)

    def remove_value(self, value: T) -> None:
        for network in [n for n, v in self._entries.items() if v is value]:
            self._table(network).remove(network)
            del self._entries[network]
            self.generation += 1

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
        n = len(packet) - offset
        if n >= 20 and packet[offset] >> 4 == 4:
            return self._v4.lookup(int.from_bytes(packet[offset + 16 : offset + 20], "big"))
        if n >= 40 and packet[offset] >> 4 == 6:
            return self._v6.lookup(int.from_bytes(packet[offset + 24 : offset + 40], "big"))
        return None

    def lookup_source(self, packet: bytes | memoryview, offset: int = 0) -> T | None:
        n = len(packet) - offset
        if n >= 20 and packet[offset] >> 4 == 4:
            return self._v4.lookup(int.from_bytes(packet[offset + 12 : offset + 16], "big"))
        if n >= 40 and packet[offset] >> 4 == 6:
            return self._v6.lookup(int.from_bytes(packet[offset + 8 : offset + 24], "big"))
        return None
