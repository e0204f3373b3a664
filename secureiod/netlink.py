"""The netlink adapter: links, addresses and routes through pyroute2.

It knows nothing of secureio. It exists so the daemon states what it wants ("this route,
this MTU") and gets the same result whether or not a previous run, an operator or a crash
left things half done: every mutating call is idempotent (an address that is already there,
a route that is already gone, a link that no longer exists are successes), and every
failure is a ``NetlinkError`` whose message is one line naming the operation and the link.

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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyrouteError

__all__ = ["Interface", "Netlink", "NetlinkError", "Network"]

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_RT_TABLE_MAIN: Final = 254
_RT_SCOPE_LINK: Final = 253
_RT_SCOPE_NOWHERE: Final = 255  # in a delete request: "any scope"
_RTN_UNICAST: Final = 1
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

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- links ------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        """The ifindex of ``name``, or ``None`` if there is no such link."""
        with self._op(f"look up link {name}"):
            found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def set_up(self, name: str) -> None:
        with self._op(f"set {name} up"):
            self._ipr.link("set", index=self._index(name), state="up")

    def set_down(self, name: str) -> None:
        with self._op(f"set {name} down"):
            self._ipr.link("set", index=self._index(name), state="down")

    def set_mtu(self, name: str, mtu: int) -> None:
        with self._op(f"set MTU {mtu} on {name}"):
            self._ipr.link("set", index=self._index(name), mtu=int(mtu))

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

    def replace_route(self, dst: Network, dev: str, mtu: int | None = None) -> None:
        """Make the main table route ``dst`` to ``dev`` (no gateway), with ``mtu`` as its
        route MTU metric or none; replaces whatever route to ``dst`` was there.

        The route MTU lets the tunnel advertise a smaller MTU per destination without
        touching the link MTU.
        """
        net = ipaddress.ip_network(dst)
        kwargs = self._route_key(net)
        if net.version == 4:
            kwargs["scope"] = _RT_SCOPE_LINK  # what `ip route` picks for a gatewayless route
        if mtu is not None:
            kwargs["metrics"] = {"mtu": int(mtu)}
        what = f"replace route {net} dev {dev}" + (f" mtu {mtu}" if mtu is not None else "")
        with self._op(what):
            self._ipr.route("replace", oif=self._index(dev), **kwargs)

    def delete_route(self, dst: Network, dev: str) -> None:
        """Make sure no main table route ``dst`` leaves via ``dev``; absent (or no link) is
        success. Every such route goes, whatever its metric, scope or protocol, as if
        ``ip route del`` were repeated until it fails."""
        net = ipaddress.ip_network(dst)
        with self._op(f"delete route {net} dev {dev}"):
            index = self.link_index(dev)
            if index is None:
                return  # the kernel removed the link's routes with the link
            # Any scope and protocol, as `ip route del` asks: pyroute2's defaults (scope
            # universe) miss a link-scope route and the kernel's ESRCH would pass for "gone".
            key = {"oif": index, "scope": _RT_SCOPE_NOWHERE, "proto": 0, **self._route_key(net)}
            for _ in range(_MAX_DUPLICATE_ROUTES):
                try:
                    self._ipr.route("del", **key)
                except _PyrouteError as exc:
                    if exc.code not in _GONE:
                        raise
                    return
            raise NetlinkError(f"more than {_MAX_DUPLICATE_ROUTES} routes to delete")

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

    def route_get(self, dst_ip: Address | str) -> tuple[str, int]:
        """Ask the kernel how it would send to ``dst_ip``: (device name, MTU).

        The MTU is the route's MTU metric (which includes a learned path MTU) when there is
        one, else the device MTU; the daemon derives the largest secureio payload from it.
        """
        address = ipaddress.ip_address(dst_ip)
        with self._op(f"look up route to {address}"):
            (msg,) = self._ipr.route("get", dst=str(address), family=_family(address))
            index = msg.get_attr("RTA_OIF")
            if index is None:
                raise NetlinkError(f"look up route to {address}: the route has no device")
            (link,) = self._ipr.link("get", index=index)
            mtu = _route_mtu(msg) or int(link.get_attr("IFLA_MTU"))
            return str(link.get_attr("IFLA_IFNAME")), mtu

    # --- helpers ----------------------------------------------------------------------------

    def _index(self, name: str) -> int:
        index = self.link_index(name)
        if index is None:
            raise NetlinkError(f"no such link: {name}", errno.ENODEV)
        return index

    @staticmethod
    def _route_key(net: Network) -> dict[str, Any]:
        return {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "family": _family(net),
            "table": _RT_TABLE_MAIN,
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
