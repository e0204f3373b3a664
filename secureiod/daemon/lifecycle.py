"""Peer lifecycle: sessions that start, stay alive, die and come back; endpoints by name.

* a peer with a known endpoint starts its session at once; one without has no session
  at all (dormant: no keys, no timer) until its first key exchange arrives, then the
  demultiplexer gets it one from ``_wake`` and starts it;
* keepalives while established and idle; a session that hears nothing for
  ``dead_after`` seconds, or that closed, is replaced after a short backoff;
* an endpoint given by a DNS name is resolved off the event loop, retried with backoff
  (1 s doubling to 30 s) while it fails, and re-resolved every ``RERESOLVE_INTERVAL``
  while no handshake succeeds — the built-in version of WireGuard's ``reresolve-dns``;
* session events (state, path, payload size, key rotation, restart, close) update the
  routes, offload and status, and are logged with a per-peer rate limit: everything the
  network can trigger is bounded, log lines included.

Timers are lazy, as in wireguard-go: one loop timer per peer, re-armed only when its next
deadline moves earlier; a timer that fires early just re-arms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from operator import itemgetter
from typing import TYPE_CHECKING, Final

from ..endpoint import Address, format_endpoint, literal_sockaddr
from ..logs import RateLimitedLog
from ..resolver import Backoff
from ..secureio.demux import Demultiplexer, Dormant, fallback_key_for
from ..secureio.events import (
    Closed,
    Event,
    KeyRotated,
    PathChanged,
    PayloadSizeNegotiated,
    PeerRestarted,
    SessionState,
    StateChanged,
)
from .allowed_ips import AllowedIPs
from .offload import OffloadCaps
from .peer import KEEPALIVE_TYPE, NameState, Peer, PeerTiming, session_options
from .pmtu import PathMtu
from .ports import ClockPort, LoopPort, ResolverPort
from .routes import Routes
from .send import SendPath

if TYPE_CHECKING:
    from ..config import Config, PeerConfig
    from ..secureio.session import Session

logger = logging.getLogger("secureiod.peer")

RERESOLVE_INTERVAL: Final = 30.0
"""While a named peer has no working session, look its name up again this often."""
LOG_INTERVAL: Final = 30.0
REFUSALS: Final = (
    (
        "kx-bad-signature",
        "the signature does not verify with this peer's public_key; check that the key "
        "in the config is the peer's (secureioctl pubkey on the peer)",
    ),
    ("kx-mode-mismatch", "the peer uses another AnswersMode; both sides must use the same"),
    ("kx-bad-key", "the peer sent an invalid (low-order) X25519 key"),
    (
        "kx-stale-session",
        "a signed message from an older session of the peer (a replay, or clock skew)",
    ),
    (
        "unencrypted-payload",
        "a clear or PSK-only packet carried more than a key exchange (forged, or a peer "
        "sending unencrypted fragments)",
    ),
)
_REFUSAL_COUNTS: Final = itemgetter(*(reason for reason, _ in REFUSALS))
"""A session's drops -> the count of each refusal reason, in one call."""
_CLOSED: Final = SessionState.CLOSED


class Lifecycle:
    def __init__(
        self,
        config: Config,
        *,
        peers: dict[str, Peer],
        router: AllowedIPs[Peer],
        demux: Demultiplexer[Peer],
        routes: Routes,
        offload: OffloadCaps,
        send: SendPath,
        loop: LoopPort,
        clock: ClockPort,
        resolver: ResolverPort,
        udp_family: int,
        on_status: Callable[[], None],
    ) -> None:
        self.config = config
        self.peers = peers
        self.router = router
        self.demux = demux
        self.routes = routes
        self.offload = offload
        self.send = send
        self.loop = loop
        self.clock = clock
        self.resolver = resolver
        self.udp_family = udp_family
        self.on_status = on_status
        self.log = RateLimitedLog(logger, interval=LOG_INTERVAL)
        self.pmtu = PathMtu(routes.netlink, loop, send.dirty)
        send.path_limit = self.pmtu.kernel_limit  # EMSGSIZE: what the kernel will send
        demux.wake = self._wake
        self._settle_pending = False

    def fleet_changed(self, now: float) -> None:
        """A peer's state changed: the status line and the TUN's offload (both computed over
        every peer) are brought up to date once, after the callbacks of this wake-up. Done
        per event, 10,000 peers reconnecting together cost O(peers²): minutes of CPU."""
        if not self._settle_pending:
            self._settle_pending = True
            self.loop.call_at(now, self._settle)

    def _settle(self, now: float) -> None:
        self._settle_pending = False
        self.on_status()
        self.offload.update(self.peers.values())

    # -- peers come and go ---------------------------------------------------------------

    def timing(self) -> PeerTiming:
        iface = self.config.interface
        return PeerTiming(
            key_update_interval=float(iface.key_update_interval),
            dead_after=float(iface.keepalive_timeout),
        )

    def endpoint_for(self, pc: PeerConfig) -> Address | None:
        """The socket address of ``pc``'s endpoint when it is an IP literal (None: no
        endpoint, or a name that is resolved later). Raises ``OSError`` when the host
        refuses the address (a zone whose interface is gone): a reload asks before it
        changes anything, so that such a config is refused as a whole."""
        if pc.endpoint is None:
            return None
        return literal_sockaddr(pc.endpoint.host, pc.endpoint.port, self.udp_family)

    def add_peer(
        self, pc: PeerConfig, now: float, resolved: list[Address] | str | None = None
    ) -> Peer:
        """At start: the peer, its routes and its session. ``resolved`` is what the
        start's lookup of a DNS-name endpoint found (``resolver.prefetch``, run before
        any route or rule could capture it): the addresses, used at once, or why not,
        which starts the retry backoff."""
        peer = self.start_peer(pc, self.endpoint_for(pc), now)
        ns = peer.name_state
        if ns is not None and resolved is not None:
            self._seed_name(peer, ns, resolved, now)
        self.routes.add_peer(peer)
        return peer

    def _seed_name(
        self, peer: Peer, ns: NameState, resolved: list[Address] | str, now: float
    ) -> None:
        name = format_endpoint((ns.host, ns.port))
        if isinstance(resolved, str):
            ns.last_error = resolved
            delay = ns.backoff.next_delay()
            ns.next_at = now + delay
            self.log.log(  # the same rate limit as the retries' lines
                now,
                (peer.name, "resolve"),
                logging.WARNING,
                "peer %s: cannot resolve endpoint %s at start: %s (retrying in %.0f s)",
                peer.name,
                name,
                resolved,
                delay,
            )
            return
        ns.addresses = tuple(resolved)
        ns.next_at = now + RERESOLVE_INTERVAL
        addr = resolved[0]
        logger.info("peer %s: endpoint %s is %s", peer.name, name, format_endpoint(addr))
        self.demux.set_endpoint(peer, addr)
        s = peer.session
        if s is not None and s.state == SessionState.NEW:
            s.start(now)

    def start_peer(self, pc: PeerConfig, endpoint: Address | None, now: float) -> Peer:
        """The peer and its session, with ``endpoint`` from ``endpoint_for``; its kernel
        routes are the caller's (``add_peer``, or a reload's ``Routes.prepare_reload``)."""
        peer = Peer(
            pc,
            self.config.identity,
            self.timing(),
            self.routes.payload_limit_for(pc, self.udp_family),
        )
        self.peers[peer.name] = peer
        self.router.insert_all(pc.allowed_ips, peer)
        if endpoint is None and pc.endpoint is not None:
            host, port = pc.endpoint.host, pc.endpoint.port
            peer.name_state = NameState(host, port, Backoff(), next_at=now)
        peer._endpoint = endpoint
        if endpoint is None and peer.name_state is None:
            # Only its own key exchange can start anything: no session, keys or timer
            # until then (10,000 such peers cost no start-up crypto and no wake-ups).
            options = session_options(pc, peer.timing, peer.payload_size_limit)
            dormant = Dormant(pc.public_key, fallback_key_for(options), peer.payload_size_limit)
            peer.dormant = True
            self.demux.add_dormant(peer, dormant)
            return peer
        self.demux.add(peer, peer.new_session(now, self.clock.wall_ns()))
        self.send.dirty.add(peer)
        return peer

    def _wake(self, peer: Peer, now: float) -> Session:
        """A dormant peer's first key exchange came: its session, unstarted (the
        demultiplexer starts it with that datagram)."""
        session = peer.new_session(now, self.clock.wall_ns())
        self.send.dirty.add(peer)
        return session

    def remove_peer(self, peer: Peer, now: float, reason: str) -> None:
        """A reload removed or replaced the peer: it and its session stop. Its kernel
        routes were handed over by ``Routes.prepare_reload`` (they go at the end of the
        reload unless a peer of the new config took them)."""
        self.peers.pop(peer.name, None)
        self.demux.remove(peer)
        self.router.remove_value(peer)
        if peer.session is not None:
            peer.session.close(now, reason)
        peer.session = None
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = peer.timer_at = None
        self.send.dirty.discard(peer)
        self.fleet_changed(now)

    def withdraw_routes(self, peer: Peer) -> None:
        """First half of an in-place reload change: the peer leaves the daemon's own
        routing table (all such peers leave before any comes back, so a prefix can move
        between two of them). The kernel routes and their MTUs are not touched: the
        routes were handed over by ``Routes.prepare_reload``, and the session, hence its
        payload size, stays."""
        self.router.remove_value(peer)

    def update_in_place(self, peer: Peer, new: PeerConfig) -> None:
        """A reload that changed only what needs no new session (allowed IPs, keepalive):
        the new prefixes and keepalive take effect, the session and its keys stay, and a
        prefix new to this peer gets the route MTU its session negotiated."""
        old = peer.config
        peer.config = new
        self.router.insert_all(new.allowed_ips, peer)
        self.routes.set_route_mtu(peer, [n for n in new.allowed_ips if n not in old.allowed_ips])
        peer.keepalive_interval = float(new.persistent_keepalive or peer.timing.keepalive_interval)
        self.schedule(peer)

    def apply_timing(self, now: float) -> list[str]:
        """A reload's ``key_update_interval`` and ``keepalive_timeout`` for the running
        peers; returns the names of those that got a new session.

        The dead-peer check reads the timeout each time, so a new one applies at once. The
        key-update interval is fixed in a session's options when it starts (the secureio
        core has no way to change it live), so a new interval gives each running peer a
        new session: one handshake, as at a restart of this side."""
        timing = self.timing()
        restarted = []
        for peer in list(self.peers.values()):
            if peer.timing == timing:
                continue
            new_interval = peer.timing.key_update_interval != timing.key_update_interval
            peer.timing = timing
            peer.keepalive_interval = float(
                peer.config.persistent_keepalive or timing.keepalive_interval
            )
            if new_interval and peer.session is not None:
                peer.session.close(now, "key_update_interval changed")
                self.restart(peer, now, "key_update_interval changed")
                restarted.append(peer.name)
            self.schedule(peer)
        return restarted

    def restart(self, peer: Peer, now: float, reason: str) -> None:
        peer.counters.restarts += 1
        self.log.log(
            now,
            (peer.name, "restart"),
            logging.INFO,
            "peer %s: starting a new session (%s)",
            peer.name,
            reason,
        )
        ns = peer.name_state
        if ns is not None and not ns.resolving:
            ns.next_at = now  # the name may point elsewhere by now
        self.demux.add(peer, peer.new_session(now, self.clock.wall_ns()))
        self.send.dirty.add(peer)

    # -- timers ------------------------------------------------------------------------

    def schedule(self, peer: Peer) -> None:
        t = peer.next_deadline()
        if t is None:
            return
        if peer.timer is not None and peer.timer_at is not None and peer.timer_at <= t:
            return  # fires early and re-arms: cheaper than moving it on every packet
        if peer.timer is not None:
            peer.timer.cancel()
        peer.timer_at = t
        peer.timer = self.loop.call_at(t, lambda now, p=peer: self._on_timer(p, now))

    def _on_timer(self, peer: Peer, now: float) -> None:
        peer.timer = peer.timer_at = None
        if self.peers.get(peer.name) is not peer:
            return
        reason = peer.needs_restart(now)
        if reason is not None:
            self.restart(peer, now, reason)
        else:
            s = peer.session
            if s is not None:
                st = s.get_timer()
                if st is not None and st <= now:
                    s.handle_timer(now)
                if peer.keepalive_due(now):
                    self.send.write(peer, KEEPALIVE_TYPE, b"", now)
            ns = peer.name_state
            if (
                ns is not None
                and not ns.resolving
                and now >= ns.next_at
                and not (s is not None and s.is_established)
            ):
                self._resolve(peer, ns)
        self.send.dirty.add(peer)

    def after_activity(self, peer: Peer, now: float) -> None:
        """After a peer's session took input: say why key exchanges are refused, replace a
        closed session when due, re-arm its timer."""
        s = peer.session
        if s is not None:
            # This runs for every active peer on every wake-up: look at the refusal
            # counters in one step, and only walk them when one moved (``seen`` holds
            # the last count of each reason reported, so the sums differ exactly then).
            if sum(_REFUSAL_COUNTS(s.stats.drops)) != sum(peer.refusals_seen.values()):
                self._report_refusals(peer, now)
            if s.state is _CLOSED:
                reason = peer.needs_restart(now)
                if reason is not None:
                    self.restart(peer, now, reason)
        self.schedule(peer)

    def _report_refusals(self, peer: Peer, now: float) -> None:
        """An operator with a wrong key needs to read why the peer does not come up; the
        session only counts refusals."""
        drops = peer.session.stats.drops  # type: ignore[union-attr]
        seen = peer.refusals_seen
        for reason, text in REFUSALS:
            count = drops[reason]
            if count > seen.get(reason, 0):
                seen[reason] = count
                self.log.log(
                    now,
                    (peer.name, reason),
                    logging.WARNING,
                    "peer %s: key exchange refused (%s, %d so far): %s",
                    peer.name,
                    reason,
                    count,
                    text,
                )

    # -- names -------------------------------------------------------------------------

    def _resolve(self, peer: Peer, ns: NameState) -> None:
        ns.resolving = True
        self.resolver.resolve(
            ns.host,
            ns.port,
            self.udp_family,
            lambda addrs, error, p=peer, n=ns: self._resolved(p, n, addrs, error),
        )

    def _resolved(
        self, peer: Peer, ns: NameState, addrs: list[Address] | None, error: str | None
    ) -> None:
        now = self.clock.monotonic()
        ns.resolving = False
        if self.peers.get(peer.name) is not peer or peer.name_state is not ns:
            return  # removed or reconfigured meanwhile
        name = format_endpoint((ns.host, ns.port))
        if not addrs:
            ns.last_error = error or "no address"
            delay = ns.backoff.next_delay()
            ns.next_at = now + delay
            self.log.log(
                now,
                (peer.name, "resolve"),
                logging.WARNING,
                "peer %s: cannot resolve endpoint %s: %s (retrying in %.0f s)",
                peer.name,
                name,
                ns.last_error,
                delay,
            )
        else:
            ns.last_error = None
            ns.backoff.reset()
            ns.addresses = tuple(addrs)
            ns.next_at = now + RERESOLVE_INTERVAL
            s = peer.session
            if s is not None and not s.is_established and peer.endpoint not in addrs:
                addr = addrs[0]
                logger.info("peer %s: endpoint %s is %s", peer.name, name, format_endpoint(addr))
                self.demux.set_endpoint(peer, addr)
                if s.state == SessionState.NEW:
                    s.start(now)
        self.send.dirty.add(peer)
        self.schedule(peer)

    # -- what the session says ---------------------------------------------------------

    def on_event(self, peer: Peer, ev: Event, now: float) -> None:
        if isinstance(ev, PathChanged):
            if ev.old is not None:
                peer.counters.roams += 1
            self.log.log(
                now,
                (peer.name, "path"),
                logging.INFO,
                "peer %s: endpoint %s → %s",
                peer.name,
                format_endpoint(ev.old) if ev.old else "(none)",
                format_endpoint(ev.new),
            )
            if ev.old is not None:
                self.pmtu.on_path_changed(peer, ev.new, now)
        elif isinstance(ev, StateChanged):
            logger.info("peer %s: %s → %s", peer.name, ev.old.name, ev.new.name)
            if ev.new == SessionState.ESTABLISHED:
                peer.last_handshake_wall = self.clock.wall_ns() / 1e9
                self.offload.send_caps(peer, now)
            self.fleet_changed(now)
        elif isinstance(ev, PayloadSizeNegotiated):
            self.routes.apply_payload_size(peer, ev.size, self.peers.values())
            self.pmtu.on_payload_size(peer, ev.size, now)
        elif isinstance(ev, KeyRotated):
            if not ev.local and peer.session is not None and peer.session.is_established:
                peer.last_handshake_wall = self.clock.wall_ns() / 1e9
        elif isinstance(ev, PeerRestarted):
            self.log.log(
                now,
                (peer.name, "peer-restart"),
                logging.INFO,
                "peer %s restarted (new session id)",
                peer.name,
            )
            peer.offload.remote_caps = 0
            self.offload.send_caps(peer, now)
            self.fleet_changed(now)
        elif isinstance(ev, Closed):
            self.log.log(
                now,
                (peer.name, "closed"),
                logging.WARNING,
                "peer %s: session closed: %s",
                peer.name,
                ev.reason,
            )
            peer.restart_at = now + peer.timing.restart_backoff
            self.fleet_changed(now)
