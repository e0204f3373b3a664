"""The device: one TUN, one UDP socket, one session per peer, and the loop that joins them.

Single-threaded and level-triggered (epoll through ``selectors``): each wake-up reads
every ready packet (up to a batch), hands each to its peer's session, then flushes every
touched session once, so small packets to one peer share a datagram (aggregation) and no
per-packet timer is needed under load. The daemon never parses a secureio byte itself.

Outbound: TUN batch → ``AllowedIPs.lookup_destination`` → ``Session.write_message`` →
(flush) ``datagrams_to_send`` → UDP to the peer's endpoint.
Inbound: UDP batch → peer by endpoint (or by authenticated key exchange / trial for an
unknown address: roaming) → ``Session.receive_datagram`` → ``MessageReceived`` → the inner
source must route back to the same peer → TUN.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import logging
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .control import ControlError, ControlServer
from .notify import watchdog_interval
from .offload import (
    CAP_LOSSY,
    CAP_VNET,
    CAPS_TYPE,
    MAX_SEGMENT,
    VNET_HDR_SIZE,
    VNET_TYPE,
    ZERO_HDR,
    decode_caps,
    encode_caps,
    header_acceptable,
)
from .peer import DATA_TYPE, KEEPALIVE_TYPE, Peer, PeerTiming
from .router import AllowedIPs
from .secureio.constants import KX_PACKET_SIZE, PACKET_OVERHEAD
from .secureio.errors import SecureioError
from .secureio.events import (
    Closed,
    KeyRotated,
    MessageReceived,
    PayloadSizeNegotiated,
    PeerRestarted,
    SessionState,
    StateChanged,
)
from .secureio.keys import PskKeys
from .secureio.kx_message import KeyExchangeMessage
from .secureio.packet import PacketKey, open_packet
from .secureio.session import PayloadTooBigError, QueueFullError, SessionClosedError
from .secureio.wire import MessageType, iter_messages
from .tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from .udp import Address, SendResult, UdpSocket, format_endpoint, parse_endpoint

logger = logging.getLogger(__name__)

BATCH: Final = 256
BUSY_GAP: Final = 0.002
"""Wake-ups closer than this count as "under load": read whole batches."""
TRIAL_PEER_LIMIT: Final = 32
"""Above this many peers an unknown address is identified only by its key exchange:
trial decryption against every session would cost too much per hostile datagram."""
TRIALS_PER_SECOND: Final = 500.0
REFUSAL_LOG_INTERVAL: Final = 30.0
TICK: Final = 0.25
LOSS_MIN_CHAINS: Final = 2
LOSS_RATIO: Final = 0.01
OFFLOAD_MAX_COOLDOWN: Final = 600.0
CAPS_INTERVAL: Final = 10.0
_REFUSALS: Final = (
    (
        "kx-bad-signature",
        "the signature does not verify with this peer's public_key; check that the key "
        "in the config is the peer's (secureioctl pubkey on the peer)",
    ),
    (
        "kx-mode-mismatch",
        "the peer uses another AnswersMode; both sides must use the same",
    ),
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
IPV6_MIN_MTU: Final = 1280
MIN_MTU: Final = 576
DEFAULT_UNDERLAY_MTU: Final = 1500


def payload_limit_for_mtu(mtu: int, ipv6: bool) -> int:
    """The secureio payload limit P that fits one datagram into an underlay MTU."""
    overhead = (48 if ipv6 else 28) + PACKET_OVERHEAD
    return max(147, min(65216, ((mtu - overhead) // 16) * 16))


@dataclass(slots=True)
class DeviceStats:
    no_route: int = 0
    unknown_source: int = 0
    tun_write_errors: int = 0
    roamed: int = 0
    reloads: int = 0


class _TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Device:
    def __init__(
        self,
        config: Any,
        *,
        tun: Any,
        udp: UdpSocket,
        netlink: Any,
        notifier: Any,
        control_path: Path | None,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self.tun = tun
        self.udp = udp
        self.netlink = netlink
        self.notifier = notifier
        self.clock = clock
        self.wall_ns = wall_ns
        self.ifname: str = tun.name
        self.stats = DeviceStats()
        self.router: AllowedIPs[Peer] = AllowedIPs()
        self.peers: dict[str, Peer] = {}
        self._by_addr: dict[tuple[str, int], Peer] = {}
        self._by_key: dict[bytes, Peer] = {}
        self._fallback_keys: list[tuple[PacketKey, int]] = []
        self._heap: list[tuple[float, int, Peer]] = []
        self._seq = 0
        self._dirty: set[Peer] = set()
        self._trials = _TokenBucket(TRIALS_PER_SECOND, TRIALS_PER_SECOND)
        self._running = False
        self._reload_requested = False
        self._stop_reason: str | None = None
        self._selector = selectors.DefaultSelector()
        self._interface_mtu: int | None = None
        self._status_text = ""
        self._watchdog = watchdog_interval() if notifier is not None and notifier.enabled else None
        self._next_watchdog: float | None = None
        self._next_tick = clock() + TICK
        self._batch = BATCH
        self._last_wake = 0.0
        self.started_at = clock()
        self.control: ControlServer | None = None
        if control_path is not None:
            self.control = ControlServer(control_path, self._control)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- setup ------------------------------------------------------------------------

    def configure_interface(self) -> None:
        """Addresses, MTU, link up; peer routes are added as peers are."""
        iface = self.config.interface
        nl = self.netlink
        mtu = iface.mtu if isinstance(iface.mtu, int) else IPV6_MIN_MTU
        nl.set_mtu(self.ifname, mtu)
        self._interface_mtu = mtu
        for address in iface.address:
            nl.add_address(self.ifname, address)
        nl.set_up(self.ifname)

    def add_peers(self, peer_configs: list[Any], now: float) -> None:
        for pc in peer_configs:
            self._add_peer(pc, now)
        self._rebuild_fallback_keys()

    def _add_peer(self, pc: Any, now: float) -> Peer:
        timing = PeerTiming(
            key_update_interval=float(self.config.interface.key_update_interval),
            dead_after=float(getattr(self.config.interface, "keepalive_timeout", 15.0)),
        )
        peer = Peer(pc, self.config.identity, timing, self._payload_limit_for(pc))
        self.peers[peer.name] = peer
        self._by_key[pc.public_key.raw] = peer
        self.router.insert_all(pc.allowed_ips, peer)
        for net in pc.allowed_ips:
            self.netlink.replace_route(net, self.ifname)
        if pc.endpoint is not None:
            self._set_endpoint(peer, self._resolve(pc))
        peer.new_session(now, self.wall_ns(), start=peer.endpoint is not None)
        self._dirty.add(peer)
        return peer

    def _remove_peer(self, peer: Peer) -> None:
        self.peers.pop(peer.name, None)
        self._by_key.pop(peer.config.public_key.raw, None)
        if peer.endpoint is not None:
            self._by_addr.pop(peer.endpoint[:2], None)  # type: ignore[arg-type]
        self.router.remove_value(peer)
        for net in peer.config.allowed_ips:
            try:
                self.netlink.delete_route(net, self.ifname)
            except Exception as exc:  # the route may be gone with the link
                logger.debug("removing route %s: %s", net, exc)
        if peer.session is not None:
            peer.session.close(self.clock(), "peer removed")
        peer.session = None
        peer.scheduled = None
        self._dirty.discard(peer)
        self._update_offload()

    def _payload_limit_for(self, pc: Any) -> int:
        override = getattr(self.config.interface, "payload_size_limit", None)
        if override:
            return int(override)
        mtu = DEFAULT_UNDERLAY_MTU
        ipv6 = self.udp.family == socket.AF_INET6
        host = getattr(pc, "endpoint_host", None)
        if host:
            try:
                ip = ipaddress.ip_address(host)
                ipv6 = ip.version == 6
                _, route_mtu = self.netlink.route_get(ip)
                if route_mtu:
                    mtu = route_mtu
            except (ValueError, Exception) as exc:  # hostname or no route yet: default
                logger.debug("underlay MTU toward %s unknown: %s", host, exc)
        return payload_limit_for_mtu(mtu, ipv6)

    def _resolve(self, pc: Any) -> Address | None:
        try:
            host, port = pc.endpoint_host, pc.endpoint_port
        except AttributeError:
            host, port = parse_endpoint(pc.endpoint)
        family = self.udp.family
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            logger.warning("peer %s: cannot resolve endpoint %s: %s", pc.name, pc.endpoint, exc)
            return None
        for fam, _, _, _, sockaddr in infos:
            if fam == family:
                return sockaddr  # type: ignore[return-value]
            if family == socket.AF_INET6 and fam == socket.AF_INET:
                return (f"::ffff:{sockaddr[0]}", sockaddr[1], 0, 0)
        logger.warning(
            "peer %s: endpoint %s has no address of the socket's family", pc.name, pc.endpoint
        )
        return None

    def _set_endpoint(self, peer: Peer, addr: Address | None) -> None:
        if peer.endpoint is not None:
            self._by_addr.pop(peer.endpoint[:2], None)  # type: ignore[arg-type]
        peer.endpoint = addr
        if addr is not None:
            key = (addr[0], addr[1])
            other = self._by_addr.get(key)
            if other is not None and other is not peer:
                other.endpoint = None
            self._by_addr[key] = peer

    def _rebuild_fallback_keys(self) -> None:
        """Keys that open key-exchange packets from unknown addresses: clear + each PSK."""
        keys: dict[bytes | None, tuple[PacketKey, int]] = {}
        for peer in self.peers.values():
            psk = peer.config.psk
            if psk is None:
                keys[None] = (PacketKey.clear(), 0)
            elif psk not in keys:
                pk = PskKeys.from_psk(psk)
                keys[psk] = (PacketKey.aux(pk.aux_key), pk.packet_id_mask)
        self._fallback_keys = list(keys.values())

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> str:
        """Serve until stopped; returns why it stopped."""
        sel = self._selector
        sel.register(self.tun.fd, selectors.EVENT_READ, self._on_tun)
        sel.register(self.udp.fileno(), selectors.EVENT_READ, self._on_udp)
        sel.register(self._wake_r.fileno(), selectors.EVENT_READ, self._on_wake)
        if self.control is not None:
            sel.register(self.control.fileno(), selectors.EVENT_READ, self._on_control_accept)
        self._running = True
        now = self.clock()
        if self._watchdog:
            self._next_watchdog = now
        self._flush_dirty(now)
        self._update_status(force=True)
        if self.notifier:
            self.notifier.ready()
        while self._running:
            ready = sel.select(self._timeout(self.clock()))
            now = self.clock()
            # After a quiet spell, take one packet per descriptor: reading on until EAGAIN
            # costs a system call that, on a cold CPU, is a good part of a ping's latency
            # (level-triggered epoll wakes us again if more is waiting). Under load the
            # wake-ups come back to back and every read takes a whole batch.
            self._batch = BATCH if now - self._last_wake < BUSY_GAP else 1
            self._last_wake = now
            for key, _ in ready:
                key.data(key.fd, now)
            now = self.clock()
            self._run_timers(now)
            self._flush_dirty(now)
            if self._reload_requested:
                self._reload_requested = False
                self._reload_from_file()
        return self._stop_reason or "stopped"

    def request_stop(self, reason: str) -> None:
        """Safe from a signal handler: sets a flag and wakes the loop."""
        self._stop_reason = reason
        self._running = False
        self._wake()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _on_wake(self, fd: int, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _timeout(self, now: float) -> float | None:
        times = []
        heap = self._heap
        while heap and heap[0][2].scheduled != heap[0][0]:
            heapq.heappop(heap)  # stale entry
        if heap:
            times.append(heap[0][0])
        if self._next_watchdog is not None:
            times.append(self._next_watchdog)
        times.append(self._next_tick)
        if not times:
            return 1.0
        return max(0.0, min(times) - now)

    def _schedule(self, peer: Peer) -> None:
        t = peer.next_deadline()
        if t != peer.scheduled:
            peer.scheduled = t
            if t is not None:
                self._seq += 1
                heapq.heappush(self._heap, (t, self._seq, peer))

    def _run_timers(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, peer = heapq.heappop(heap)
            if peer.scheduled != t or self.peers.get(peer.name) is not peer:
                continue
            peer.scheduled = None
            reason = peer.needs_restart(now)
            if reason is not None:
                self._restart_peer(peer, now, reason)
            else:
                s = peer.session
                if s is not None:
                    st = s.get_timer()
                    if st is not None and st <= now:
                        s.handle_timer(now)
                    if peer.keepalive_due(now):
                        self._write(peer, KEEPALIVE_TYPE, b"", now)
            self._dirty.add(peer)
        if self._next_watchdog is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + self._watchdog
        if now >= self._next_tick:
            self._next_tick = now + TICK
            self._check_segment_loss(now)

    def _restart_peer(self, peer: Peer, now: float, reason: str) -> None:
        logger.info("peer %s: starting a new session (%s)", peer.name, reason)
        if peer.config.endpoint is not None and peer.endpoint is None:
            self._set_endpoint(peer, self._resolve(peer.config))
        peer.new_session(now, self.wall_ns(), start=peer.endpoint is not None)

    # -- data path --------------------------------------------------------------------

    def _on_tun(self, fd: int, now: float) -> None:
        lookup = self.router.lookup_destination
        dirty = self._dirty
        if not self.tun.vnet_hdr:
            for packet in self.tun.read_batch(self._batch):
                peer = lookup(packet)
                if peer is None:
                    self.stats.no_route += 1
                    continue
                if self._write(peer, DATA_TYPE, packet, now):
                    c = peer.counters
                    c.tx_packets += 1
                    c.tx_bytes += len(packet)
                dirty.add(peer)
            return
        for buf in self.tun.read_batch(self._batch, MAX_SEGMENT):
            peer = lookup(buf, VNET_HDR_SIZE)
            if peer is None:
                self.stats.no_route += 1
                continue
            if buf[0] == 0 and buf[1] == 0:  # no offload work pending: a plain IP packet
                ok = self._write(peer, DATA_TYPE, buf[VNET_HDR_SIZE:], now)
            elif peer.remote_caps & CAP_VNET:
                ok = self._write(peer, VNET_TYPE, buf, now)
            else:
                peer.counters.drops["offload-unsupported"] += 1
                continue
            if ok:
                c = peer.counters
                c.tx_packets += 1
                c.tx_bytes += len(buf) - VNET_HDR_SIZE
            dirty.add(peer)

    def _write(self, peer: Peer, mtype: int, payload: bytes, now: float) -> bool:
        """Hand one message to the peer's session; True if it goes out now (counted as
        sent), False if dropped or only queued until the session is established."""
        s = peer.session
        if s is None:
            peer.counters.drops["not-established"] += 1
            return False
        try:
            s.write_message(mtype, payload, now)
        except PayloadTooBigError:
            peer.counters.drops["too-big"] += 1
            return False
        except QueueFullError:
            peer.counters.drops["queue-full"] += 1
            return False
        except SessionClosedError:
            peer.counters.drops["not-established"] += 1
            return False
        return s.is_established

    def _on_udp(self, fd: int, now: float) -> None:
        by_addr = self._by_addr
        dirty = self._dirty
        for data, addr in self.udp.recv_batch(self._batch):
            key = (addr[0], addr[1])
            peer = by_addr.get(key)
            if peer is None:
                peer = self._identify(data, now)
                if peer is None:
                    self.stats.unknown_source += 1
                    continue
            s = peer.session
            if s is None:
                continue
            if s.state is SessionState.NEW:  # a peer without endpoint made first contact
                s.start(now)
            s.receive_datagram(data, now)
            if s.last_received == now and (peer.endpoint is None or peer.endpoint[:2] != key):
                if peer.endpoint is not None:
                    self.stats.roamed += 1
                    logger.info(
                        "peer %s: endpoint %s → %s",
                        peer.name,
                        format_endpoint(peer.endpoint),
                        format_endpoint(addr),
                    )
                self._set_endpoint(peer, addr)
            dirty.add(peer)

    def _identify(self, data: bytes, now: float) -> Peer | None:
        """Which peer sent a datagram from an address we do not know (roaming, first
        contact)? Only authenticated evidence counts; the session re-checks everything."""
        if not self._trials.take(now):  # identifying costs a signature check or trials
            return None
        if len(data) == KX_PACKET_SIZE:
            for key, mask in self._fallback_keys:
                try:
                    opened = open_packet(data, [key], mask)
                    msg = next(iter_messages(opened.messages))
                    if msg.type != MessageType.KEY_EXCHANGE:
                        continue
                    kx = KeyExchangeMessage.decode(msg.payload)
                except (SecureioError, StopIteration):
                    continue
                peer = self._by_key.get(kx.identity_key)
                if peer is not None and kx.verify(peer.config.public_key):
                    return peer
            return None
        if len(self.peers) > TRIAL_PEER_LIMIT:
            return None
        for peer in self.peers.values():
            s = peer.session
            if s is not None and s.owns_datagram(data):
                return peer
        return None

    def _flush_dirty(self, now: float) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            for peer in dirty:
                s = peer.session
                if s is None:
                    continue
                s.flush(now)
                self._transmit(peer, now)
                self._drain_events(peer, now)
                self._report_refusals(peer, s, now)
                reason = peer.needs_restart(now) if s.state == SessionState.CLOSED else None
                if reason is not None:
                    self._restart_peer(peer, now, reason)
                    self._dirty.add(peer)
                self._schedule(peer)

    def _report_refusals(self, peer: Peer, s: Any, now: float) -> None:
        """Say in the log why a peer does not come up: its refused key exchanges are only
        counters in the session, and an operator with a wrong key needs to read why."""
        drops = s.stats.drops
        for reason, text in _REFUSALS:
            count = drops[reason]
            seen = peer.reported.get(reason, 0)
            if count > seen and now >= peer.report_after.get(reason, 0.0):
                peer.reported[reason] = count
                peer.report_after[reason] = now + REFUSAL_LOG_INTERVAL
                logger.warning(
                    "peer %s: key exchange refused (%s, %d so far): %s",
                    peer.name,
                    reason,
                    count,
                    text,
                )

    def _transmit(self, peer: Peer, now: float) -> None:
        s = peer.session
        assert s is not None
        for _ in range(4):  # report_too_big may produce replacement datagrams
            out = s.datagrams_to_send()
            if not out:
                return
            endpoint = peer.endpoint
            if endpoint is None:
                peer.counters.drops["no-endpoint"] += len(out)
                return
            for datagram, result in self.udp.send_batch(out, endpoint):
                if result is SendResult.TOO_BIG:
                    s.report_too_big(len(datagram), now)
                else:
                    peer.counters.drops["send-failed"] += 1

    def _drain_events(self, peer: Peer, now: float) -> None:
        s = peer.session
        assert s is not None
        source_owner = self.router.lookup_source
        tun_write = self.tun.write
        tun_write_parts = self.tun.write_parts
        c = peer.counters
        vnet = self.tun.vnet_hdr
        while (ev := s.next_event()) is not None:
            if type(ev) is MessageReceived:
                mtype = ev.type
                payload = ev.payload
                if mtype == DATA_TYPE:
                    if source_owner(payload) is peer:
                        ok = tun_write_parts(ZERO_HDR, payload) if vnet else tun_write(payload)
                        if ok:
                            c.rx_packets += 1
                            c.rx_bytes += len(payload)
                        else:
                            self.stats.tun_write_errors += 1
                    else:
                        c.drops["source-not-allowed"] += 1
                elif mtype == VNET_TYPE:
                    if not vnet or not header_acceptable(payload):
                        c.drops["bad-offload-header"] += 1
                    elif source_owner(payload, VNET_HDR_SIZE) is not peer:
                        c.drops["source-not-allowed"] += 1
                    elif tun_write(payload):
                        c.rx_packets += 1
                        c.rx_bytes += len(payload) - VNET_HDR_SIZE
                    else:
                        self.stats.tun_write_errors += 1
                elif mtype == CAPS_TYPE:
                    caps = decode_caps(payload)
                    if caps is not None and caps != peer.remote_caps:
                        peer.remote_caps = caps
                        logger.info("peer %s: capabilities 0x%x", peer.name, caps)
                        self._update_offload()
                # KEEPALIVE_TYPE and unknown types: liveness only
            elif isinstance(ev, StateChanged):
                logger.info("peer %s: %s → %s", peer.name, ev.old.name, ev.new.name)
                if ev.new == SessionState.ESTABLISHED:
                    peer.last_handshake_wall = time.time()
                    self._send_caps(peer, now)
                self._update_status()
                self._update_offload()
            elif isinstance(ev, PayloadSizeNegotiated):
                self._apply_mtu(peer, ev.size)
            elif isinstance(ev, KeyRotated):
                if not ev.local and s.is_established:
                    peer.last_handshake_wall = time.time()
            elif isinstance(ev, PeerRestarted):
                logger.info("peer %s restarted (new session id)", peer.name)
                peer.remote_caps = 0
                self._send_caps(peer, now)
                self._update_offload()
            elif isinstance(ev, Closed):
                logger.warning("peer %s: session closed: %s", peer.name, ev.reason)
                peer.restart_at = now + peer.timing.restart_backoff
                self._update_status()

    def _send_caps(self, peer: Peer, now: float) -> None:
        peer.caps_sent_at = now
        caps = CAP_VNET if self.tun.vnet_hdr else 0
        if caps and peer.vnet_suspended_until is not None:
            caps |= CAP_LOSSY
        self._write(peer, CAPS_TYPE, encode_caps(caps), now)
        self._dirty.add(peer)

    def _check_segment_loss(self, now: float) -> None:
        """Whole segments travel as chains of fragments, and one lost datagram loses the
        chain: on a lossy path that turns 1 % loss into 30 % and starves TCP. So a receiver
        that sees chains lost tells the sender to stop (caps with CAP_LOSSY), which then
        segments in the kernel like any MTU-sized tunnel; it asks again after a cooldown."""
        if not self.tun.vnet_hdr:
            return
        for peer in self.peers.values():
            s = peer.session
            if s is None or not s.is_established:
                continue
            done, lost = s.fragment_chains
            seen_done, seen_lost = peer.chains_seen
            peer.chains_seen = (done, lost)
            d_done, d_lost = done - seen_done, lost - seen_lost
            if d_done < 0 or d_lost < 0:  # the reassembler was replaced (peer restart)
                continue
            suspended = peer.vnet_suspended_until
            if suspended is None:
                if d_lost >= LOSS_MIN_CHAINS and d_lost > LOSS_RATIO * (d_done + d_lost):
                    peer.vnet_suspended_until = now + peer.vnet_cooldown
                    logger.warning(
                        "peer %s: %d of %d whole-segment chains lost in the last %g s; "
                        "asking for MTU-sized packets for %g s",
                        peer.name,
                        d_lost,
                        d_done + d_lost,
                        TICK,
                        peer.vnet_cooldown,
                    )
                    peer.vnet_cooldown = min(peer.vnet_cooldown * 2, OFFLOAD_MAX_COOLDOWN)
                    self._send_caps(peer, now)
            elif now >= suspended:
                peer.vnet_suspended_until = None
                logger.info("peer %s: offering whole segments again", peer.name)
                self._send_caps(peer, now)
            elif d_done + d_lost:
                # Chains still arrive: our request was lost on this lossy path. Again.
                self._send_caps(peer, now)
                continue
            if now - peer.caps_sent_at >= CAPS_INTERVAL:
                self._send_caps(peer, now)  # a lost announcement must not cost offload

    def _update_offload(self) -> None:
        """TSO on the TUN device only while every established peer takes whole segments:
        the kernel then hands over up to 64 KiB per read. Otherwise it segments itself."""
        if not self.tun.vnet_hdr:
            return
        established = [p for p in self.peers.values() if p.state == SessionState.ESTABLISHED]
        want = (
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
            if established
            and all(p.remote_caps & CAP_VNET and not p.remote_caps & CAP_LOSSY for p in established)
            else 0
        )
        if want != self.tun.offload:
            try:
                self.tun.set_offload(want)
                logger.info("%s: TCP segmentation offload %s", self.ifname, "on" if want else "off")
            except Exception as exc:
                logger.warning("%s: %s", self.ifname, exc)

    # -- MTU --------------------------------------------------------------------------

    def _apply_mtu(self, peer: Peer, size: int) -> None:
        """Route MTU for this peer = its negotiated payload size; the link MTU follows the
        largest (with ``mtu = "auto"``) so every peer gets what its path carries."""
        iface = self.config.interface
        fixed = iface.mtu if isinstance(iface.mtu, int) else None
        mtu = min(size, fixed) if fixed else size
        peer.route_mtu = mtu
        logger.info("peer %s: negotiated payload size %d, route MTU %d", peer.name, size, mtu)
        for net in peer.config.allowed_ips:
            route_mtu = max(mtu, IPV6_MIN_MTU) if net.version == 6 else max(mtu, MIN_MTU)
            try:
                self.netlink.replace_route(net, self.ifname, mtu=route_mtu)
            except Exception as exc:
                logger.warning("peer %s: setting route MTU for %s failed: %s", peer.name, net, exc)
        if fixed is None:
            sizes = [p.route_mtu for p in self.peers.values() if p.route_mtu]
            want = max(sizes) if sizes else IPV6_MIN_MTU
            if any(a.version == 6 for a in iface.address):
                want = max(want, IPV6_MIN_MTU)
            if want != self._interface_mtu:
                try:
                    self.netlink.set_mtu(self.ifname, want)
                    self._interface_mtu = want
                    logger.info("%s: MTU %d", self.ifname, want)
                except Exception as exc:
                    logger.warning("%s: setting MTU %d failed: %s", self.ifname, want, exc)

    # -- status, control, reload ------------------------------------------------------

    def _update_status(self, force: bool = False) -> None:
        up = sum(1 for p in self.peers.values() if p.state == SessionState.ESTABLISHED)
        text = f"{up}/{len(self.peers)} peers established"
        if force or text != self._status_text:
            self._status_text = text
            if self.notifier:
                self.notifier.status(text)

    def status(self) -> dict[str, Any]:
        iface = self.config.interface
        local = self.udp.local_address
        return {
            "interface": self.ifname,
            "public_key": str(self.config.identity.public_key),
            "listen_port": local[1],
            "listen": format_endpoint(local),
            "mtu": self._interface_mtu,
            "mtu_mode": "auto" if not isinstance(iface.mtu, int) else "fixed",
            "addresses": [str(a) for a in iface.address],
            "peers_total": len(self.peers),
            "peers_established": sum(
                1 for p in self.peers.values() if p.state == SessionState.ESTABLISHED
            ),
            "uptime": round(self.clock() - self.started_at, 3),
            "no_route": self.stats.no_route,
            "unknown_source": self.stats.unknown_source,
            "roamed": self.stats.roamed,
            "reloads": self.stats.reloads,
            "udp": {
                "rx_datagrams": self.udp.stats.rx_datagrams,
                "tx_datagrams": self.udp.stats.tx_datagrams,
                "tx_dropped": self.udp.stats.tx_dropped,
                "tx_too_big": self.udp.stats.tx_too_big,
                "tx_errors": self.udp.stats.tx_errors,
            },
        }

    def peers_info(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [p.describe(now) for p in self.peers.values()]

    def _control(self, request: dict[str, Any]) -> Any:
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "peers":
            return self.peers_info()
        if command == "reload":
            return self._reload_from_file()
        raise ControlError(f"unknown command {command!r}")

    def _on_control_accept(self, fd: int, now: float) -> None:
        assert self.control is not None
        for conn_fd in self.control.accept():
            self._selector.register(conn_fd, selectors.EVENT_READ, self._on_control_data)

    def _on_control_data(self, fd: int, now: float) -> None:
        assert self.control is not None
        if not self.control.handle_readable(fd):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)

    config_path: Path | None = None
    load_config: Callable[[Path], Any] | None = None

    def _reload_from_file(self) -> dict[str, Any]:
        """Apply the config diff: added peers start, removed stop, changed restart,
        unchanged keep their sessions. A bad new config is refused; the old one stays."""
        if self.config_path is None or self.load_config is None:
            raise ControlError("reload: the daemon was started without a config file")
        if self.notifier:
            self.notifier.reloading()
        try:
            try:
                new = self.load_config(self.config_path)
            except Exception as exc:
                logger.error("reload refused, keeping the running config: %s", exc)
                raise ControlError(f"reload refused: {exc}") from None
            return self.apply_config(new)
        finally:
            if self.notifier:
                self.notifier.ready()
                self._update_status(force=True)

    def apply_config(self, new: Any) -> dict[str, Any]:
        from .config import diff_config, restart_required

        diff = diff_config(self.config, new)
        blocking = restart_required(diff)
        if blocking:
            msg = "reload refused: changing " + ", ".join(blocking) + " needs a restart"
            logger.error(msg)
            raise ControlError(msg)
        now = self.clock()
        old_iface = self.config.interface
        self.config = new
        for name in diff.removed:
            peer = self.peers.get(name)
            if peer is not None:
                self._remove_peer(peer)
        for name in diff.changed:
            peer = self.peers.get(name)
            if peer is not None:
                self._remove_peer(peer)
        for change in diff.changed.values():
            self._add_peer(change.new, now)
        for pc in diff.added.values():
            self._add_peer(pc, now)
        for name, pc in diff.unchanged.items():  # keep the session, adopt the new object
            peer = self.peers.get(name)
            if peer is not None:
                peer.config = pc
        new_iface = new.interface
        if set(new_iface.address) != set(old_iface.address):
            for a in set(old_iface.address) - set(new_iface.address):
                try:
                    self.netlink.delete_address(self.ifname, a)
                except Exception as exc:
                    logger.warning("removing address %s: %s", a, exc)
            for a in set(new_iface.address) - set(old_iface.address):
                self.netlink.add_address(self.ifname, a)
        if new_iface.mtu != old_iface.mtu and isinstance(new_iface.mtu, int):
            self.netlink.set_mtu(self.ifname, new_iface.mtu)
            self._interface_mtu = new_iface.mtu
        self._rebuild_fallback_keys()
        self.stats.reloads += 1
        result = {
            "added": sorted(diff.added),
            "removed": sorted(diff.removed),
            "changed": sorted(diff.changed),
            "unchanged": sorted(diff.unchanged),
        }
        logger.info("reloaded: %s", result)
        return result

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        now = self.clock()
        for peer in list(self.peers.values()):
            if peer.session is not None:
                peer.session.close(now, "daemon stopping")
        if self.control is not None:
            self.control.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def install_signal_handlers(device: Device) -> None:
    signal.signal(signal.SIGTERM, lambda *_: device.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: device.request_stop("SIGINT"))
    signal.signal(signal.SIGHUP, lambda *_: device.request_reload())
