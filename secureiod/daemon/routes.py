"""The interface, its routes and its MTU: what the daemon asks of the kernel (netlink).

Each peer's allowed IPs become routes on the TUN device; the route MTU of a peer's prefixes
is its negotiated payload size (what one secureio packet carries without fragments), and
with ``mtu = "auto"`` the link MTU follows the largest of them so every peer gets what its
path carries. The payload limit a new session starts from comes from the underlay path MTU
toward the peer (``payload_limit_for_mtu``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ..secureio.constants import PACKET_OVERHEAD
from .peer import Peer
from .ports import Interface, NetlinkPort

if TYPE_CHECKING:
    from ..config import InterfaceConfig, PeerConfig

logger = logging.getLogger(__name__)

IPV6_MIN_MTU: Final = 1280
MIN_MTU: Final = 576
DEFAULT_UNDERLAY_MTU: Final = 1500
IPV4_UDP_OVERHEAD: Final = 28
IPV6_UDP_OVERHEAD: Final = 48


def payload_limit_for_mtu(mtu: int, ipv6: bool) -> int:
    """The secureio payload limit P that fits one datagram into an underlay MTU: 1408 on a
    1500-byte IPv4 path, 1392 on IPv6 (rounded down to 16 bytes, §8)."""
    overhead = (IPV6_UDP_OVERHEAD if ipv6 else IPV4_UDP_OVERHEAD) + PACKET_OVERHEAD
    return max(147, min(65216, ((mtu - overhead) // 16) * 16))


class Routes:
    def __init__(self, netlink: NetlinkPort, ifname: str, interface: InterfaceConfig) -> None:
        self.netlink = netlink
        self.ifname = ifname
        self.interface = interface
        self.link_mtu: int | None = None
        self._addresses: list[Interface] = []

    def configure_interface(self) -> None:
        """Addresses, MTU, link up; peer routes are added as peers are."""
        iface = self.interface
        mtu = iface.mtu if iface.mtu is not None else IPV6_MIN_MTU
        self.netlink.set_mtu(self.ifname, mtu)
        self.link_mtu = mtu
        for address in iface.address:
            self.netlink.add_address(self.ifname, address)
            self._addresses.append(address)
        self.netlink.set_up(self.ifname)

    def payload_limit_for(self, pc: PeerConfig, udp_family: int) -> int:
        """P for a new session with this peer: from the configured override, else from the
        kernel's route toward the endpoint (its MTU), else a 1500-byte path."""
        override = self.interface.payload_size_limit
        if override:
            return int(override)
        mtu = DEFAULT_UNDERLAY_MTU
        ipv6 = udp_family == socket.AF_INET6
        host = pc.endpoint_host
        if host:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:  # a name: resolved later, assume the default path
                ip = None
            if ip is not None:
                ipv6 = ip.version == 6
                try:
                    _, route_mtu = self.netlink.route_get(ip)
                except Exception as exc:  # no route yet: the default
                    logger.debug("underlay MTU toward %s unknown: %s", host, exc)
                else:
                    mtu = route_mtu or mtu
        return payload_limit_for_mtu(mtu, ipv6)

    def add_peer(self, peer: Peer) -> None:
        for net in peer.config.allowed_ips:
            self.netlink.replace_route(net, self.ifname)

    def remove_peer(self, peer: Peer, remaining: Iterable[Peer] = ()) -> None:
        """Its routes go; with ``mtu = "auto"`` the link MTU follows the ``remaining``."""
        self._remove_routes(peer)
        if self.interface.mtu is None and peer.route_mtu is not None:
            peer.route_mtu = None
            self._follow_link_mtu(remaining)

    def _remove_routes(self, peer: Peer) -> None:
        for net in peer.config.allowed_ips:
            try:
                self.netlink.delete_route(net, self.ifname)
            except Exception as exc:  # the route may be gone with the link
                logger.debug("removing route %s: %s", net, exc)

    def apply_payload_size(self, peer: Peer, size: int, peers: Iterable[Peer]) -> None:
        """Route MTU for this peer = its payload size; the link MTU follows the largest."""
        fixed = self.interface.mtu
        mtu = min(size, fixed) if fixed else size
        if mtu == peer.route_mtu:
            return
        peer.route_mtu = mtu
        logger.info("peer %s: payload size %d, route MTU %d", peer.name, size, mtu)
        for net in peer.config.allowed_ips:
            route_mtu = max(mtu, IPV6_MIN_MTU) if net.version == 6 else max(mtu, MIN_MTU)
            try:
                self.netlink.replace_route(net, self.ifname, mtu=route_mtu)
            except Exception as exc:
                logger.warning("peer %s: setting route MTU for %s failed: %s", peer.name, net, exc)
        if fixed is None:
            self._follow_link_mtu(peers)

    def _follow_link_mtu(self, peers: Iterable[Peer]) -> None:
        sizes = [p.route_mtu for p in peers if p.route_mtu]
        want = max(sizes) if sizes else IPV6_MIN_MTU
        if any(a.version == 6 for a in self.interface.address):
            want = max(want, IPV6_MIN_MTU)
        if want != self.link_mtu:
            try:
                self.netlink.set_mtu(self.ifname, want)
                self.link_mtu = want
                logger.info("%s: MTU %d", self.ifname, want)
            except Exception as exc:
                logger.warning("%s: setting MTU %d failed: %s", self.ifname, want, exc)

    def apply_interface(self, new: InterfaceConfig) -> None:
        """A reload's interface changes that need no restart: addresses and a fixed MTU."""
        old = self.interface
        self.interface = new
        for a in set(old.address) - set(new.address):
            try:
                self.netlink.delete_address(self.ifname, a)
                self._addresses.remove(a)
            except Exception as exc:
                logger.warning("removing address %s: %s", a, exc)
        for a in new.address:
            if a not in old.address:
                self.netlink.add_address(self.ifname, a)
                self._addresses.append(a)
        if new.mtu != old.mtu and new.mtu is not None:
            self.netlink.set_mtu(self.ifname, new.mtu)
            self.link_mtu = new.mtu

    def remove_all(self, peers: Iterable[Peer]) -> None:
        """On stop, for a TUN device we did not create: give back what we added to it (a
        device we created goes away with its file descriptor, routes and all)."""
        for peer in peers:
            self._remove_routes(peer)
        for address in self._addresses:
            try:
                self.netlink.delete_address(self.ifname, address)
            except Exception as exc:
                logger.warning("removing address %s: %s", address, exc)
        self._addresses.clear()
