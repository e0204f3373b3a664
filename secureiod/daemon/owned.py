"""Every change the daemon makes to the host's routing goes through ``OwnedNetlink``.

The rule it keeps: the daemon never replaces or removes a route, rule or address it did
not add, and gives back exactly what it added.

* A prefix's route is created with an exclusive add, never a replace. If the host already
  has a route to that destination in that table, the tunnel's route is added behind it (a
  higher metric) with a warning that names both: the host's route keeps its traffic, and
  the tunnel's takes over only if it goes. If the host's route already leads to the tunnel
  device (the connected route of one of its addresses), nothing is added.
* Where each route goes (main table, the full tunnel's own table, none) and the policy
  rules a default route needs come from the ``RoutingPlan`` (``policy.py``).
* ``replace_route`` (what the MTU logic calls to set a route MTU) changes the daemon's own
  route at its own key, and nothing else; ``route_get`` asks with the socket's mark, so the
  MTU logic sees the underlay path the daemon's datagrams take, not the tunnel.
* Everything added is in the ``Ledger`` (``ledger.py``); ``give_back`` removes exactly that,
  newest first, and ``undo`` does the same for what a killed instance recorded.
* A full tunnel on a host with strict reverse-path filtering gets wg-quick's mark
  restore (``nft.py``: an nftables table of its own and ``src_valid_mark``), recorded
  and given back like the rest.
* The MTU of a TUN device the daemon did not create (a persistent one) is recorded
  before the daemon first changes it, and put back at stop (or at the next start).
* Across a reload a prefix keeps its route: ``release`` marks it, ``install`` by any peer of
  the new config adopts it, ``settle`` (the end of the reload) removes what nobody took.
  A full tunnel's default route and rules therefore never lapse, and traffic never leaks
  around the tunnel while its peer is reconfigured.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..netlink import NetlinkError, RouteInfo, Rule, default_metric
from .dns import DnsPort
from .ledger import (
    Ledger,
    Owned,
    OwnedAddress,
    OwnedDns,
    OwnedMtu,
    OwnedNftTable,
    OwnedRoute,
    OwnedRule,
    OwnedSysctl,
)
from .nft import (
    HostFilterError,
    HostFilterPort,
    MarkRestore,
    default_host_filter,
    remove,
)
from .nft import table_name as restore_table
from .policy import RoutingPlan, decide_plan, policy_rules
from .ports import Interface, NetlinkPort, Network

if TYPE_CHECKING:
    from ..config import InterfaceConfig

logger = logging.getLogger(__name__)

READ_ONLY: Final = frozenset(
    {"get_mtu", "link_index", "addresses", "routes", "list_routes", "rules"}
)
"""Lookups of the adapter that pass through unchanged (``__getattr__``)."""
MAX_METRIC_TRIES: Final = 8
"""Exclusive adds that find their key taken meanwhile (a race with another program) look
again and move behind; this bounds how often."""


@dataclass(slots=True)
class _Placed:
    """The daemon's route for one allowed-ips prefix (None: no route of ours is needed)."""

    route: OwnedRoute | None
    owner: str
    retiring: bool = False


class OwnedNetlink:
    """The netlink that ``Routes`` works through (see module doc)."""

    def __init__(
        self,
        netlink: NetlinkPort,
        ifname: str,
        interface: InterfaceConfig,
        *,
        created: bool = True,
    ) -> None:
        """``created``: the daemon created the TUN device (it goes away with the daemon);
        False for a persistent device someone else made, whose MTU is then given back."""
        self.raw = netlink
        self.created = created
        self.host: HostFilterPort | None = default_host_filter(netlink)
        self.ifname = ifname
        self.interface = interface
        self.plan: RoutingPlan | None = None
        self.ledger = Ledger()
        self.dns: DnsPort | None = None
        self._placed: dict[Network, _Placed] = {}
        self._policy: dict[int, tuple[Rule, Rule]] = {}
        self._host: dict[tuple[int, int], list[RouteInfo]] = {}
        """The host's routes per (IP version, table), listed once per start or reload."""
        self._rp_checked = False

    def attach(
        self,
        *,
        plan: RoutingPlan | None = None,
        ledger: Ledger | None = None,
        dns: DnsPort | None = None,
        host_filter: HostFilterPort | None = None,
    ) -> None:
        """What the daemon decided before the device existed: the plan its UDP socket's mark
        came from, the record on disk, the DNS adapter, the sysctl/nft adapter. Unset:
        decided from the config, kept in memory, no DNS changes, the real sysctl and nft
        only with the real netlink (``nft.default_host_filter``)."""
        if plan is not None:
            self.plan = plan
        if ledger is not None:
            self.ledger = ledger
        if dns is not None:
            self.dns = dns
        if host_filter is not None:
            self.host = host_filter

    def routing_plan(self) -> RoutingPlan:
        if self.plan is None:
            self.plan = decide_plan(self.interface, self.raw)
        return self.plan

    # -- what passes through unchanged --

    def __getattr__(self, name: str) -> Any:
        """Lookups pass through; no other write than the ones defined here is offered, so
        nothing that holds this object can replace or delete a route it did not add."""
        if name in READ_ONLY:
            return getattr(self.raw, name)
        raise AttributeError(
            f"OwnedNetlink has no {name!r}: routes, rules and addresses are written only "
            "through install/release/replace_route/add_address (daemon/owned.py)"
        )

    def set_mtu(self, name: str, mtu: int) -> None:
        """Set the link MTU; on a device the daemon did not create, the MTU it had is
        recorded first (once), so that stop puts it back."""
        if not self.created and not any(
            isinstance(i, OwnedMtu) and i.dev == name for i in self.ledger.items()
        ):
            original = int(self.raw.get_mtu(name))
            if original != mtu:
                self.ledger.add(OwnedMtu(name, original))
                logger.info(
                    "%s existed before this daemon: its MTU %d is given back at stop",
                    name,
                    original,
                )
        self.raw.set_mtu(name, mtu)

    def set_gso_max_size(self, name: str, size: int) -> int | None:
        """Only for a device this daemon created (``created``), which takes the setting
        with it when it goes: nothing to record or give back."""
        if not self.created:
            raise RuntimeError(f"{name} existed before this daemon: its gso_max_size stays")
        return self.raw.set_gso_max_size(name, size)

    def set_up(self, name: str) -> None:
        self.raw.set_up(name)

    def route_get(
        self, dst_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | str
    ) -> tuple[str, int]:
        """How the kernel sends the daemon's own datagrams to ``dst_ip``: with the socket's
        mark, so a full tunnel's default route does not answer for the underlay."""
        mark = self.routing_plan().fwmark
        return self.raw.route_get(dst_ip, mark=mark)

    # -- addresses --

    def add_address(self, name: str, iface: Interface) -> None:
        """Add ``iface``; one that was already there is left alone, now and at stop."""
        if self.raw.create_address(name, iface):
            self.ledger.add(OwnedAddress(name, iface))
        else:
            logger.info("%s: address %s was already there; leaving it as it is", name, iface)

    def delete_address(self, name: str, iface: Interface) -> None:
        """Remove ``iface`` if the daemon added it."""
        item = OwnedAddress(name, iface)
        if item in self.ledger:
            self.raw.delete_address(name, iface)
            self.ledger.discard(item)

    # -- DNS --

    def apply_dns(self) -> None:
        """``dns = [...]`` through systemd-resolved, or one warning line saying why not."""
        entries = self.interface.dns
        if not entries:
            return
        shown = ", ".join(entries)
        if self.dns is None:
            logger.warning("dns = [%s] not applied: no resolver adapter in this process", shown)
            return
        problem = self.dns.apply(self.ifname, entries)
        if problem is not None:
            logger.warning(
                "dns = [%s] not applied: %s; configure the resolver yourself", shown, problem
            )
            return
        self.ledger.add(OwnedDns(self.ifname))
        logger.info("%s: DNS %s through systemd-resolved", self.ifname, shown)

    # -- routes --

    def install(self, net: Network, owner: str) -> None:
        """The route that sends ``net`` into the tunnel (for peer ``owner``), placed by the
        plan, without touching any route the host has."""
        placed = self._placed.get(net)
        if placed is not None:  # still ours from before the reload: adopt it
            placed.retiring = False
            placed.owner = owner
            return
        plan = self.routing_plan()
        table = plan.table_for(net)
        if table is None:
            self._placed[net] = _Placed(None, owner)
            return
        existing = [r for r in self._host_routes(net.version, table) if r.dst == net]
        if self._already_ours(net, existing):
            self._placed[net] = _Placed(None, owner)
            return
        if plan.needs_rules(net):
            self._ensure_policy(net.version)
        route = self._add_route(net, table, existing)
        self._placed[net] = _Placed(route, owner)
        if route is not None and existing:
            logger.warning(
                "peer %s: allowed_ips %s is already routed by the host (%s); the tunnel's "
                "route goes behind it (metric %d) and carries traffic only if that route "
                "goes: the host's route is left untouched. To send %s through the tunnel, "
                "remove or narrow one of the two",
                owner,
                net,
                existing[0].describe(),
                route.metric,
                net,
            )

    def _already_ours(self, net: Network, existing: list[RouteInfo]) -> bool:
        on_device = [r for r in existing if r.dev == self.ifname]
        if on_device:
            logger.info(
                "%s already leads to %s (%s); no route added",
                net,
                self.ifname,
                on_device[0].describe(),
            )
        return bool(on_device)

    def _add_route(self, net: Network, table: int, existing: list[RouteInfo]) -> OwnedRoute | None:
        metric = default_metric(net.version)
        if existing:
            metric = max(metric, max(r.metric for r in existing) + 1)
        for _ in range(MAX_METRIC_TRIES):
            route = OwnedRoute(net, self.ifname, table, metric)
            self.ledger.add(route)
            try:
                self.raw.add_route(net, self.ifname, table=table, metric=metric)
                return route
            except NetlinkError as exc:
                self.ledger.discard(route)
                if exc.code != errno.EEXIST:
                    raise
            # a route appeared at that key since we looked: look again, go behind it
            self._host.pop((net.version, table), None)
            existing = [r for r in self._host_routes(net.version, table) if r.dst == net]
            if self._already_ours(net, existing):
                return None
            metric = max([metric, *(r.metric for r in existing)]) + 1
        raise NetlinkError(
            f"add route {net} dev {self.ifname}: the host keeps adding routes with that "
            "destination; left it to them",
            errno.EEXIST,
        )

    def release(self, net: Network) -> None:
        """``net``'s peer is going; its route stays until ``settle`` unless a peer takes
        the prefix first."""
        placed = self._placed.get(net)
        if placed is not None:
            placed.retiring = True

    def settle(self) -> None:
        """After a reload: remove the routes no peer took back, and the full-tunnel rules
        of a family that has no default route left; forget the host's route list."""
        for net, placed in list(self._placed.items()):
            if placed.retiring:
                del self._placed[net]
                if placed.route is not None:
                    self._remove(placed.route)
        plan = self.routing_plan()
        for version in list(self._policy):
            if not any(
                p.route is not None and net.version == version and plan.needs_rules(net)
                for net, p in self._placed.items()
            ):
                self._drop_policy(version)
        self._host.clear()

    def replace_route(self, dst: Network, dev: str, mtu: int | None = None) -> None:
        """Set the route MTU of the daemon's own route to ``dst``; for any other route
        (the host's, or none because ``table = "off"``) nothing happens."""
        net = ipaddress.ip_network(dst)
        placed = self._placed.get(net)
        if placed is None or placed.route is None or dev != self.ifname:
            return
        route = placed.route
        self.raw.replace_route(net, dev, mtu, table=route.table, metric=route.metric)

    def owned_routes(self) -> list[OwnedRoute]:
        return [p.route for p in self._placed.values() if p.route is not None]

    def _host_routes(self, version: int, table: int) -> list[RouteInfo]:
        key = (version, table)
        routes = self._host.get(key)
        if routes is None:
            routes = self._host[key] = self.raw.list_routes(version, table)
        return routes

    def _remove(self, route: OwnedRoute) -> None:
        try:
            self.raw.delete_route(route.dst, route.dev, table=route.table, metric=route.metric)
        except NetlinkError as exc:  # stays in the record: the next start tries again
            logger.warning("removing %s: %s", route.describe(), exc)
        else:
            self.ledger.discard(route)

    # -- the full tunnel's rules --

    def _ensure_policy(self, version: int) -> None:
        if version in self._policy:
            return
        plan = self.routing_plan()
        if version == 4 and not self._rp_checked:
            self._rp_checked = True
            assert plan.fwmark is not None, "a full tunnel needs a mark"
            self._keep_replies(plan.fwmark)
        rules = policy_rules(version, plan, (r.priority for r in self.raw.rules(version)))
        added: list[Rule] = []
        try:
            for rule in rules:
                item = OwnedRule(rule)
                self.ledger.add(item)
                try:
                    self.raw.add_rule(rule)
                except NetlinkError:
                    self.ledger.discard(item)
                    raise
                added.append(rule)
        except NetlinkError:
            for rule in reversed(added):
                self._delete_rule(rule)
            raise
        self._policy[version] = rules
        suppress, mark = rules
        logger.info(
            "full tunnel (IPv%d): default route in table %d; rules %d (main table first, "
            "except its default route) and %d (unmarked traffic into the tunnel): the "
            "daemon's datagrams, marked %#x, keep the host's routes",
            version,
            plan.table,
            suppress.priority,
            mark.priority,
            mark.fwmark,
        )

    def _keep_replies(self, mark: int) -> None:
        """Under strict reverse-path filtering, the mark restore of ``nft.py`` (before the
        rules exist, so no reply is ever dropped); one warning line with the fix when it
        cannot be had."""
        if self.host is None:
            return
        restore = MarkRestore(self.host, self.ledger, self.ifname)
        strict = restore.strict_devices()
        if not strict:
            return
        names = ", ".join(strict)
        try:
            restore.apply(mark, strict)
        except FileNotFoundError:
            reason = "nft (nftables) is not installed"
        except HostFilterError as exc:
            reason = str(exc)
        else:
            logger.info(
                "strict reverse-path filtering on %s: the replies to the daemon's datagrams "
                "get their mark %#x back (nftables table %s, src_valid_mark) so the filter "
                "finds them routed the way they came",
                names,
                mark,
                "inet " + restore_table(self.ifname),
            )
            return
        logger.warning(
            "%s: strict reverse-path filtering (rp_filter=1) on %s drops the peers' datagrams "
            "that arrive there while the tunnel holds the default route; make it loose: "
            "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2",
            reason,
            names,
            strict[0],
        )

    def _drop_mark_restore(self) -> None:
        """The last IPv4 default route went (a reload): so does the mark restore."""
        self._rp_checked = False
        if self.host is None:
            return
        for item in reversed(self.ledger.items()):
            if isinstance(item, OwnedNftTable | OwnedSysctl):
                try:
                    remove(self.host, item)
                except (HostFilterError, OSError) as exc:
                    logger.warning("removing %s: %s", item.describe(), exc)
                else:
                    self.ledger.discard(item)

    def _drop_policy(self, version: int) -> None:
        for rule in reversed(self._policy.pop(version)):
            self._delete_rule(rule)
        if version == 4:
            self._drop_mark_restore()

    def _delete_rule(self, rule: Rule) -> None:
        try:
            self.raw.delete_rule(rule)
        except NetlinkError as exc:
            logger.warning("removing rule %s: %s", rule.describe(), exc)
        else:
            self.ledger.discard(OwnedRule(rule))

    # -- giving back --

    def give_back(self) -> None:
        """Remove everything the record holds (routes, rules, addresses, DNS), newest
        first; what cannot be removed stays in the record for the next start."""
        undo(self.raw, self.ledger.items(), self.dns, self.ledger, self.host)
        self._rp_checked = False
        self._placed.clear()
        self._policy.clear()
        self._host.clear()


def undo(
    netlink: NetlinkPort,
    items: Iterable[Owned],
    dns: DnsPort | None,
    ledger: Ledger | None = None,
    host: HostFilterPort | None = None,
) -> int:
    """Remove ``items`` (as recorded, oldest first) newest first; each removed one leaves
    ``ledger``. ``host`` is for nftables tables and sysctls (default: the real ones when
    ``netlink`` is the real netlink). Returns how many could not be removed (each logged)."""
    if host is None:
        host = default_host_filter(netlink)
    failed = 0
    for item in reversed(list(items)):
        try:
            _undo_one(netlink, item, dns, host)
        except Exception as exc:  # one failure must not keep the rest in place
            failed += 1
            logger.warning("removing %s: %s", item.describe(), exc)
        else:
            if ledger is not None:
                ledger.discard(item)
    return failed


def _undo_one(
    netlink: NetlinkPort, item: Owned, dns: DnsPort | None, host: HostFilterPort | None
) -> None:
    if isinstance(item, OwnedNftTable | OwnedSysctl):
        if host is None:
            raise HostFilterError("no nft/sysctl adapter in this process")
        remove(host, item)
    elif isinstance(item, OwnedMtu):
        try:
            netlink.set_mtu(item.dev, item.mtu)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # a device that is gone has no MTU to restore
                raise
    elif isinstance(item, OwnedRoute):
        netlink.delete_route(item.dst, item.dev, table=item.table, metric=item.metric)
    elif isinstance(item, OwnedRule):
        netlink.delete_rule(item.rule)
    elif isinstance(item, OwnedAddress):
        netlink.delete_address(item.dev, item.address)
    elif dns is not None:
        # resolved forgets a link that is gone, which is the usual case after a crash;
        # a revert that fails is reported but not retried forever.
        problem = dns.revert(item.dev)
        if problem is not None:
            logger.info("reverting the DNS settings of %s: %s", item.dev, problem)


def undo_leftovers(
    netlink: NetlinkPort,
    items: list[Owned],
    dns: DnsPort | None,
    ledger: Ledger,
    host: HostFilterPort | None = None,
) -> None:
    """At start: remove what a previous instance recorded and did not give back (it was
    killed); one log line says what. ``host`` as for ``undo``."""
    if not items:
        return
    for item in items:  # recorded again first: if this start dies too, the next one retries
        ledger.add(item)
    failed = undo(netlink, items, dns, ledger, host)
    kinds: dict[str, int] = {}
    for item in items:
        kind = {
            OwnedDns: "DNS setting",
            OwnedNftTable: "nftables table",
            OwnedMtu: "MTU",
        }.get(type(item), type(item).__name__[5:].lower())
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = ", ".join(f"{n} {_plural(k, n)}" for k, n in kinds.items())
    logger.warning(
        "a previous secureiod for this interface stopped without cleaning up; removed what "
        "it had added (%s)%s",
        summary,
        f", {failed} could not be removed" if failed else "",
    )


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith("s") else "s")
