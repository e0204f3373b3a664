"""Prometheus metrics: the daemon's own counters, read when someone asks.

Nothing here runs per packet. The data path already counts what it does (``PeerCounters``,
the sessions' ``SessionStats``, the socket's ``UdpStats``, the demultiplexer's and the control
server's stats); ``DeviceCollector.collect`` reads those at scrape time and turns them into
metric families with ``prometheus_client``, which also writes the exposition format. There
is no second counter to keep in step and no cost between scrapes.

Two readers share one registry per device: the ``metrics`` control command
(``secureioctl metrics``, on the event loop) and, when ``[interface] metrics_listen`` is
set, an HTTP listener (``MetricsServer``) on its own threads, so a slow or hostile scraper
never holds up the loop. Those threads only read: ints, and containers copied in one C call
(``list(dict.values())``), so a peer added or removed by a reload meanwhile costs at most a
retry (``COLLECT_ATTEMPTS``), never a half-built answer.

Everything is bounded: label values come from configured peers (names, keys) and fixed
reason and state sets (``DROP_REASONS``, ``DropReason``, ``SessionState``), never from what
the network sends. A drop reason is exported once it has counted: 31 reasons, almost all
0, for each of a thousand peers would double what every scrape formats. The listener
serves ``MAX_HTTP_CONNECTIONS`` connections at a time, each for at most ``HTTP_DEADLINE``
seconds from accept to answer (when all are taken, the one waiting longest for its request
makes room; else the newcomer is closed; all counted), reads the registry at most once per
``COLLECT_INTERVAL`` however often it is asked, and is stopped with the device.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .. import __version__
from ..endpoint import format_endpoint
from ..secureio.events import DropReason, SessionState
from .peer import DROP_REASONS

if TYPE_CHECKING:
    from ..config import SocketAddress
    from .device import Device
    from .peer import Peer

__all__ = [
    "COLLECT_ATTEMPTS",
    "COLLECT_INTERVAL",
    "HTTP_DEADLINE",
    "HTTP_TIMEOUT",
    "MAX_RENDERINGS",
    "MAX_HTTP_CONNECTIONS",
    "SESSION_DROP_REASONS",
    "SESSION_STATES",
    "SPECS",
    "DeviceCollector",
    "Metrics",
    "MetricsError",
    "MetricsServer",
    "Spec",
]

logger = logging.getLogger("secureiod.metrics")

MAX_HTTP_CONNECTIONS: Final = 4
"""Scrapes served at once. Beyond that the connection that has waited longest for its
request is closed to make room, or if every one is being answered, the newcomer is closed
unanswered (all counted): Prometheus scrapes one at a time, so only a misbehaving client
ever meets the limit."""
HTTP_DEADLINE: Final = 10.0
"""Seconds from accepting a metrics connection to its answer written; then it is closed,
however busily the client trickles bytes (a per-read timeout alone does not bound that)."""
HTTP_TIMEOUT: Final = HTTP_DEADLINE
"""Seconds one read or write may block (the deadline bounds the whole connection)."""
COLLECT_INTERVAL: Final = 1.0
"""The listener reads the registry at most once per this many seconds; requests meanwhile
get the same snapshot, so a client scraping in a loop costs the loop one collection a
second, not one per request."""
MAX_RENDERINGS: Final = 8
"""Distinct answers (format, gzip, ``name[]`` filter) rendered from one snapshot; a client
asking for more different ones within an interval gets 429."""
SHUTDOWN_POLL: Final = 0.5
"""How often the listener's thread checks for shutdown (``serve_forever``'s poll)."""
COLLECT_ATTEMPTS: Final = 3
ERROR_LOG_INTERVAL: Final = 60.0

SESSION_STATES: Final = tuple(s.name.lower().replace("_", "-") for s in SessionState)
"""The ``state`` label values of ``secureiod_peer_session_state`` (as ``peers`` shows them)."""
SESSION_DROP_REASONS: Final = tuple(r.value for r in DropReason)

Kind = Literal["counter", "gauge", "info"]
IFACE: Final = ("interface",)
PEER: Final = ("interface", "peer")


class MetricsError(OSError):
    """``metrics_listen`` cannot be served (address in use, not an address of this host);
    ``str()`` is one line naming the key."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric family: its exposed name (counters end in ``_total``), type, help and
    label names (and for an info, the labels of its value). ``SPECS`` lists them all."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    info: tuple[str, ...] = ()

    def family(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.help, labels=self.labels)
        return InfoMetricFamily(self.name.removesuffix("_info"), self.help, labels=self.labels)


def _spec(
    name: str, kind: Kind, help: str, labels: Sequence[str] = IFACE, info: Sequence[str] = ()
) -> Spec:
    return Spec(name, kind, help, tuple(labels), tuple(info))


_PER_SESSION: Final = " Counts the current session: 0 again when a new one starts."

SPECS: Final = (
    # -- the interface --
    _spec(
        "secureiod_interface_info",
        "info",
        "The interface: its public key, UDP listening address and the daemon's version.",
        IFACE,
        ("public_key", "listen", "version"),
    ),
    _spec(
        "secureiod_interface_start_time_seconds",
        "gauge",
        "When the interface came up, in seconds since the Unix epoch.",
    ),
    _spec(
        "secureiod_interface_mtu_bytes",
        "gauge",
        'MTU of the TUN interface (with mtu = "auto", the largest route MTU of its peers).',
    ),
    _spec(
        "secureiod_interface_gso_max_size_bytes",
        "gauge",
        "Largest TCP segment the TUN device hands over (gso_max_size), sized to leave in one "
        "UDP send; absent on a device the daemon did not create.",
    ),
    _spec("secureiod_peers", "gauge", "Peers configured on the interface."),
    _spec("secureiod_peers_established", "gauge", "Peers whose session is established."),
    _spec(
        "secureiod_no_route_packets_total",
        "counter",
        "Packets read from the TUN device that no peer's allowed_ips route; dropped.",
    ),
    _spec(
        "secureiod_tun_write_errors_total",
        "counter",
        "Packets from peers that the TUN device did not take.",
    ),
    _spec(
        "secureiod_receive_yields_total",
        "counter",
        "Times a wake-up that had written a burst of packets to the TUN device gave up the "
        "CPU before reading on, so that their local receivers could run.",
    ),
    _spec(
        "secureiod_unknown_source_datagrams_total",
        "counter",
        "UDP datagrams no configured peer could be shown to have sent (strangers, garbage, "
        "stale sessions); dropped.",
    ),
    _spec(
        "secureiod_identify_rate_limited_datagrams_total",
        "counter",
        "Datagrams from unknown addresses dropped unexamined because the budget for "
        "identifying them (signature checks, trial decryption) was spent.",
    ),
    _spec(
        "secureiod_identify_bad_length_datagrams_total",
        "counter",
        "Datagrams from unknown addresses of a length no secureio packet has: dropped before "
        "any work, without spending the identification budget (also counted in "
        "secureiod_unknown_source_datagrams_total).",
    ),
    _spec(
        "secureiod_identify_key_checks_total",
        "counter",
        "Cheap checks spent identifying datagrams from unknown addresses: fallback keys a "
        "key-exchange-sized datagram was opened with, sessions a trial decryption tried.",
    ),
    _spec(
        "secureiod_identify_signature_checks_total",
        "counter",
        "Ed25519 checks of key exchanges from unknown addresses (the costly part of "
        "identifying; only for datagrams that passed the cheap checks).",
    ),
    _spec(
        "secureiod_identified_datagrams_total",
        "counter",
        "Datagrams from unknown addresses whose peer was found, by method: key-exchange (a "
        "key exchange signed by the peer), trial-decryption (the peer's session opened it).",
        (*IFACE, "method"),
    ),
    _spec(
        "secureiod_address_reassignments_total",
        "counter",
        "Datagrams from a known address that its peer's session could not open and another "
        "peer's could (e.g. a NAT gave the address to another peer).",
    ),
    _spec(
        "secureiod_path_takeovers_total",
        "counter",
        "Addresses mapped to one peer that another peer validated: the address now maps to "
        "the new one; the other takes it back with its next authentic datagram from there.",
    ),
    _spec(
        "secureiod_dormant_peers_woken_total",
        "counter",
        "Peers without an endpoint that got their session: a key exchange signed by their "
        "key arrived.",
    ),
    _spec(
        "secureiod_loop_wakeups_total",
        "counter",
        "Returns of the event loop from epoll_wait (what idling and small batches cost).",
    ),
    _spec(
        "secureiod_loop_callback_failures_total",
        "counter",
        "Event loop callbacks that raised: each logged (rate-limited) and survived; a bug.",
    ),
    _spec(
        "secureiod_udp_rx_datagrams_total",
        "counter",
        "Datagrams received on the UDP socket.",
    ),
    _spec("secureiod_udp_tx_datagrams_total", "counter", "Datagrams sent on the UDP socket."),
    _spec(
        "secureiod_udp_tx_failed_datagrams_total",
        "counter",
        "Datagrams the UDP socket did not send: dropped (buffer full), too-big (larger than "
        "the path MTU; the path size shrinks), error (any other).",
        (*IFACE, "reason"),
    ),
    _spec(
        "secureiod_reloads_total",
        "counter",
        "Config reloads (SIGHUP, secureioctl reload): applied, or refused (the running "
        "config stayed).",
        (*IFACE, "result"),
    ),
    _spec(
        "secureiod_control_requests_total",
        "counter",
        "Requests on the control socket (secureioctl), bad ones included.",
    ),
    _spec(
        "secureiod_control_error_replies_total",
        "counter",
        "Control requests answered with an error (refusals, bad and internal errors).",
    ),
    _spec(
        "secureiod_control_bad_requests_total",
        "counter",
        "Control request lines that were not a valid request (not JSON, too deep or too "
        "large, unknown command or argument).",
    ),
    _spec(
        "secureiod_control_internal_errors_total",
        "counter",
        "Control requests that failed inside the daemon (a bug; logged).",
    ),
    _spec(
        "secureiod_control_connections_total",
        "counter",
        "Connections accepted on the control socket.",
    ),
    _spec(
        "secureiod_control_connections_closed_total",
        "counter",
        "Control connections the daemon closed: slow-reader (replies not read), evicted "
        "(room for a new client), idle (no complete request in time).",
        (*IFACE, "reason"),
    ),
    _spec("secureiod_control_open_connections", "gauge", "Open control socket connections."),
    _spec(
        "secureiod_metrics_http_connections_total",
        "counter",
        "Connections to metrics_listen: served, or refused (more than "
        f"{MAX_HTTP_CONNECTIONS} at once, every one answering a request).",
        (*IFACE, "result"),
    ),
    _spec(
        "secureiod_metrics_http_connections_closed_total",
        "counter",
        "Served connections to metrics_listen the daemon cut: evicted (still no request "
        "when a newcomer needed the slot), deadline (not answered within "
        f"{HTTP_DEADLINE:g} s of accept).",
        (*IFACE, "reason"),
    ),
    # -- each peer --
    _spec(
        "secureiod_peer_info",
        "info",
        "A configured peer: its public key and current endpoint (empty while unknown).",
        PEER,
        ("public_key", "endpoint"),
    ),
    _spec(
        "secureiod_peer_rx_packets_total",
        "counter",
        "IP packets from the peer written to the TUN device (after the inner checks).",
        PEER,
    ),
    _spec(
        "secureiod_peer_rx_bytes_total",
        "counter",
        "Bytes of the IP packets counted by secureiod_peer_rx_packets_total.",
        PEER,
    ),
    _spec(
        "secureiod_peer_tx_packets_total",
        "counter",
        "IP packets read from the TUN device and sent to the peer.",
        PEER,
    ),
    _spec(
        "secureiod_peer_tx_bytes_total",
        "counter",
        "Bytes of the IP packets counted by secureiod_peer_tx_packets_total.",
        PEER,
    ),
    _spec(
        "secureiod_peer_dropped_packets_total",
        "counter",
        "IP packets to or from the peer that the daemon dropped, by reason (a reason "
        "appears once it has counted).",
        (*PEER, "reason"),
    ),
    _spec(
        "secureiod_peer_session_dropped_total",
        "counter",
        "Datagrams and messages the peer's secureio session dropped, by reason (a reason "
        "appears once it has counted)." + _PER_SESSION,
        (*PEER, "reason"),
    ),
    _spec(
        "secureiod_peer_session_rx_datagrams_total",
        "counter",
        "Authentic, fresh datagrams the peer's session accepted." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_rx_bytes_total",
        "counter",
        "Bytes of the datagrams counted by secureiod_peer_session_rx_datagrams_total."
        + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_tx_datagrams_total",
        "counter",
        "Datagrams the peer's session sealed for the wire." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_tx_bytes_total",
        "counter",
        "Bytes of the datagrams counted by secureiod_peer_session_tx_datagrams_total."
        + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_rx_kx_duplicates_total",
        "counter",
        "Key exchanges signed by the peer that carried a key the session already had (its "
        "retries, or replays): answered, they move nothing." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_rx_kx_restored_total",
        "counter",
        "Key exchanges that took the peer's previous key back (a newer key never used while "
        "the previous one still was: an old key replayed); they move nothing." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_session_state",
        "gauge",
        "1 for the state the peer's session is in, 0 for the others.",
        (*PEER, "state"),
    ),
    _spec(
        "secureiod_peer_sessions_started_total",
        "counter",
        "Sessions started with the peer (the first one, restarts and reconfigurations).",
        PEER,
    ),
    _spec(
        "secureiod_peer_session_restarts_total",
        "counter",
        "Sessions replaced because the old one closed or the peer stayed silent for "
        "keepalive_timeout while established (dead peer).",
        PEER,
    ),
    _spec(
        "secureiod_peer_handshakes_total",
        "counter",
        "Key exchanges accepted from the peer (its first key and every rekey)." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_key_rotations_total",
        "counter",
        "Rotations of our own session key toward the peer (key_update_interval)." + _PER_SESSION,
        PEER,
    ),
    _spec(
        "secureiod_peer_latest_handshake_timestamp_seconds",
        "gauge",
        "When the latest handshake with the peer completed, in seconds since the Unix "
        "epoch; 0 if none yet.",
        PEER,
    ),
    _spec(
        "secureiod_peer_last_receive_timestamp_seconds",
        "gauge",
        "When the latest authentic datagram from the peer arrived, in seconds since the "
        "Unix epoch (absent before the first).",
        PEER,
    ),
    _spec(
        "secureiod_peer_roams_total",
        "counter",
        "Times the peer's endpoint moved to a new address (on proof from the peer).",
        PEER,
    ),
    _spec(
        "secureiod_peer_payload_size_bytes",
        "gauge",
        "Largest secureio payload that fits one datagram to the peer (negotiated on the path).",
        PEER,
    ),
    _spec(
        "secureiod_peer_route_mtu_bytes",
        "gauge",
        "MTU of the routes to the peer's allowed_ips (absent until the payload size is known).",
        PEER,
    ),
)


# --- collecting ------------------------------------------------------------------------------


class DeviceCollector:
    """A ``prometheus_client`` custom collector over one ``Device``: reads its counters at
    scrape time (see the module docstring for why reading from another thread is safe)."""

    def __init__(self, device: Device, server: Callable[[], MetricsServer | None]) -> None:
        self.device = device
        self._server = server
        self.started_wall: float | None = None
        """Wall-clock time of ``Device.start`` (set by ``Metrics.start``)."""

    def describe(self) -> list[Metric]:
        """The families without samples: lets the registry check names and serve
        ``?name[]=`` filters without reading the device."""
        return [spec.family() for spec in SPECS]

    def collect(self) -> list[Metric]:
        for _ in range(COLLECT_ATTEMPTS - 1):
            try:
                return self._collect_once()
            except RuntimeError:  # a dict resized under us by a reload: read again
                continue
        return self._collect_once()

    def _collect_once(self) -> list[Metric]:
        d = self.device
        families = {spec.name: spec.family() for spec in SPECS}

        def add(name: str, labels: Sequence[str], value: float) -> None:
            families[name].add_metric(labels, value)  # type: ignore[attr-defined]

        clock = d.clock
        now = clock.monotonic()
        wall = clock.wall_ns() / 1e9
        config = d.lifecycle.config
        iface = (d.ifname,)
        udp = d.udp
        families["secureiod_interface_info"].add_metric(  # type: ignore[attr-defined]
            iface,
            {
                "public_key": str(config.identity.public_key),
                "listen": format_endpoint(udp.local_address),
                "version": __version__,
            },
        )
        if self.started_wall is not None:
            add("secureiod_interface_start_time_seconds", iface, self.started_wall)
        if d.routes.link_mtu is not None:
            add("secureiod_interface_mtu_bytes", iface, d.routes.link_mtu)
        if d.routes.gso_max_size is not None:
            add("secureiod_interface_gso_max_size_bytes", iface, d.routes.gso_max_size)
        peers = list(d.peers.values())
        add("secureiod_peers", iface, len(peers))
        add(
            "secureiod_peers_established",
            iface,
            sum(1 for p in peers if p.state == SessionState.ESTABLISHED),
        )
        add("secureiod_no_route_packets_total", iface, d.send.no_route)
        add("secureiod_tun_write_errors_total", iface, d.receive.tun_write_errors)
        add("secureiod_receive_yields_total", iface, d.receive.yields)
        demux = d.demux.stats
        add("secureiod_unknown_source_datagrams_total", iface, demux.unknown_source)
        add("secureiod_identify_rate_limited_datagrams_total", iface, demux.rate_limited)
        add("secureiod_identify_bad_length_datagrams_total", iface, demux.bad_size)
        add("secureiod_identify_key_checks_total", iface, demux.key_checks)
        add("secureiod_identify_signature_checks_total", iface, demux.signature_checks)
        for method, value in (
            ("key-exchange", demux.identified_kx),
            ("trial-decryption", demux.identified_trial),
        ):
            add("secureiod_identified_datagrams_total", (*iface, method), value)
        add("secureiod_address_reassignments_total", iface, demux.reassigned)
        add("secureiod_path_takeovers_total", iface, demux.path_takeovers)
        add("secureiod_dormant_peers_woken_total", iface, demux.woken)
        loop = d.loop  # a port may not count (LoopPort does not require it): then left out
        wakeups = getattr(loop, "wakeups", None)
        if wakeups is not None:
            add("secureiod_loop_wakeups_total", iface, wakeups)
        failures = getattr(loop, "callback_failures", None)
        if failures is not None:
            add("secureiod_loop_callback_failures_total", iface, failures)
        u = udp.stats
        add("secureiod_udp_rx_datagrams_total", iface, u.rx_datagrams)
        add("secureiod_udp_tx_datagrams_total", iface, u.tx_datagrams)
        for reason, value in (
            ("dropped", u.tx_dropped),
            ("too-big", u.tx_too_big),
            ("error", u.tx_errors),
        ):
            add("secureiod_udp_tx_failed_datagrams_total", (*iface, reason), value)
        add("secureiod_reloads_total", (*iface, "applied"), d.reloader.reloads)
        add("secureiod_reloads_total", (*iface, "refused"), d.reloader.refused)
        control = d.control
        if control is not None:
            c = control.stats
            add("secureiod_control_requests_total", iface, c.requests)
            add("secureiod_control_error_replies_total", iface, c.errors)
            add("secureiod_control_bad_requests_total", iface, c.bad_requests)
            add("secureiod_control_internal_errors_total", iface, c.internal_errors)
            add("secureiod_control_connections_total", iface, c.accepted)
            for reason, value in (
                ("slow-reader", c.disconnected_slow),
                ("evicted", c.evicted_idle),
                ("idle", c.timed_out),
            ):
                add("secureiod_control_connections_closed_total", (*iface, reason), value)
            add("secureiod_control_open_connections", iface, control.connections)
        server = self._server()
        if server is not None:
            served, refused = server.connections
            add("secureiod_metrics_http_connections_total", (*iface, "served"), served)
            add("secureiod_metrics_http_connections_total", (*iface, "refused"), refused)
            evicted, timed_out = server.closed
            for reason, value in (("evicted", evicted), ("deadline", timed_out)):
                add("secureiod_metrics_http_connections_closed_total", (*iface, reason), value)
        for peer in peers:
            self._collect_peer(families, d.ifname, peer, now, wall)
        return list(families.values())

    @staticmethod
    def _collect_peer(
        families: dict[str, Metric], ifname: str, peer: Peer, now: float, wall: float
    ) -> None:
        def add(name: str, labels: Sequence[str], value: float) -> None:
            families[name].add_metric(labels, value)  # type: ignore[attr-defined]

        labels = (ifname, peer.name)
        s = peer.session  # read once: a restart may replace it while we read
        endpoint = s.endpoint if s is not None else None
        families["secureiod_peer_info"].add_metric(  # type: ignore[attr-defined]
            labels,
            {
                "public_key": str(peer.config.public_key),
                "endpoint": format_endpoint(endpoint) if endpoint is not None else "",
            },
        )
        c = peer.counters
        add("secureiod_peer_rx_packets_total", labels, c.rx_packets)
        add("secureiod_peer_rx_bytes_total", labels, c.rx_bytes)
        add("secureiod_peer_tx_packets_total", labels, c.tx_packets)
        add("secureiod_peer_tx_bytes_total", labels, c.tx_bytes)
        drops = c.drops
        for reason in DROP_REASONS:  # the fixed set, never the dict's keys
            count = drops.get(reason, 0)
            if count:
                add("secureiod_peer_dropped_packets_total", (*labels, reason), count)
        add("secureiod_peer_sessions_started_total", labels, peer.sessions_started)
        add("secureiod_peer_session_restarts_total", labels, c.restarts)
        add("secureiod_peer_roams_total", labels, c.roams)
        handshake = peer.last_handshake_wall
        add(
            "secureiod_peer_latest_handshake_timestamp_seconds",
            labels,
            handshake if handshake is not None else 0.0,
        )
        if peer.route_mtu is not None:
            add("secureiod_peer_route_mtu_bytes", labels, peer.route_mtu)
        state = s.state if s is not None else SessionState.CLOSED
        current = state.name.lower().replace("_", "-")
        for name in SESSION_STATES:
            add("secureiod_peer_session_state", (*labels, name), 1.0 if name == current else 0.0)
        if s is None:
            return
        st = s.stats
        session_drops = st.drops
        for reason in SESSION_DROP_REASONS:
            count = session_drops.get(reason, 0)
            if count:
                add("secureiod_peer_session_dropped_total", (*labels, reason), count)
        add("secureiod_peer_session_rx_datagrams_total", labels, st.rx_packets)
        add("secureiod_peer_session_rx_bytes_total", labels, st.rx_bytes)
        add("secureiod_peer_session_tx_datagrams_total", labels, st.tx_packets)
        add("secureiod_peer_session_tx_bytes_total", labels, st.tx_bytes)
        add("secureiod_peer_session_rx_kx_duplicates_total", labels, st.rx_kx_duplicates)
        add("secureiod_peer_session_rx_kx_restored_total", labels, st.rx_kx_restored)
        local, remote = s.key_rotations
        add("secureiod_peer_handshakes_total", labels, remote)
        add("secureiod_peer_key_rotations_total", labels, local)
        add("secureiod_peer_payload_size_bytes", labels, s.payload_size)
        last = s.last_received
        if last is not None:
            add("secureiod_peer_last_receive_timestamp_seconds", labels, wall - (now - last))


class Metrics:
    """One device's metrics: a registry of its collector and the process and platform
    collectors (no global registry: two devices in one test process stay apart), and the
    HTTP listener when ``listen`` is set. The listener's socket is bound here, before the
    daemon drops privileges; its thread starts in ``start`` (after the drop, so it never
    holds a capability the main thread gave up)."""

    def __init__(self, device: Device, listen: SocketAddress | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.server: MetricsServer | None = None
        self.collector = DeviceCollector(device, lambda: self.server)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if listen is not None:
            self.server = MetricsServer(listen, self.registry)

    def text(self) -> str:
        """The exposition (Prometheus text format 0.0.4), for ``secureioctl metrics``."""
        return generate_latest(self.registry).decode("utf-8")

    def start(self, wall: float) -> None:
        self.collector.started_wall = wall
        if self.server is None:
            return
        self.server.start()
        host, port = self.server.address
        shown = format_endpoint((host, port))
        if ipaddress.ip_address(host.partition("%")[0]).is_loopback:
            logger.info("metrics on http://%s/metrics", shown)
        else:
            logger.warning(
                "metrics on http://%s/metrics, not a loopback address: whoever can reach it "
                "reads peer names, public keys, endpoints and traffic counters",
                shown,
            )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


# --- the HTTP listener -----------------------------------------------------------------------


@dataclass(slots=True)
class _Connection:
    """One accepted metrics connection, in ``_Server``'s table until its thread ends."""

    sock: socket.socket
    accepted: float
    reading: bool = True
    """Still waiting for its request line and headers (may be evicted for a newcomer)."""
    cut: bool = False
    """Shut down for passing the deadline; its thread is ending."""


def _cut(sock: socket.socket) -> None:
    """Shut the socket down under its thread's feet: a blocked read returns EOF and a
    blocked write fails at once. The thread still closes it (only it may: a close here
    could let the descriptor be reused under a read)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Handler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT  # per socket operation; ``_Server`` bounds the whole connection

    server: _Server

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            self.server.request_read(self.connection)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus scrapes every few seconds."""

    def get_stderr(self) -> io.StringIO:
        """wsgiref writes tracebacks of failed writes (a client gone) to stderr; those are
        the client's problem, and the app itself never raises (``_Exposition``)."""
        return io.StringIO()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per connection, at most ``limit`` at once, each with
    ``deadline`` seconds from accept to its answer written.

    A per-read timeout alone lets a client that sends a byte now and then hold its slot
    forever (slowloris); the deadline is enforced by the listener's own thread, which wakes
    every ``SHUTDOWN_POLL`` anyway (``service_actions``). When every slot is taken, the
    connection that has waited longest for its request is evicted for the newcomer: a
    client that has not even asked yet loses to one that might; only when every slot holds
    a request being answered is the newcomer refused."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(
        self,
        address: tuple[Any, ...],
        family: int,
        app: Callable[..., Any],
        limit: int,
        deadline: float,
    ) -> None:
        self.address_family = family
        self.limit = limit
        self.deadline = deadline
        self.served = 0
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self._lock = threading.Lock()
        self._open: dict[socket.socket, _Connection] = {}
        super().__init__(address, _Handler)
        self.set_app(app)

    def server_bind(self) -> None:
        """HTTPServer's own looks the address up in DNS (``getfqdn``), which can block
        startup for seconds on a host without a resolver; the literal is enough."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.limit:
                waiting = [c for c in self._open.values() if c.reading and not c.cut]
                if not waiting:
                    self.refused += 1
                    self.shutdown_request(request)
                    return
                oldest = min(waiting, key=lambda c: c.accepted)
                del self._open[oldest.sock]  # its thread ends at once: it was reading
                _cut(oldest.sock)
                self.evicted += 1
            self._open[request] = _Connection(request, time.monotonic())
            self.served += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._open.pop(request, None)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._lock:  # out of the table before the close: never cut after it
                self._open.pop(request, None)
            self.shutdown_request(request)

    def request_read(self, sock: socket.socket) -> None:
        with self._lock:
            connection = self._open.get(sock)
            if connection is not None:
                connection.reading = False

    def service_actions(self) -> None:
        """Cut connections past the deadline. They keep their slot until their thread
        ends (at once, unless it waits for a collection), so threads stay bounded."""
        now = time.monotonic()
        with self._lock:
            for connection in self._open.values():
                if not connection.cut and now - connection.accepted >= self.deadline:
                    connection.cut = True
                    self.timed_out += 1
                    _cut(connection.sock)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or timed out: not worth more than a debug line."""
        logger.debug("metrics: connection from %s failed", client_address)


@dataclass(frozen=True, slots=True)
class _Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


class _Exposition:
    """The WSGI app: the registry read at most once per ``interval``, whoever asks.

    Collecting a thousand peers takes the GIL from the event loop for a while; a client
    scraping in a loop would otherwise do it hundreds of times a second and halve the
    tunnel's throughput. Requests within an interval share one snapshot (one lock: a
    concurrent request waits for the collection under way instead of starting its own),
    and its renderings (format, gzip, ``name[]`` filter) are kept with it, at most
    ``MAX_RENDERINGS``: a client varying its query beyond that gets 429 until the next
    snapshot. A failed collection is kept too: one rate-limited log line and a 500."""

    def __init__(
        self,
        registry: CollectorRegistry,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.clock = clock
        self.collections = 0
        self._lock = threading.Lock()
        self._taken: float | None = None
        self._families: list[Metric] | Exception = []
        self._rendered: dict[tuple[str, bool, frozenset[str] | None], _Answer] = {}
        self._last_error_log = -ERROR_LOG_INTERVAL

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if method == "OPTIONS":
            answer = _Answer("200 OK", [("Allow", "OPTIONS,GET")], b"")
        elif method != "GET":
            body = f"# HTTP 405 Method Not Allowed: {method[:32]}; use GET\n".encode()
            answer = _Answer("405 Method Not Allowed", [("Allow", "OPTIONS,GET")], body)
        else:
            answer = self._answer(environ)
        start_response(answer.status, list(answer.headers))
        return [answer.body]

    def _answer(self, environ: dict[str, Any]) -> _Answer:
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT") or "")
        gzipped = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or "")
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        key = (content_type, gzipped, frozenset(names) if names is not None else None)
        with self._lock:
            families = self._snapshot()
            if isinstance(families, Exception):
                return _Answer(
                    "500 Internal Server Error",
                    [("Content-Type", "text/plain")],
                    b"collecting the metrics failed; see the daemon's log\n",
                )
            answer = self._rendered.get(key)
            if answer is not None:
                return answer
            if len(self._rendered) >= MAX_RENDERINGS:
                return _Answer(
                    "429 Too Many Requests",
                    [("Content-Type", "text/plain"), ("Retry-After", "1")],
                    b"too many different queries; ask again in a second\n",
                )
            body = encoder(_Frozen(families, key[2]))
            headers = [("Content-Type", content_type)]
            if gzipped:
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            answer = self._rendered[key] = _Answer("200 OK", headers, body)
            return answer

    def _snapshot(self) -> list[Metric] | Exception:
        now = self.clock()
        if self._taken is not None and now - self._taken < self.interval:
            return self._families
        self._rendered.clear()
        self.collections += 1
        try:
            self._families = list(self.registry.collect())
        except Exception as exc:
            self._families = exc
            if now - self._last_error_log >= ERROR_LOG_INTERVAL:
                self._last_error_log = now
                logger.error("metrics: collecting failed: %s: %s", type(exc).__name__, exc)
        self._taken = self.clock()  # from its end: a slow collection is not run back to back
        return self._families


class _Frozen:
    """A snapshot's families as a collector for the encoders, with ``name[]`` applied the
    way ``prometheus_client`` applies it (samples by name; a family left empty is left out)."""

    def __init__(self, families: list[Metric], names: frozenset[str] | None) -> None:
        self.families = families
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            if self.names is None:
                yield family
                continue
            samples = [s for s in family.samples if s.name in self.names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


class MetricsServer:
    """``metrics_listen``: the registry over HTTP (the Prometheus text or OpenMetrics
    format, any path, GET only, gzip when asked), served from threads of its own."""

    def __init__(
        self,
        listen: SocketAddress,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_HTTP_CONNECTIONS,
        deadline: float = HTTP_DEADLINE,
        interval: float = COLLECT_INTERVAL,
    ) -> None:
        self.listen = listen
        self._thread: threading.Thread | None = None
        self.app = _Exposition(registry, interval)
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                listen.host,
                listen.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE,
            )[0]
            self._server = _Server(sockaddr, family, self.app, max_connections, deadline)
        except (OSError, UnicodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise MetricsError(f"metrics_listen {listen}: cannot listen: {why}") from None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def connections(self) -> tuple[int, int]:
        """(served, refused) connections so far."""
        return self._server.served, self._server.refused

    @property
    def closed(self) -> tuple[int, int]:
        """(evicted, timed-out) connections so far: the served ones the listener cut."""
        return self._server.evicted, self._server.timed_out

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(SHUTDOWN_POLL,),
            name="secureiod-metrics",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, wait for the listener's thread (at most a poll interval), close
        the socket. Connections still being served end with their daemon threads."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()
            thread.join(SHUTDOWN_POLL * 4)
        self._server.server_close()
