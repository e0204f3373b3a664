"""The daemon's side of path MTU: what the host knows about the path, and the log line.

The session decides its payload size (``secureio/pmtu.py``: probes, black-hole detection,
raises). The daemon adds what only the host can tell it:

* the kernel's path MTU toward a peer (``ip route get``: the route MTU, which includes a
  path MTU learned from ICMP "fragmentation needed" / "packet too big"; what ``IP_MTU``
  on a connected socket would say). It is read when a send is refused with EMSGSIZE, so
  the session drops straight to the size the kernel will send, and after a roam, so a
  narrower new path is used at once;
* every ``KERNEL_CHECK_INTERVAL`` seconds, for peers whose size is below their ceiling,
  whether the kernel's value grew (a learned path MTU expires after
  ``net.ipv4.route.mtu_expires``/``net.ipv6.route.mtu_expires``, 10 minutes by default, or
  the route changed): then the session tries to raise its size now instead of waiting for
  its own timer;
* one line per change, rate-limited per peer: ``peer b: path MTU 1408 → 1184 (...)``.

Reads of the kernel are bounded: a cached reading per address serves every refusal of a
burst, and the periodic check looks at a bounded number of peers per tick.
"""

from __future__ import annotations

import ipaddress
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from ..endpoint import Address, format_endpoint
from ..logs import RateLimitedLog
from ..secureio.constants import PACKET_OVERHEAD
from ..secureio.pmtu import (
    REASON_BLACK_HOLE,
    REASON_KERNEL,
    REASON_RAISE,
    REASON_ROAM,
    REASON_TOO_BIG,
)
from .peer import Peer
from .ports import LoopPort, NetlinkPort, TimerHandle
from .routes import payload_limit_for_mtu

logger = logging.getLogger("secureiod.peer")

KERNEL_CACHE_TTL: Final = 1.0
"""A reading of the kernel's path MTU serves the refusals of this long (one burst)."""
KERNEL_REREAD_GAP: Final = 0.05
"""A reading that does not explain a refusal (the kernel learned a smaller value since) is
read again, but not more often than this."""
KERNEL_CHECK_INTERVAL: Final = 5.0
KERNEL_CHECK_MAX_PEERS: Final = 256
"""Peers looked at per periodic check (the longest-unchecked first)."""
CACHE_SIZE: Final = 1024
LOG_INTERVAL: Final = 5.0

_REASONS: Final = {
    REASON_TOO_BIG: "a datagram was refused as too big (EMSGSIZE)",
    REASON_BLACK_HOLE: (
        "full-size probes went unanswered while small ones came back: a path MTU black "
        "hole (ICMP filtered?)"
    ),
    REASON_RAISE: "a larger probe came back",
    REASON_ROAM: "sized for the new endpoint",
    "negotiated": "negotiated",
}


@dataclass(slots=True)
class _Reading:
    mtu: int | None
    limit: int | None
    """The largest secureio payload one datagram carries at ``mtu``."""
    at: float


def _kernel_target(host: str) -> tuple[str, bool]:
    """(address to look up, is IPv6): an IPv4-mapped IPv6 address travels as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, ":" in host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), False
    return str(ip), ip.version == 6


class PathMtu:
    def __init__(self, netlink: NetlinkPort, loop: LoopPort, dirty: set[Peer]) -> None:
        self.netlink = netlink
        self.loop = loop
        self.dirty = dirty
        self.log = RateLimitedLog(logger, interval=LOG_INTERVAL)
        self.reads = 0
        """Kernel look-ups so far (for tests and status)."""
        self._cache: OrderedDict[str, _Reading] = OrderedDict()
        self._sizes: weakref.WeakKeyDictionary[Peer, int] = weakref.WeakKeyDictionary()
        self._logged: weakref.WeakKeyDictionary[Peer, int] = weakref.WeakKeyDictionary()
        """The size the log last said, so a change the rate limit held back is not the
        last word: a trailing line gives the size in use when the window closes."""
        self._trailing: weakref.WeakSet[Peer] = weakref.WeakSet()
        self._watched: OrderedDict[str, tuple[Peer, int | None]] = OrderedDict()
        self._timer: TimerHandle | None = None

    # -- what the kernel knows ---------------------------------------------------------

    def kernel_limit(self, addr: Address, refused: int, now: float) -> int | None:
        """For ``SendPath``: after a datagram of ``refused`` bytes to ``addr`` got EMSGSIZE,
        the largest payload the kernel sends there now (None if unknown)."""
        reading = self._cache.get(addr[0])
        if reading is not None:
            age = now - reading.at
            explains = reading.limit is None or reading.limit < refused - PACKET_OVERHEAD
            if age < KERNEL_REREAD_GAP or (age < KERNEL_CACHE_TTL and explains):
                return reading.limit
        return self._read(addr[0], now).limit

    def _read(self, host: str, now: float) -> _Reading:
        target, ipv6 = _kernel_target(host)
        self.reads += 1
        try:
            _, mtu = self.netlink.route_get(target)
        except Exception as exc:  # no route (yet): nothing to add to what the session knows
            logger.debug("path MTU toward %s unknown: %s", host, exc)
            mtu = None
        limit = payload_limit_for_mtu(mtu, ipv6) if mtu else None
        reading = _Reading(mtu, limit, now)
        cache = self._cache
        cache[host] = reading
        cache.move_to_end(host)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return reading

    # -- session events ----------------------------------------------------------------

    def on_path_changed(self, peer: Peer, addr: Address, now: float) -> None:
        """A roam: tell the session what the kernel says about the new path."""
        s = peer.session
        if s is None or not s.is_established:
            return
        limit = self._read(addr[0], now).limit
        if limit is not None:
            s.report_path_limit(limit, now)
            self.dirty.add(peer)

    def on_payload_size(self, peer: Peer, size: int, now: float) -> None:
        """The session's payload size is ``size`` now: log a change, watch the kernel while
        it is below the ceiling."""
        s = peer.session
        old = self._sizes.get(peer)
        self._sizes[peer] = size
        if old is not None and old != size and s is not None:
            if self.log.log(
                now,
                (peer.name, "path-mtu"),
                logging.INFO,
                "peer %s: path MTU %d → %d (%s)",
                peer.name,
                old,
                size,
                self._describe(s.payload_size_reason, peer),
            ):
                self._logged[peer] = size
            elif peer not in self._trailing:
                self._trailing.add(peer)
                self.loop.call_at(now + LOG_INTERVAL, lambda t, p=peer: self._log_trailing(p))
        if s is not None and size < s.options.payload_size_limit:
            self._watch(peer, now)

    def _log_trailing(self, peer: Peer) -> None:
        """At most one line per peer per window: the size in use now, if the log's last
        word about it is out of date."""
        self._trailing.discard(peer)
        size = self._sizes.get(peer)
        if size is not None and size != self._logged.get(peer):
            self._logged[peer] = size
            logger.info("peer %s: path MTU now %d (after changes held back above)", peer.name, size)

    def _describe(self, reason: str, peer: Peer) -> str:
        if reason == REASON_KERNEL:
            endpoint = peer.endpoint
            reading = self._cache.get(endpoint[0]) if endpoint is not None else None
            if endpoint is not None and reading is not None and reading.mtu:
                return f"the kernel's path MTU toward {format_endpoint(endpoint)} is {reading.mtu}"
            return "the kernel's path MTU toward the peer went down"
        return _REASONS.get(reason, reason)

    # -- watching the kernel for a wider path ----------------------------------------------

    def _watch(self, peer: Peer, now: float) -> None:
        endpoint = peer.endpoint
        if endpoint is None:
            return
        # A fresh reading: growth is measured from here, so a path the kernel never knew
        # was narrow (a black hole) does not look like one that widened.
        self._watched[peer.name] = (peer, self._read(endpoint[0], now).limit)
        if self._timer is None:
            self._timer = self.loop.call_at(now + KERNEL_CHECK_INTERVAL, self._check)

    def _check(self, now: float) -> None:
        """Each watched peer: did the kernel's path MTU grow above the session's size?"""
        self._timer = None
        watched = self._watched
        for name in list(watched)[:KERNEL_CHECK_MAX_PEERS]:
            peer, last = watched.pop(name)
            s = peer.session
            endpoint = peer.endpoint
            if (
                s is None
                or not s.is_established
                or endpoint is None
                or s.payload_size >= s.options.payload_size_limit
            ):
                continue  # removed, restarting, or back at its ceiling: stop watching
            limit = self._read(endpoint[0], now).limit
            watched[name] = (peer, limit)  # to the end: the longest-unchecked go first
            if limit is not None and (last is None or limit > last) and limit > s.payload_size:
                s.report_path_limit(limit, now)
                self.dirty.add(peer)
        if watched:
            self._timer = self.loop.call_at(now + KERNEL_CHECK_INTERVAL, self._check)


__all__ = ["KERNEL_CHECK_INTERVAL", "PathMtu"]
