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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from ..secureio.constants import PACKET_OVERHEAD
from .dns import DnsPort
from .ledger import Ledger
from .offload import LEGACY_GSO_MAX_SIZE, gso_max_size_for
from .owned import OwnedNetlink
from .peer import Peer
from .policy import RoutingPlan
from .ports import Interface, NetlinkPort, Network

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
    def __init__(
        self,
        netlink: NetlinkPort,
        ifname: str,
        interface: InterfaceConfig,
        *,
        created: bool = True,
    ) -> None:
        """``created`` False: the TUN device existed before the daemon (a persistent one),
        so what the daemon changes on it (its MTU) is given back at stop."""
        # Every call below goes through the guard: route writes reach only the daemon's
        # own routes, and route lookups see the path of the daemon's (marked) datagrams.
        self.netlink = OwnedNetlink(netlink, ifname, interface, created=created)
        self.ifname = ifname
        self.interface = interface
        self.link_mtu: int | None = None
        self.gso_max_size: int | None = LEGACY_GSO_MAX_SIZE if created else None
        """The TUN device's ``gso_max_size`` as the kernel reported it after we set it
        (``offload.gso_max_size_for``); None: not known (a device someone else made)."""
        self._gso_wanted: int | None = None

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

    def settle(self) -> None:
        """The end of a reload: routes no peer took back go, and a full tunnel's rules go
        with its last default route."""
        self.netlink.settle()

    def apply_payload_size(self, peer: Peer, size: int, peers: Iterable[Peer]) -> None:
        """Route MTU for this peer = its payload size; the link MTU follows the largest,
        the device's segment size (gso_max_size) fits every peer's payload size."""
        old, peer.payload_size = peer.payload_size, size
        # The segment size before the routes: a TCP socket copies it when it checks its
        # route, which a route write makes it do (every IPv4 socket; an IPv6 one when the
        # write is on its branch of the table); lowered after the writes, running streams
        # would keep the larger one and the kernel would cut their segments into
        # MTU-sized packets. (On common paths it never moves: SEGMENT_CEILING.)
        lowered = size != old and self._payload_size_changed(old, size, peers)
        fixed = self.interface.mtu
        mtu = min(size, fixed) if fixed else size
        if mtu == peer.route_mtu:
            if lowered:  # a fixed MTU: no route write would follow, so one is made
                self.set_route_mtu(peer, peer.config.allowed_ips)
            return
        # The first size is news; a change is logged by ``pmtu`` (one line, rate-limited).
        level = logging.INFO if peer.route_mtu is None else logging.DEBUG
        peer.route_mtu = mtu
        logger.log(level, "peer %s: payload size %d, route MTU %d", peer.name, size, mtu)
        self.set_route_mtu(peer, peer.config.allowed_ips)
        if fixed is None:
            self._follow_link_mtu([p.route_mtu for p in peers if p.route_mtu])

    def _payload_size_changed(self, old: int | None, new: int, peers: Iterable[Peer]) -> bool:
        """The device's segment size after one peer's payload size went from ``old`` to
        ``new``: one comparison, unless the peer that decided it now allows more (then a
        pass over ``peers``, which must be iterable again: the dict's values or a list).
        A hub whose 10,000 peers establish one after another does not pass over all of
        them for each. True: the device's value went down."""
        fit = gso_max_size_for(new)
        current = self._gso_wanted
        if current is None or fit < current:
            return self._follow_gso_size(fit)
        if old is not None and fit > current == gso_max_size_for(old):
            return self._follow_gso_size(self._smallest_fit(peers))
        return False

    @staticmethod
    def _smallest_fit(peers: Iterable[Peer]) -> int | None:
        sizes = {p.payload_size for p in peers if p.payload_size}
        return min(gso_max_size_for(size) for size in sizes) if sizes else None

    def set_route_mtu(self, peer: Peer, nets: Iterable[Network]) -> None:
        """Give ``peer``'s routes to ``nets`` its route MTU (if it has one yet). A failure
        is a warning: the route still works, at the link MTU."""
        mtu = peer.route_mtu
        if mtu is None:
            return
        for net in nets:
            route_mtu = max(mtu, IPV6_MIN_MTU) if net.version == 6 else max(mtu, MIN_MTU)
            try:
                self.netlink.replace_route(net, self.ifname, mtu=route_mtu)
            except Exception as exc:
                logger.warning("peer %s: setting route MTU for %s failed: %s", peer.name, net, exc)

    def _follow_link_mtu(self, sizes: Sequence[int]) -> None:
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

    def _follow_gso_size(self, want: int | None) -> bool:
        """Segments from the TUN device (TSO, ``offload.py``) sized so that each leaves in
        one UDP GSO send toward every peer: ``want`` is the smallest of their fits (not
        always the narrowest path's: more of its datagrams fit in one send). Only on a
        device this daemon created; one it found keeps what its owner set (an info line
        says what to set). A kernel that refuses (before 5.19) costs throughput, not
        function: one warning per value, never a retry per packet. True: the device's
        value went down."""
        if want is None or want == self._gso_wanted:
            return False
        self._gso_wanted = want
        if not self.netlink.created:
            logger.info(
                "%s existed before this daemon: its gso_max_size is left as it is; "
                "`ip link set %s gso_max_size %d` lets each TCP segment leave in one send",
                self.ifname,
                self.ifname,
                want,
            )
            return False
        before = self.gso_max_size
        try:
            got = self.netlink.set_gso_max_size(self.ifname, want)
        except Exception as exc:
            logger.warning(
                "%s: setting gso_max_size %d failed (%s): TCP segments take two sends "
                "(throughput only; Linux 5.19 or later can set it)",
                self.ifname,
                want,
                exc,
            )
            return False
        self.gso_max_size = got
        if got is None:
            logger.info(
                "%s: gso_max_size %d set (the kernel does not report it)", self.ifname, want
            )
        elif got != want:
            logger.warning(
                "%s: the kernel kept gso_max_size %s instead of %d: TCP segments take two "
                "sends (throughput only; Linux 5.19 or later can set it)",
                self.ifname,
                got,
                want,
            )
        else:
            logger.info("%s: gso_max_size %d (one UDP send per TCP segment)", self.ifname, want)
        return got is not None and before is not None and got < before

    # -- reload ------------------------------------------------------------------------

    def prepare_reload(
        self,
        withdraw: Sequence[PeerConfig],
        install: Sequence[PeerConfig],
        interface: InterfaceConfig,
    ) -> None:
        """The part of a reload that asks the kernel for something new: routes for the
        prefixes of ``install`` (adopting those of ``withdraw``, the configs that go), the
        new addresses, a new fixed MTU. All or nothing: when the kernel refuses one, what
        this call added is removed again, ``withdraw``'s routes stay as they were, and the
        error propagates. Nothing is removed here: ``finish_reload`` does that."""
        added: list[Interface] = []
        try:
            for pc in withdraw:
                for net in pc.allowed_ips:
                    self.netlink.release(net)
            for pc in install:
                for net in pc.allowed_ips:
                    self.netlink.install(net, pc.name)
            for address in interface.address:
                if address not in self.interface.address:
                    self.netlink.add_address(self.ifname, address)
                    added.append(address)
            if interface.mtu is not None and interface.mtu != self.interface.mtu:
                self.netlink.set_mtu(self.ifname, interface.mtu)
                self.link_mtu = interface.mtu
        except BaseException:
            self._roll_back(withdraw, install, added)
            raise

    def _roll_back(
        self,
        withdraw: Sequence[PeerConfig],
        install: Sequence[PeerConfig],
        added: Sequence[Interface],
    ) -> None:
        """Undo a ``prepare_reload`` that failed half-way: the routes that stay are still
        placed (only ``settle`` removes one), so taking them back asks the kernel nothing;
        the routes and addresses this reload added go."""
        for pc in install:
            for net in pc.allowed_ips:
                self.netlink.release(net)
        for pc in withdraw:
            for net in pc.allowed_ips:
                try:
                    self.netlink.install(net, pc.name)
                except Exception as exc:
                    logger.warning("peer %s: restoring the route to %s: %s", pc.name, net, exc)
        for address in added:
            try:
                self.netlink.delete_address(self.ifname, address)
            except Exception as exc:
                logger.warning("removing address %s: %s", address, exc)
        try:
            self.settle()
        except Exception as exc:
            logger.warning("%s: removing the routes of a failed reload: %s", self.ifname, exc)

    def finish_reload(self, new: InterfaceConfig, peers: Iterable[Peer]) -> None:
        """The last step of a reload, once the peers are in place: addresses that left the
        config go, routes no peer took back go (``settle``), and a changed ``mtu`` is
        applied to the route MTUs (a fixed MTU caps them) and, with "auto", to the link
        MTU, which follows the peers' route MTUs again."""
        old = self.interface
        self.interface = new
        for address in old.address:
            if address not in new.address:
                try:
                    self.netlink.delete_address(self.ifname, address)
                except Exception as exc:
                    logger.warning("removing address %s: %s", address, exc)
        self.settle()
        running = list(peers)
        if new.mtu != old.mtu:
            for peer in running:  # the others get theirs when their session negotiates
                s = peer.session
                if peer.route_mtu is not None and s is not None and s.is_established:
                    self.apply_payload_size(peer, s.payload_size, running)
            if new.mtu is None:
                self._follow_link_mtu([p.route_mtu for p in running if p.route_mtu])
        # a peer that left may have been the one with the smallest fit
        self._follow_gso_size(self._smallest_fit(running))

    def remove_all(self, peers: Iterable[Peer]) -> None:
        """On stop: give back everything the daemon added (routes, rules, addresses, DNS)
        and nothing else; a device it created then goes away with its descriptor."""
        self.netlink.give_back()
