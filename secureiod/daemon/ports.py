"""The ports the daemon sees its adapters through (``typing.Protocol``).

The real adapters (``secureiod.tun``, ``secureiod.udp``, ``secureiod.netlink``,
``secureiod.notify``, ``secureiod.endpoint``) satisfy these structurally; the in-memory
fakes in ``tests/fakes.py`` do too, which is what lets whole ``Device`` objects run in
unit tests without root, sockets or a real clock (the wireguard-go ``tuntest`` and
``bindtest`` idea). A port holds only what the daemon calls: a method added to an adapter
is not part of the contract until it is added here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from ..endpoint import Address
from ..netlink import RT_TABLE_MAIN, RouteInfo, Rule
from ..udp import SendResult

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TunPort(Protocol):
    """One TUN device. Packets are raw IP (with a 10-byte virtio-net header in front when
    ``vnet_hdr`` is on). Writes never raise for a single bad packet: ``write_many`` returns
    the indexes of the refused ones."""

    name: str
    vnet_hdr: bool
    offload: int

    def fileno(self) -> int: ...
    def read_batch(self, max_packets: int = 256, bufsize: int = 65535) -> list[bytes]: ...
    def write_many(
        self, header: bytes, packets: Sequence[bytes | bytearray | memoryview]
    ) -> list[int]:
        """``header + p`` written for each packet, in one call; the indexes refused."""
        ...

    def set_offload(self, flags: int) -> None: ...


class UdpStatsView(Protocol):
    rx_datagrams: int
    tx_datagrams: int
    tx_dropped: int
    tx_too_big: int
    tx_errors: int


class UdpPort(Protocol):
    """One datagram socket serving every peer. ``send_batch`` reports each datagram that
    did not go out as ``(datagram, result)``; an empty list means all were sent."""

    family: int
    stats: UdpStatsView

    @property
    def local_address(self) -> Address: ...
    def fileno(self) -> int: ...
    def recv_batch(self, max_count: int = 64) -> list[tuple[bytes, Address]]: ...
    def recv_runs(self, max_count: int = 64) -> list[tuple[bytes, int, Address]]:
        """Like ``recv_batch``, but a GRO read stays one ``(buffer, segment size,
        address)`` run, opened in one call by ``secureio/rxbatch.py``."""
        ...

    def send_batch(
        self, datagrams: Sequence[bytes], address: Address
    ) -> list[tuple[bytes, SendResult]]: ...
    def send_run(
        self, buffer: bytes, segment_size: int, address: Address
    ) -> list[tuple[bytes, SendResult]]: ...


class NetlinkPort(Protocol):
    """Links, addresses, routes and policy-routing rules (pyroute2 in production). Errors
    are ``secureiod.netlink.NetlinkError`` with a one-line message. The daemon writes
    routes and rules only through ``daemon/owned.py``, which adds nothing over a route it
    did not create and removes only what it recorded."""

    def set_mtu(self, name: str, mtu: int) -> None: ...
    def set_gso_max_size(self, name: str, size: int) -> int | None: ...
    def set_up(self, name: str) -> None: ...
    def add_address(self, name: str, iface: Interface) -> None: ...
    def create_address(self, name: str, iface: Interface) -> bool: ...
    def delete_address(self, name: str, iface: Interface) -> None: ...
    def replace_route(
        self,
        dst: Network,
        dev: str,
        mtu: int | None = None,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None: ...
    def add_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
        mtu: int | None = None,
    ) -> None: ...
    def delete_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None: ...
    def list_routes(
        self, version: int | None = None, table: int | None = None
    ) -> list[RouteInfo]: ...
    def rules(self, version: int) -> list[Rule]: ...
    def add_rule(self, rule: Rule) -> None: ...
    def delete_rule(self, rule: Rule) -> None: ...
    def route_get(
        self,
        dst_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str,
        *,
        mark: int | None = None,
    ) -> tuple[str, int]: ...


class NotifierPort(Protocol):
    """sd_notify(3); every call is a no-op returning False outside systemd."""

    @property
    def enabled(self) -> bool: ...
    def ready(self, status: str | None = None) -> bool: ...
    def status(self, text: str) -> bool: ...
    def watchdog(self) -> bool: ...
    def reloading(self, status: str | None = None) -> bool: ...
    def stopping(self, status: str | None = None) -> bool: ...


ResolveCallback = Callable[[list[Address] | None, str | None], None]
"""Called on the event loop with (addresses, None) or (None, error text)."""


class ResolverPort(Protocol):
    """Name resolution that never blocks the caller: ``resolve`` returns at once and the
    callback runs later, on the daemon's event loop (never on a resolver thread)."""

    def resolve(self, host: str, port: int, family: int, callback: ResolveCallback) -> None: ...
    def close(self) -> None: ...


class ClockPort(Protocol):
    """Monotonic seconds for timers and wall-clock nanoseconds for session ids."""

    def monotonic(self) -> float: ...
    def wall_ns(self) -> int: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class LoopPort(Protocol):
    """What the daemon's parts may ask of the event loop (``secureiod.daemon.loop``).
    Callbacks get the loop's ``now`` (monotonic seconds)."""

    def add_reader(self, fd: int, callback: Callable[[float], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, callback: Callable[[float], None]) -> None: ...
    def remove_writer(self, fd: int) -> None: ...
    def call_at(self, when: float, callback: Callable[[float], None]) -> TimerHandle: ...
    def call_soon_threadsafe(self, callback: Callable[[float], None]) -> None: ...


__all__ = [
    "Address",
    "ClockPort",
    "Interface",
    "Iterable",
    "LoopPort",
    "Network",
    "NetlinkPort",
    "NotifierPort",
    "ResolveCallback",
    "ResolverPort",
    "SendResult",
    "TimerHandle",
    "TunPort",
    "UdpPort",
]
