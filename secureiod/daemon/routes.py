"""The interface, its routes and its MTU: what the daemon asks of the kernel (netlink).

Each peer's allowed IPs become routes on the TUN device, placed and guarded by
``owned.OwnedNetlink`` (the only netlink this class holds): no route of the host is ever
replaced, a full tunnel's default routes live in their own table behind policy rules, and
everything added is recorded and given back at stop; the route MTU of a peer's prefixes
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
from .dns import DnsPort
from .ledger import Ledger
from .owned import OwnedNetlink
from .peer import Peer
from .policy import RoutingPlan
from .ports import NetlinkPort

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
        # Every call below goes through the guard: route writes reach only the daemon's
        # own routes, and route lookups see the path of the daemon's (marked) datagrams.
        self.netlink = OwnedNetlink(netlink, ifname, interface)
        self.ifname = ifname
        self.interface = interface
        self.link_mtu: int | None = None

    def attach(
        self,
        *,
        plan: RoutingPlan | None = None,
        ledger: Ledger | None = None,
        dns: DnsPort | None = None,
    ) -> None:
        """Before ``configure_interface``: the routing plan the UDP socket's mark came
        from, the on-disk record of what is added, and the DNS adapter (see
        ``OwnedNetlink.attach``)."""
        self.netlink.attach(plan=plan, ledger=ledger, dns=dns)

    def configure_interface(self) -> None:
        """Addresses, MTU, link up, DNS; peer routes are added as peers are."""
        iface = self.interface
        mtu = iface.mtu if iface.mtu is not None else IPV6_MIN_MTU
        self.netlink.set_mtu(self.ifname, mtu)
        self.link_mtu = mtu
        for address in iface.address:
            self.netlink.add_address(self.ifname, address)
        self.netlink.set_up(self.ifname)
        logger.info("%s: routes: %s", self.ifname, self.netlink.routing_plan().describe())
        self.netlink.apply_dns()

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
            self.netlink.install(net, peer.name)

    def remove_peer(self, peer: Peer, remaining: Iterable[Peer] = ()) -> None:
        """Its routes go (at the end of the reload, unless a peer of the new config takes
        a prefix over: ``settle``); with ``mtu = "auto"`` the link MTU follows the
        ``remaining``."""
        self._remove_routes(peer)
        if self.interface.mtu is None and peer.route_mtu is not None:
            peer.route_mtu = None
            self._follow_link_mtu(remaining)

    def _remove_routes(self, peer: Peer) -> None:
        for net in peer.config.allowed_ips:
            self.netlink.release(net)

    def settle(self) -> None:
        """The end of a reload: routes no peer took back go, and a full tunnel's rules go
        with its last default route."""
        self.netlink.settle()

    def apply_payload_size(self, peer: Peer, size: int, peers: Iterable[Peer]) -> None:
        """Route MTU for this peer = its payload size; the link MTU follows the largest."""
        fixed = self.interface.mtu
        mtu = min(size, fixed) if fixed else size
        if mtu == peer.route_mtu:
            return
        # The first size is news; a change is logged by ``pmtu`` (one line, rate-limited).
        level = logging.INFO if peer.route_mtu is None else logging.DEBUG
        peer.route_mtu = mtu
        logger.log(level, "peer %s: payload size %d, route MTU %d", peer.name, size, mtu)
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
            except Exception as exc:
                logger.warning("removing address %s: %s", a, exc)
        for a in new.address:
            if a not in old.address:
                self.netlink.add_address(self.ifname, a)
        if new.mtu != old.mtu and new.mtu is not None:
            self.netlink.set_mtu(self.ifname, new.mtu)
            self.link_mtu = new.mtu
        self.settle()  # the last step of every reload (reload.apply_config)

    def remove_all(self, peers: Iterable[Peer]) -> None:
        """On stop: give back everything the daemon added (routes, rules, addresses, DNS)
        and nothing else; a device it created then goes away with its descriptor."""
        self.netlink.give_back()
