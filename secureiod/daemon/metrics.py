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
serves ``MAX_HTTP_CONNECTIONS`` connections at a time (more are closed at once and
counted), each with a socket timeout, and it is stopped with the device.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
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
    "HTTP_TIMEOUT",
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
"""Scrapes served at once; a connection beyond that is closed unanswered (and counted):
Prometheus scrapes one at a time, so only a misbehaving client ever meets the limit."""
HTTP_TIMEOUT: Final = 10.0
"""Seconds a metrics connection may wait on one read or write before it is closed."""
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
        'MTU of the TUN interface (with mtu = "auto", the smallest route MTU of its peers).',
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
        f"{MAX_HTTP_CONNECTIONS} at once).",
        (*IFACE, "result"),
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
        peers = list(d.peers.values())
        add("secureiod_peers", iface, len(peers))
        add(
            "secureiod_peers_established",
            iface,
            sum(1 for p in peers if p.state == SessionState.ESTABLISHED),
        )
        add("secureiod_no_route_packets_total", iface, d.send.no_route)
        add("secureiod_tun_write_errors_total", iface, d.receive.tun_write_errors)
        demux = d.demux.stats
        add("secureiod_unknown_source_datagrams_total", iface, demux.unknown_source)
        add("secureiod_identify_rate_limited_datagrams_total", iface, demux.rate_limited)
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


class _Handler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT  # per socket operation: a silent client frees its slot

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus scrapes every few seconds."""

    def get_stderr(self) -> io.StringIO:
        """wsgiref writes tracebacks of failed writes (a client gone) to stderr; those are
        the client's problem, and the app itself never raises (``_guarded``)."""
        return io.StringIO()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per connection, at most ``max_connections`` at once."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(
        self, address: tuple[Any, ...], family: int, app: Callable[..., Any], limit: int
    ) -> None:
        self.address_family = family
        self.slots = threading.BoundedSemaphore(limit)
        self.served = 0
        self.refused = 0
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
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        self.served += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or timed out: not worth more than a debug line."""
        logger.debug("metrics: connection from %s failed", client_address)


class MetricsServer:
    """``metrics_listen``: the registry over HTTP (``prometheus_client``'s WSGI app, any
    path, GET only, gzip when asked), served from threads of its own."""

    def __init__(
        self,
        listen: SocketAddress,
        registry: CollectorRegistry,
        *,
        max_connections: int = MAX_HTTP_CONNECTIONS,
    ) -> None:
        self.listen = listen
        self._thread: threading.Thread | None = None
        self._last_error_log = -ERROR_LOG_INTERVAL
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                listen.host,
                listen.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE,
            )[0]
            self._server = _Server(sockaddr, family, self._guarded(registry), max_connections)
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

    def _guarded(self, registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
        """The library's app, except that a failure while collecting is one rate-limited
        log line and a 500, never a traceback on stderr."""
        app = make_wsgi_app(registry)

        def guarded(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            try:
                return app(environ, start_response)  # type: ignore[no-any-return]
            except Exception as exc:
                now = time.monotonic()
                if now - self._last_error_log >= ERROR_LOG_INTERVAL:
                    self._last_error_log = now
                    logger.error("metrics: collecting failed: %s: %s", type(exc).__name__, exc)
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [b"collecting the metrics failed; see the daemon's log\n"]

        return guarded

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
