"""The C lone-packet hop: a quiet tunnel's packet handled by C between two waits.

Why: on a tunnel that carries a ping every 20 ms the process sleeps between packets, and
the box's caches forget it meanwhile. Measured (issue 13, perf_counter_ns probes): the
wake-up that reads a ping from the TUN and sends it took 275 us, of which ~90 us were the
read and ``sendto`` system calls; the rest was Python running cold, 4-40x slower than warm;
the receiving side's wake-up was the same. So the only packet of a quiet moment is handled
by C inside the event loop's wait (``_fastpath.c``: ``FastPath.wait`` stands in for
``epoll.poll``): read from the TUN, sealed and sent (the send half), or read from the
socket, opened, checked and written to the TUN (the receive half), without returning to
Python. A ping's round trip through a daemon is one wait: the request delivered, the reply
sent, then Python settles both.

The rules stay the session's. Each peer has a *lane* that the session arms, one packet at
a time: ``Session.reserve_message`` lends one PacketID with the key, size limit and
endpoint that ``seal_message_now`` would use; ``Session.reserve_receive`` lends the
receipt of one datagram (from the endpoint, under a current key, a PacketID above every one
seen, one whole data message). The hop sends only to, and accepts inner packets only from,
an address the allowed IPs gave that peer (a cache of exact addresses the Python path
looked up, emptied whenever the allowed IPs change); it checks inner headers as
``inner.py`` does and sends only plain IP packets (no offload work). Anything else it reads
it hands back to ``SendPath.on_tun`` or ``ReceivePath.on_udp`` untouched. Right after each
wait the lanes the hop used are settled into their sessions, the peers' counters and the
adapters' statistics (``after_wait``), so every Python reader sees them as if Python had
done the work; a session that does anything else first takes back what it lent
(``reservation.py``), so a PacketID never goes out twice and the replay window never misses
a packet.

A lane is armed at the end of a quiet wake-up (no read found a queue: ``send.BatchSize``)
for a peer that sent or received a lone packet, or whose lane was used or settled, since
the last arming. Under load nothing is armed: batches are the Python path's business, and
the hop costs three cheap C calls per wake-up.

``SECUREIOD_NO_LONE_HOP=1`` (or ``SECUREIOD_PURE_PYTHON=1``, or no C build) leaves the loop
on ``epoll.poll``; the Python lone paths (``SendPath._send_lone``,
``ReceivePath._receive_lone``) are the same rules.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

from ..endpoint import Address, pack_sockaddr
from ..logs import RateLimitedLog
from ..secureio.reservation import ReceiveUse, ReservationUse
from ..secureio.session import Session
from ..tun import TunDevice
from ..udp import UdpSocket
from .allowed_ips import AllowedIPs
from .offload import VNET_HDR_SIZE
from .peer import DATA_TYPE, Peer
from .receive import ReceivePath
from .send import SendPath

logger = logging.getLogger(__name__)

_USED_UNKNOWN: Final = ReservationUse(0.0, 0, 0)
"""Settles a lane whose use cannot be told: counted as sent, so its PacketID is never reused."""


def load_fastpath() -> Any | None:
    """The C module, or None without a build or when switched off by the environment."""
    if os.environ.get("SECUREIOD_NO_LONE_HOP") or os.environ.get("SECUREIOD_PURE_PYTHON"):
        return None
    try:
        from . import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _fastpath


class _LaneState:
    """One peer's lane and what the daemon knows about it."""

    __slots__ = (
        "endpoint",
        "lane",
        "peer",
        "rx_armed",
        "session",
        "sockaddr",
        "sockaddr_for",
        "tx_armed",
    )

    def __init__(self, lane: Any, peer: Peer) -> None:
        self.lane = lane
        self.peer = peer
        self.tx_armed = False
        """``lane.arm`` succeeded and that reservation is not settled yet."""
        self.rx_armed = False
        """``arm_receive`` succeeded and that reservation is not settled yet."""
        self.session: Session | None = None
        """The session that lent what the lane holds."""
        self.endpoint: Address | None = None
        self.sockaddr_for: Address | None = None
        self.sockaddr = b""


class LoneHop:
    """Arms, settles and feeds the C hop of one device (see the module docstring)."""

    def __init__(
        self,
        module: Any,
        loop_fd: int,
        tun: TunDevice,
        udp: UdpSocket,
        send: SendPath,
        receive: ReceivePath,
        router: AllowedIPs[Peer],
    ) -> None:
        fast = module.FastPath(loop_fd, tun.fileno(), bool(tun.vnet_hdr), udp.fileno())
        self.fast = fast
        self._lane_type = module.Lane
        self.tun = tun
        self.udp = udp
        self.send = send
        self.receive = receive
        self.router = router
        self._family = udp.family
        self._lanes: dict[Peer, _LaneState] = {}
        self._by_lane: dict[Any, _LaneState] = {}
        self._rearm: set[Peer] = set()
        self._armed: set[_LaneState] = set()
        """Lanes with either half armed: what a pause takes back."""
        self._handed_back = 0
        """The hop's hand-backs (both halves) seen so far."""
        self._rx_max = int(module.RX_MAX)
        self._failures: list[tuple[_LaneState, bytes, int]] = []
        self._generation = router.generation
        self._batches = (send.batch, receive.batch)
        self._arm_log = RateLimitedLog(logger, interval=60.0, max_keys=8, max_lines=4)
        send.take_pending = fast.take_pending
        send.on_lone_sent = self.on_lone_sent
        receive.take_pending = fast.take_pending_datagram
        receive.on_lone_received = self.on_lone_received

    def attach(self, loop: Any) -> None:
        loop.use_waiter(self.fast.wait, self.after_wait)

    # -- the loop's hooks ----------------------------------------------------------------

    def after_wait(self, now: float) -> None:
        """Right after each wait: count what the hop read, settle the lanes it used, and
        let the send path deal with a datagram the socket refused."""
        fast = self.fast
        packets, nbytes = fast.take_tun_reads()
        if packets:
            stats = self.tun.stats
            stats.packets_read += packets
            stats.bytes_read += nbytes
        datagrams, nbytes = fast.take_udp_reads()
        if datagrams:
            self.udp.note_received(datagrams, nbytes)
        handed_back = fast.handed_back + fast.receive_handed_back
        if handed_back != self._handed_back:
            # The hop read what it could not take: traffic that is not a lone packet (a
            # burst, a peer without a lane, junk). Each such read costs a wake-up, so the
            # hop pauses: armed lanes go back until a quiet wake-up arms them again.
            self._handed_back = handed_back
            for state in list(self._armed):
                if state.session is not None:
                    state.session.settle_reservation()
        used = fast.take_used()
        if not used:
            return
        by_lane = self._by_lane
        for lane in used:
            state = by_lane.get(lane)
            if state is not None and state.session is not None:
                state.session.settle_reservation()
        if self._failures:
            failures, self._failures = self._failures, []
            for state, datagram, code in failures:
                result = self.udp.note_send_error(code)
                peer = state.peer
                if state.endpoint is not None:
                    self.send.not_sent(peer, [(datagram, result)], state.endpoint, now)
                self.send.dirty.add(peer)  # a too-big datagram left the session work to send

    def routes_changed(self) -> None:
        """After every wake-up, before the hop can run again (``Device.after_wakeup``): if
        the allowed IPs changed, forget every cached address and the lanes of peers gone."""
        router = self.router
        if router.generation != self._generation:
            self._generation = router.generation
            self.fast.clear_routes()
            present = set(router.entries().values())
            for peer in [p for p in self._lanes if p not in present]:
                self._forget(peer)

    def rearm(self, now: float) -> None:
        """At the end of a wake-up with nothing left to do (``Device.after_wakeup``): arm
        the lanes of this wake-up's lone peers when it was quiet."""
        # under load the candidates wait (at most one entry per peer) for a quiet wake-up:
        # arming then would only be taken back by the next, back-to-back one
        if not self._rearm:
            return
        tun_batch, udp_batch = self._batches
        if tun_batch.backlog or udp_batch.backlog:
            return
        peers, self._rearm = self._rearm, set()
        for peer in peers:
            self._arm(peer, now)

    def on_lone_sent(self, peer: Peer, buf: bytes, offset: int) -> None:
        """``SendPath._send_lone`` sent ``buf[offset:]`` through ``peer`` (its destination
        routes there): the next packet to that destination may take the hop."""
        version = buf[offset] >> 4
        if version == 4:
            destination = buf[offset + 16 : offset + 20]
        elif version == 6:
            destination = buf[offset + 24 : offset + 40]
        else:
            return
        self._learn(peer, bytes(destination))

    def on_lone_received(self, peer: Peer, packet: bytes) -> None:
        """``ReceivePath._receive_lone`` took a packet from ``peer``: when its source routes
        back to that peer, the hop may check the next one from there itself."""
        if len(packet) < 20 or self.router.lookup_source(packet) is not peer:
            return
        source = packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]
        self._learn(peer, bytes(source))

    # -- lanes -----------------------------------------------------------------------------

    def _learn(self, peer: Peer, address: bytes) -> None:
        """``address`` routes to ``peer`` now (the router just said so): cache it for the
        hop. (A peer that leaves the router takes its lane along: ``routes_changed``.)"""
        state = self._lanes.get(peer)
        if state is None:
            state = _LaneState(self._lane_type(), peer)
            self._lanes[peer] = state
            self._by_lane[state.lane] = state
        self.fast.route(address, state.lane)
        self._rearm.add(peer)

    def _arm(self, peer: Peer, now: float) -> None:
        state = self._lanes.get(peer)
        s = peer.session
        # no timer: nothing would notice what the hop did (``SendPath._send_lone`` asks too)
        if state is None or s is None or peer.timer is None:
            return
        if state.session is not None and state.session is not s:
            state.session.settle_reservation()  # a replaced session's lane
        try:
            if not state.tx_armed:
                self._arm_send(state, s)
            if not state.rx_armed:
                self._arm_receive(state, s)
        except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
            self._arm_log.log(
                now,
                type(exc).__name__,
                logging.WARNING,
                "lone hop: cannot arm %s: %s",
                peer.name,
                exc,
            )
            s.settle_reservation()  # what did not arm goes back

    def _sockaddr(self, state: _LaneState, endpoint: Address) -> bytes:
        if state.sockaddr_for != endpoint:
            state.sockaddr = pack_sockaddr(endpoint, self._family)
            state.sockaddr_for = endpoint
        return state.sockaddr

    def _arm_send(self, state: _LaneState, s: Session) -> None:
        r = s.reserve_message(DATA_TYPE, lambda: self._settle_send(state))
        if r is None:
            return
        state.session = s
        state.endpoint = r.endpoint
        key = r.key
        sockaddr = self._sockaddr(state, r.endpoint)
        state.lane.arm(
            key.stream_key,
            key.mac_seed,
            r.packet_id,
            r.packet_id_mask,
            r.message_type,
            r.flags,
            r.max_payload,
            sockaddr,
        )
        state.tx_armed = True
        self._armed.add(state)

    def _arm_receive(self, state: _LaneState, s: Session) -> None:
        if self.fast.rx_count >= self._rx_max:
            return  # the C table is full (many quiet peers at once): this one's wait
        r = s.reserve_receive(DATA_TYPE, lambda: self._settle_receive(state))
        if r is None:
            return
        state.session = s
        sockaddr = self._sockaddr(state, r.endpoint)
        self.fast.arm_receive(
            state.lane, r.keys, r.packet_id_mask, r.latest, r.message_type, r.flags, sockaddr
        )
        state.rx_armed = True
        self._armed.add(state)

    def _settle_send(self, state: _LaneState) -> ReservationUse | None:
        """The session takes its PacketID back (``reservation.Settle``)."""
        if not state.rx_armed:
            state.session = None
            self._armed.discard(state)
        armed, state.tx_armed = state.tx_armed, False
        if not armed:
            return None
        self._rearm.add(state.peer)
        lane = state.lane
        if lane.disarm():
            return None
        result = lane.take_result()
        if result is None:
            return _USED_UNKNOWN
        _pid, sent_at, datagram_size, payload_size, code, failed = result
        c = state.peer.counters
        c.tx_packets += 1
        c.tx_bytes += payload_size
        if code == 0:
            self.udp.note_sent(datagram_size)
        elif failed is not None:
            self._failures.append((state, failed, code))
        return ReservationUse(sent_at, datagram_size, payload_size)

    def _settle_receive(self, state: _LaneState) -> ReceiveUse | None:
        """The session takes its receipt back (``reservation.SettleReceive``)."""
        if not state.tx_armed:
            state.session = None
            self._armed.discard(state)
        armed, state.rx_armed = state.rx_armed, False
        if not armed:
            return None
        self._rearm.add(state.peer)
        if self.fast.disarm_receive(state.lane):
            return None
        result = state.lane.take_receive_result()
        if result is None:
            return None
        packet_id, received_at, datagram_size, payload_size, tun_errno = result
        if tun_errno == 0:
            c = state.peer.counters
            c.rx_packets += 1
            c.rx_bytes += payload_size
            self.tun.note_written(payload_size + (VNET_HDR_SIZE if self.tun.vnet_hdr else 0))
        else:
            self.receive.tun_write_errors += 1
            self.tun.note_write_error(tun_errno)
        return ReceiveUse(packet_id, received_at, datagram_size)

    def _forget(self, peer: Peer) -> None:
        state = self._lanes.pop(peer)
        self._by_lane.pop(state.lane, None)
        self._armed.discard(state)
        if state.session is not None:
            state.session.settle_reservation()
        state.lane.disarm()
        self.fast.disarm_receive(state.lane)
        self._rearm.discard(peer)

    def status(self) -> dict[str, int]:
        fast = self.fast
        return {
            "sends": int(fast.sends),
            "send_failures": int(fast.send_failures),
            "handed_back": int(fast.handed_back),
            "receives": int(fast.receives),
            "receive_handed_back": int(fast.receive_handed_back),
            "spins": int(fast.spins),
            "spin_answers": int(fast.spin_answers),
            "spin_us": int(fast.spin_ns) // 1000,
            "lanes": len(self._lanes),
        }
