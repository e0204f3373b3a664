"""Routes that would capture the daemon's own traffic or a LAN: what ``--check`` warns of.

The kernel picks the longest prefix, so a tunnel route more specific than the host's own
route to a peer's endpoint sends the daemon's datagrams for that peer into the tunnel
itself: the session never comes up and nothing says why. A prefix inside one of the
host's connected prefixes takes those LAN addresses into the tunnel. A prefix the host
already routes is installed behind the host's route (``owned.py``) and carries nothing
while that route exists. Each case is one warning naming the peer, the prefix, the
host's route and the fix.

Only routes in the main table can capture: with ``table = "auto"`` a default route goes
into its own table with rules that keep the daemon's marked datagrams out
(``policy.py``); with ``table = "off"`` there are no routes, and with ``table = N`` the
administrator's own rules decide what reaches that table.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..netlink import RT_TABLE_MAIN, RouteInfo

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def read_host_routes() -> list[RouteInfo] | None:
    """This host's routes, or None when they cannot be read (then the warnings judge the
    config alone)."""
    try:
        from ..netlink import Netlink

        with Netlink() as netlink:
            return netlink.list_routes()
    except Exception as exc:  # --check must work without netlink too
        logger.debug("cannot read the host's routes: %s", exc)
        return None


def capture_warnings(
    config: Config, host_routes: Sequence[RouteInfo] | None, *, same_prefix: bool = True
) -> list[str]:
    """One line per problem (see module doc), in peer and prefix order. ``same_prefix``
    False leaves out prefixes the host already routes (the running daemon says so itself
    when it installs its route behind the host's)."""
    iface = config.interface
    if iface.table not in ("auto", RT_TABLE_MAIN):
        return []
    main = (
        None
        if host_routes is None
        else [
            r
            for r in host_routes
            if r.table == RT_TABLE_MAIN and r.kind == "unicast" and r.dev != iface.name
        ]
    )
    endpoints: list[tuple[str, IPAddress]] = []
    for peer in config.peers:
        ip = peer.endpoint.ip if peer.endpoint is not None else None
        if ip is not None:
            endpoints.append((peer.name, ip))
    out: list[str] = []
    for peer in config.peers:
        for net in peer.allowed_ips:
            if iface.table == "auto" and net.prefixlen == 0:
                continue  # the full tunnel's own table and rules keep the underlay out
            where = f'peer "{peer.name}": allowed_ips {net}'
            for name, ip in endpoints:
                if ip.version == net.version and ip in net:
                    text = _endpoint_warning(where, net, peer.name, name, ip, main)
                    if text is not None:
                        out.append(text)
            for route in main or ():
                if not same_prefix and route.dst == net:
                    continue
                text = _host_route_warning(where, net, route)
                if text is not None:
                    out.append(text)
    return out


def _best_route(routes: Sequence[RouteInfo], ip: IPAddress) -> RouteInfo | None:
    """The route the kernel would pick for ``ip`` among ``routes`` (longest prefix, then
    lowest metric)."""
    matching = [r for r in routes if r.dst.version == ip.version and ip in r.dst]
    return max(matching, key=lambda r: (r.dst.prefixlen, -r.metric), default=None)


def _endpoint_warning(
    where: str,
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
    owner: str,
    name: str,
    ip: IPAddress,
    main: Sequence[RouteInfo] | None,
) -> str | None:
    best = _best_route(main, ip) if main is not None else None
    if best is not None and best.dst.prefixlen >= net.prefixlen:
        return None  # the host's own route to it is at least as specific: it stays
    whose = "its own endpoint" if name == owner else f'the endpoint of peer "{name}"'
    if best is not None:
        how = f" (the host reaches it by {best.describe()})"
        via = f" via {best.gateway}" if best.gateway is not None else ""
        dev = f" dev {best.dev}" if best.dev is not None else ""
        explicit = f"ip route add {ip}/{ip.max_prefixlen}{via}{dev}"
    elif main is not None:
        how, explicit = (
            " (the host has no route to it)",
            f"ip route add {ip}/{ip.max_prefixlen} via GATEWAY",
        )
    else:
        how, explicit = "", f"ip route add {ip}/{ip.max_prefixlen} via GATEWAY"
    return (
        f"{where} covers {whose} {ip}{how}, so the daemon's own datagrams to it would go "
        f"into the tunnel and the session would never come up; use a narrower prefix, a "
        f"route of its own for the endpoint ({explicit}), or table = N with rules of your own"
    )


def _host_route_warning(
    where: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network, route: RouteInfo
) -> str | None:
    if route.dst.version != net.version:
        return None
    if route.dst == net:
        return (
            f"{where} is already routed by this host ({route.describe()}); the tunnel's "
            "route goes behind it and carries nothing while that route exists; remove or "
            "narrow one of the two"
        )
    if route.connected and not route.dst.is_link_local and net.subnet_of(route.dst):  # type: ignore[arg-type]
        return (
            f"{where} lies inside {route.dst}, a connected prefix of this host on "
            f"{route.dev}: those addresses would be reached through the tunnel instead of "
            f'the LAN; use a prefix outside {route.dst}, or table = "off" and route it '
            "yourself"
        )
    return None
