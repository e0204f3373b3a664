"""The netlink adapter: links, addresses, routes and policy-routing rules through pyroute2.

It knows nothing of secureio. It exists so the daemon states what it wants ("this route,
this MTU") and gets the same result whether or not a previous run, an operator or a crash
left things half done: every mutating call is idempotent (an address that is already there,
a route that is already gone, a link that no longer exists are successes), and every
failure is a ``NetlinkError`` whose message is one line naming the operation and the link.

Two kinds of route writes exist on purpose. ``add_route`` creates a route only if no route
with the same key (destination, table, metric) exists, so it can never overwrite a route
someone else made; ``replace_route`` and ``delete_route`` with an explicit ``metric`` touch
exactly the route at that key, which the daemon uses only for routes it added itself.
``list_routes`` and ``rules`` show what the host has, so a caller can see a collision
before it happens and name it.

It is synchronous, and pyroute2 ties an ``IPRoute`` to the thread that made it and refuses
to run inside a running asyncio loop; async code calls it through ``asyncio.to_thread``
and opens the ``Netlink`` inside that call.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyrouteError

from .route_socket import RouteSocket

__all__ = [
    "RT_TABLE_MAIN",
    "Interface",
    "Netlink",
    "NetlinkError",
    "Network",
    "RouteInfo",
    "Rule",
    "default_metric",
]

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

RT_TABLE_MAIN: Final = 254
_RT_TABLE_MAIN: Final = RT_TABLE_MAIN
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_HOST: Final = 254
_RT_SCOPE_NOWHERE: Final = 255  # in a delete request: "any scope"
LINK_INDEX_MEMO_SECONDS: Final = 1.0
"""How long ``add_route`` reuses the ifindex it looked up for a device name. A start or a
reload adds one route per peer to the same device: 10,000 peers made 10,000 lookups, a
tenth of that start's time. An index the kernel refuses (ENODEV: the device went, or came
back under a new index) is looked up again at once, so a device made again within the
second is found as before. A device renamed within the second keeps getting the routes
asked for under its old name: the device that was looked up, which for the daemon is its
own TUN device, not whatever took the name since."""
_RTN_UNICAST: Final = 1
_RTPROT_KERNEL: Final = 2
_FIB_RULE_INVERT: Final = 0x2
_NO_SUPPRESS: Final = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN when the rule has none
_ROUTE_TYPES: Final = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}
_PROTOCOLS: Final = {1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp", 186: "bgp"}
_TABLES: Final = {253: "default", 254: "main", 255: "local"}


def default_metric(version: int) -> int:
    """The metric ``ip route add`` gives a route without one: 0 for IPv4, 1024 for IPv6."""
    return 0 if version == 4 else 1024


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One route as the kernel lists it (``ip route show table all``)."""

    dst: Network
    table: int = RT_TABLE_MAIN
    metric: int = 0
    dev: str | None = None
    gateway: Address | None = None
    kind: str = "unicast"
    proto: int = 0
    scope: int = 0
    mtu: int | None = None

    @property
    def connected(self) -> bool:
        """The prefix route the kernel made for an address on ``dev`` (on-link)."""
        return self.kind == "unicast" and self.proto == _RTPROT_KERNEL and self.gateway is None

    def describe(self) -> str:
        """The route as ``ip route`` prints it, for messages an administrator acts on."""
        parts = [] if self.kind == "unicast" else [self.kind]
        parts.append("default" if self.dst.prefixlen == 0 else str(self.dst))
        if self.gateway is not None:
            parts += ["via", str(self.gateway)]
        if self.dev is not None:
            parts += ["dev", self.dev]
        if self.table != RT_TABLE_MAIN:
            parts += ["table", _TABLES.get(self.table, str(self.table))]
        if self.proto:
            parts += ["proto", _PROTOCOLS.get(self.proto, str(self.proto))]
        if self.scope == _RT_SCOPE_LINK:
            parts += ["scope", "link"]
        elif self.scope == _RT_SCOPE_HOST:
            parts += ["scope", "host"]
        if self.metric or self.dst.version == 6:
            parts += ["metric", str(self.metric)]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy-routing rule of the two shapes the daemon writes: ``[not] fwmark M lookup
    T`` and ``lookup T suppress_prefixlength N``; as listed, rules with other selectors
    (from, to, iif...) appear with those left out (enough to know which priorities and
    tables are taken)."""

    version: int
    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None

    def describe(self) -> str:
        """As ``ip rule`` prints it."""
        parts = [f"{self.priority}:"]
        if self.invert:
            parts.append("not")
        parts += ["from", "all"]
        if self.fwmark is not None:
            mark = f"{self.fwmark:#x}"
            if self.fwmask is not None and self.fwmask != 0xFFFFFFFF:
                mark += f"/{self.fwmask:#x}"
            parts += ["fwmark", mark]
        parts += ["lookup", _TABLES.get(self.table, str(self.table))]
        if self.suppress_prefixlength is not None:
            parts += ["suppress_prefixlength", str(self.suppress_prefixlength)]
        return " ".join(parts)


_MAX_DUPLICATE_ROUTES: Final = 64  # IPv6 keeps one route per metric; bound the loop
_GONE: Final = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


class NetlinkError(Exception):
    """A netlink request failed; ``str()`` is one line, ``code`` the errno if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Netlink:
    """A route-netlink connection (see module doc); use it as a context manager.

    ``netns`` names a namespace under ``/run/netns`` (as ``ip netns`` does): the socket is
    opened there by a short-lived child process and passed back, so the caller never
    changes namespace itself. ``None`` is the caller's own namespace.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise NetlinkError(
                "Netlink is synchronous: from async code call it via asyncio.to_thread()"
            )
        self.netns = netns
        where = f" in netns {netns}" if netns else ""
        with self._op(f"open route netlink socket{where}"):
            # flags=0: never let pyroute2 create a missing namespace as a side effect.
            self._ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
            # The requests made once per peer (route add/delete, link lookup): by hand.
            self._fast = RouteSocket(self._ipr.fileno())
        self._route_oif: tuple[str, int, float] | None = None
        """(device name, ifindex, monotonic time of the lookup) for ``add_route``."""

    def close(self) -> None:
        self._fast.close()
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- links ------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The ifindex of ``name``, or ``None`` if there is no such link."""
        with self._op(f"look up link {name}"):
            return self._fast.link_index(name)

    def set_up(self, name: str) -> None:
        with self._op(f"set {name} up"):
            self._ipr.link("set", index=self._index(name), state="up")

    def set_down(self, name: str) -> None:
        with self._op(f"set {name} down"):
            self._ipr.link("set", index=self._index(name), state="down")

    def set_mtu(self, name: str, mtu: int) -> None:
        with self._op(f"set MTU {mtu} on {name}"):
            self._ipr.link("set", index=self._index(name), mtu=int(mtu))

    def set_gso_max_size(self, name: str, size: int) -> int | None:
        """The largest GSO packet the kernel builds for this link (``IFLA_GSO_MAX_SIZE``,
        settable on an existing link since Linux 5.19; it caps the IPv4 limit too).
        Returns the value the link has afterwards (None: not reported): a kernel may take
        the request and keep its own value."""
        index = self._index(name)
        with self._op(f"set gso_max_size {size} on {name}"):
            self._ipr.link("set", index=index, gso_max_size=int(size))
        with self._op(f"read gso_max_size of {name}"):
            (msg,) = self._ipr.link("get", index=index)
        value = msg.get_attr("IFLA_GSO_MAX_SIZE")
        return int(value) if value is not None else None

    def get_mtu(self, name: str) -> int:
        with self._op(f"read MTU of {name}"):
            (msg,) = self._ipr.link("get", index=self._index(name))
        return int(msg.get_attr("IFLA_MTU"))

    def delete_link(self, name: str) -> None:
        """Delete ``name``; a link that is already gone is success."""
        with self._op(f"delete link {name}"):
            index = self.link_index(name)
            if index is None:
                return
            try:
                self._ipr.link("del", index=index)
            except _PyrouteError as exc:
                if exc.code not in _GONE:
                    raise

    # --- addresses --------------------------------------------------------------------------

    def add_address(self, name: str, iface: Interface) -> None:
        """Add ``iface`` (address/prefix) to ``name``; already present is success."""
        self.create_address(name, iface)

    def create_address(self, name: str, iface: Interface) -> bool:
        """Add ``iface`` to ``name`` unless it is there already; True if this call added
        it, so that a caller removes later only what it added."""
        iface = ipaddress.ip_interface(iface)
        with self._op(f"add address {iface} to {name}"):
            try:
                self._ipr.addr(
                    "add",
                    index=self._index(name),
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                )
            except _PyrouteError as exc:
                if exc.code != errno.EEXIST:
                    raise
                return False
        return True

    def delete_address(self, name: str, iface: Interface) -> None:
        """Remove ``iface`` from ``name``; absent (or no such link) is success."""
        iface = ipaddress.ip_interface(iface)
        with self._op(f"delete address {iface} from {name}"):
            index = self.link_index(name)
            if index is None:
                return
            try:
                self._ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except _PyrouteError as exc:
                if exc.code not in _GONE:
                    raise

    def addresses(self, name: str) -> list[Interface]:
        """Every IPv4 and IPv6 address on ``name`` (including link-local ones)."""
        with self._op(f"list addresses of {name}"):
            index = self._index(name)
            msgs = self._ipr.addr("dump", index=index)
            out: list[Interface] = []
            for msg in msgs:
                if msg.get("index") != index:
                    continue
                address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if address:
                    out.append(ipaddress.ip_interface(f"{address}/{msg.get('prefixlen')}"))
        return out

    # --- routes -----------------------------------------------------------------------------

    def replace_route(
        self,
        dst: Network,
        dev: str,
        mtu: int | None = None,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None:
        """Make ``table`` route ``dst`` to ``dev`` (no gateway), with ``mtu`` as its route
        MTU metric or none; replaces whatever route has that key (with ``metric``: exactly
        the route at that metric), so use it only for routes the caller owns.

        The route MTU lets the tunnel advertise a smaller MTU per destination without
        touching the link MTU.
        """
        net = ipaddress.ip_network(dst)
        kwargs = self._route_key(net, table)
        if net.version == 4:
            kwargs["scope"] = _RT_SCOPE_LINK  # what `ip route` picks for a gatewayless route
        if metric is not None:
            kwargs["priority"] = int(metric)
        if mtu is not None:
            kwargs["metrics"] = {"mtu": int(mtu)}
        what = f"replace route {net} dev {dev}" + _table_text(table) + _metric_text(metric)
        if mtu is not None:
            what += f" mtu {mtu}"
        with self._op(what):
            self._ipr.route("replace", oif=self._index(dev), **kwargs)

    def add_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
        mtu: int | None = None,
    ) -> None:
        """Create the route ``dst dev DEV table T metric M``, failing with ``EEXIST`` if a
        route with that key (destination, table, metric) already exists: it never
        overwrites one. ``metric`` None is ``default_metric``."""
        net = ipaddress.ip_network(dst)
        if metric is None:
            metric = default_metric(net.version)
        scope = _RT_SCOPE_LINK if net.version == 4 else 0
        what = f"add route {net} dev {dev}" + _table_text(table) + _metric_text(metric)

        def add(oif: int) -> None:
            self._fast.add_route(
                net, oif, table=int(table), metric=int(metric), scope=scope,
                mtu=None if mtu is None else int(mtu),
            )  # fmt: skip

        with self._op(what):
            index, remembered = self._route_index(dev)
            try:
                add(index)
            except _PyrouteError as exc:
                if not remembered or exc.code != errno.ENODEV:
                    raise
                self._route_oif = None  # gone since we looked: look again, once
                add(self._route_index(dev)[0])

    def _route_index(self, dev: str) -> tuple[int, bool]:
        """``dev``'s ifindex for ``add_route``, and whether it was remembered from a lookup
        less than ``LINK_INDEX_MEMO_SECONDS`` ago."""
        now = time.monotonic()
        memo = self._route_oif
        if memo is not None and memo[0] == dev and now - memo[2] < LINK_INDEX_MEMO_SECONDS:
            return memo[1], True
        index = self._index(dev)
        self._route_oif = (dev, index, now)
        return index, False

    def delete_route(
        self,
        dst: Network,
        dev: str,
        *,
        table: int = RT_TABLE_MAIN,
        metric: int | None = None,
    ) -> None:
        """Make sure no route ``dst`` of ``table`` leaves via ``dev`` (with ``metric``: the
        one at that metric); absent (or no link) is success. Without ``metric`` every such
        route goes, whatever its metric, scope or protocol, as if ``ip route del`` were
        repeated until it fails."""
        net = ipaddress.ip_network(dst)
        what = f"delete route {net} dev {dev}" + _table_text(table) + _metric_text(metric)
        with self._op(what):
            index = self.link_index(dev)
            if index is None:
                return  # the kernel removed the link's routes with the link
            # Any scope and protocol, as `ip route del` asks: pyroute2's defaults (scope
            # universe) miss a link-scope route and the kernel's ESRCH would pass for "gone".
            for _ in range(1 if metric is not None else _MAX_DUPLICATE_ROUTES):
                try:
                    self._fast.delete_route(
                        net,
                        index,
                        table=int(table),
                        metric=None if metric is None else int(metric),
                        scope=_RT_SCOPE_NOWHERE,
                    )
                except _PyrouteError as exc:
                    if exc.code not in _GONE:
                        raise
                    return
            if metric is None:
                raise NetlinkError(f"more than {_MAX_DUPLICATE_ROUTES} routes to delete")

    def list_routes(self, version: int | None = None, table: int | None = None) -> list[RouteInfo]:
        """Every route of ``table`` (all tables if None) of IP ``version`` (both if None),
        as ``ip route show table all`` and ``ip -6 route show table all`` list them."""
        versions = (4, 6) if version is None else (version,)
        with self._op("list routes"):
            names = self._link_names()
            out: list[RouteInfo] = []
            for v in versions:
                family = socket.AF_INET if v == 4 else socket.AF_INET6
                for msg in self._ipr.route("dump", family=family):
                    route = _route_info(msg, v, names)
                    if table is None or route.table == table:
                        out.append(route)
        return out

    def routes(self, dev: str) -> list[tuple[Network, int | None]]:
        """The main table's unicast routes out of ``dev`` (both families, as
        ``ip route show dev`` and ``ip -6 route show dev`` list them) with their MTU metric."""
        with self._op(f"list routes of {dev}"):
            index = self._index(dev)
            out: list[tuple[Network, int | None]] = []
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in self._ipr.route("dump", family=family):
                    if (
                        msg.get_attr("RTA_OIF") != index
                        or msg.get_attr("RTA_TABLE", msg.get("table")) != _RT_TABLE_MAIN
                        or msg.get("type") != _RTN_UNICAST
                    ):
                        continue
                    default = "0.0.0.0" if family == socket.AF_INET else "::"
                    dst = msg.get_attr("RTA_DST") or default
                    net = ipaddress.ip_network(f"{dst}/{msg.get('dst_len')}")
                    out.append((net, _route_mtu(msg)))
        return out

    def route_get(self, dst_ip: Address | str, *, mark: int | None = None) -> tuple[str, int]:
        """Ask the kernel how it would send to ``dst_ip``: (device name, MTU). With
        ``mark``, as it would for a socket with that firewall mark (the daemon's own
        datagrams, which policy routing keeps out of the tunnel).

        The MTU is the route's MTU metric (which includes a learned path MTU) when there is
        one, else the device MTU; the daemon derives the largest secureio payload from it.
        """
        address = ipaddress.ip_address(dst_ip)
        extra: dict[str, Any] = {} if mark is None else {"mark": int(mark)}
        with self._op(f"look up route to {address}"):
            (msg,) = self._ipr.route("get", dst=str(address), family=_family(address), **extra)
            index = msg.get_attr("RTA_OIF")
            if index is None:
                raise NetlinkError(f"look up route to {address}: the route has no device")
            (link,) = self._ipr.link("get", index=index)
            mtu = _route_mtu(msg) or int(link.get_attr("IFLA_MTU"))
            return str(link.get_attr("IFLA_IFNAME")), mtu

    # --- policy-routing rules -----------------------------------------------------------

    def rules(self, version: int) -> list[Rule]:
        """The rules of IP ``version`` (``ip rule`` / ``ip -6 rule``), by priority."""
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        with self._op(f"list IPv{version} rules"):
            out = [_rule_of(msg, version) for msg in self._ipr.rule("dump", family=family)]
        return sorted(out, key=lambda r: r.priority)

    def add_rule(self, rule: Rule) -> None:
        """Add ``rule``; an identical rule already there fails with ``EEXIST``."""
        with self._op(f"add rule {rule.describe()}"):
            self._ipr.rule("add", **_rule_request(rule))

    def delete_rule(self, rule: Rule) -> None:
        """Delete exactly ``rule`` (priority, table, mark and flags all match); absent is
        success."""
        with self._op(f"delete rule {rule.describe()}"):
            try:
                self._ipr.rule("del", **_rule_request(rule))
            except _PyrouteError as exc:
                if exc.code not in _GONE:
                    raise

    # --- helpers ----------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise NetlinkError(f"no such link: {name}", errno.ENODEV)
        return index

    def _link_names(self) -> dict[int, str]:
        return {
            int(msg["index"]): str(msg.get_attr("IFLA_IFNAME")) for msg in self._ipr.get_links()
        }

    @staticmethod
    def _route_key(net: Network, table: int = RT_TABLE_MAIN) -> dict[str, Any]:
        return {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "family": _family(net),
            "table": int(table),
        }

    @staticmethod
    @contextmanager
    def _op(what: str) -> Iterator[None]:
        """Turn pyroute2's and the socket's errors into one-line ``NetlinkError``s."""
        try:
            yield
        except NetlinkError as exc:
            if str(exc).startswith(what):
                raise
            raise NetlinkError(f"{what}: {exc}", exc.code) from None
        except _PyrouteError as exc:
            raise NetlinkError(f"{what}: {_describe(exc.code)}", exc.code) from None
        except OSError as exc:
            raise NetlinkError(f"{what}: {exc.strerror or exc}", exc.errno) from None


def _family(value: Address | Network) -> int:
    return socket.AF_INET if value.version == 4 else socket.AF_INET6


def _table_text(table: int) -> str:
    return "" if table == RT_TABLE_MAIN else f" table {table}"


def _metric_text(metric: int | None) -> str:
    return "" if metric is None else f" metric {metric}"


def _route_info(msg: Any, version: int, names: dict[int, str]) -> RouteInfo:
    default = "0.0.0.0" if version == 4 else "::"
    dst = ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or default}/{msg.get('dst_len')}")
    oif = msg.get_attr("RTA_OIF")
    gateway = msg.get_attr("RTA_GATEWAY")
    return RouteInfo(
        dst=dst,
        table=int(msg.get_attr("RTA_TABLE") or msg.get("table")),
        metric=int(msg.get_attr("RTA_PRIORITY") or 0),
        dev=names.get(int(oif), str(oif)) if oif is not None else None,
        gateway=ipaddress.ip_address(gateway) if gateway else None,
        kind=_ROUTE_TYPES.get(int(msg.get("type")), str(msg.get("type"))),
        proto=int(msg.get("proto") or 0),
        scope=int(msg.get("scope") or 0),
        mtu=_route_mtu(msg),
    )


def _rule_of(msg: Any, version: int) -> Rule:
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    mark = msg.get_attr("FRA_FWMARK")
    return Rule(
        version=version,
        priority=int(msg.get_attr("FRA_PRIORITY") or 0),
        table=int(msg.get_attr("FRA_TABLE") or msg.get("table")),
        fwmark=int(mark) if mark is not None else None,
        fwmask=int(msg.get_attr("FRA_FWMASK")) if mark is not None else None,
        invert=bool(int(msg.get("flags") or 0) & _FIB_RULE_INVERT),
        suppress_prefixlength=(
            None if suppress is None or suppress == _NO_SUPPRESS else int(suppress)
        ),
    )


def _rule_request(rule: Rule) -> dict[str, Any]:
    request: dict[str, Any] = {
        "family": socket.AF_INET if rule.version == 4 else socket.AF_INET6,
        "priority": rule.priority,
        "table": rule.table,
    }
    if rule.fwmark is not None:
        request["fwmark"] = rule.fwmark
        request["fwmask"] = 0xFFFFFFFF if rule.fwmask is None else rule.fwmask
    if rule.invert:
        request["flags"] = _FIB_RULE_INVERT
    if rule.suppress_prefixlength is not None:
        # pyroute2 drops a 0 given as `suppress_prefixlength=0`; the attribute goes as is.
        request["FRA_SUPPRESS_PREFIXLEN"] = rule.suppress_prefixlength
    return request


def _route_mtu(msg: Any) -> int | None:
    metrics = msg.get_attr("RTA_METRICS")
    if not metrics:
        return None
    mtu = metrics.get_attr("RTAX_MTU")
    return int(mtu) if mtu else None


def _describe(code: int) -> str:
    text = os.strerror(code) if code else "unknown netlink error"
    if code == errno.EPERM:
        return f"{text} (needs CAP_NET_ADMIN)"
    if code == errno.ENETUNREACH:
        return f"{text} (no route)"
    return text
