"""The send path: TUN → allowed IPs → the peer's session → UDP.

A wake-up reads a batch of packets from the TUN device, picks each one's peer by its
destination (longest prefix), and writes it into that peer's session, which aggregates
small packets; the device then flushes every touched session once (``transmit``), so
one datagram carries what one wake-up produced for one peer. The only packet of a
wake-up (a ping on a quiet tunnel) is sealed and sent at once instead, when the session
says that is all the general path would do (``_send_lone``): a wake-up's cost on an idle,
cache-cold CPU grows with the code it touches, and that is most of a ping's latency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..secureio.errors import PayloadTooBigError, SecureioError
from ..secureio.events import SessionState
from ..secureio.session import QueueFullError, SessionClosedError
from ..udp import SendResult
from .allowed_ips import AllowedIPs
from .offload import CAP_VNET, MAX_SEGMENT, VNET_HDR_SIZE, VNET_TYPE
from .peer import DATA_TYPE, Peer
from .ports import Address, TunPort, UdpPort

_ESTABLISHED: Final = SessionState.ESTABLISHED
BATCH: Final = 256
BUSY_GAP: Final = 0.002
"""Wake-ups closer than this count as "under load": read whole batches."""
BACKLOG_WINDOW: Final = 0.05
"""A read that found a queue makes the next read take a whole batch, if it comes within
this many seconds, however far apart the wake-ups were (see ``BatchSize``)."""
MAX_TOO_BIG_ROUNDS: Final = 4
"""``report_too_big`` may produce smaller replacement datagrams; bounded retries."""


class BatchSize:
    """How many packets one read of one descriptor takes. After a quiet spell, one
    packet: reading on until EAGAIN costs a system call that, on a cold CPU, is a good
    part of a ping's latency (level-triggered epoll wakes us again if more is waiting).
    Under load every read takes a whole batch. Each descriptor (TUN, UDP) has its own:
    a ping's reply arrives a fraction of a millisecond after its request left, and with
    one shared size that reply's read counted as "back to back" and paid for an EAGAIN.

    "Under load" is either sign: this descriptor's wake-ups come back to back
    (``BUSY_GAP``), or its previous read found a queue. A batch read that got more than
    one packet found one. A single-packet read that got its packet only may have: it
    counts when the descriptor was ready again on the loop's very next wake-up (level-
    triggered epoll reports a descriptor with data left at once), which ``wake_count``
    (the loop's count of returns from ``epoll_wait``) tells; without it, it always
    counts. This matters when other work on the loop (control requests, a reload) spaces
    the wake-ups out: going by the gap alone, a busy loop would read one packet per
    wake-up, and a queue that builds while the loop is busy would never drain. Lone
    packets with another wake-up in between (a ping's reply, a timer) read one at a
    time; a one-way trickle that is the loop's only work still reads a batch every
    other time (the count cannot tell "woke at once" from "slept, then woke")."""

    __slots__ = ("_wake_count", "backlog", "last_count", "last_wake", "maybe", "size")

    def __init__(self, wake_count: Callable[[], int] | None = None) -> None:
        self.size = 1
        self.last_wake = 0.0
        self.backlog = False
        """The last read surely found a queue (a batch read got more than one packet)."""
        self.maybe = False
        """The last read was a single-packet read that got its packet."""
        self._wake_count = wake_count
        self.last_count = -2

    def on_wake(self, now: float) -> int:
        """Once per wake-up of the descriptor, before its read."""
        gap = now - self.last_wake
        wc = self._wake_count
        count = wc() if wc is not None else 0
        queued = self.backlog or (self.maybe and (wc is None or count == self.last_count + 1))
        self.backlog = self.maybe = False
        self.last_wake = now
        self.last_count = count
        self.size = size = BATCH if gap < BUSY_GAP or (queued and gap < BACKLOG_WINDOW) else 1
        return size

    def note(self, count: int) -> None:
        """After a read of ``on_wake``'s size: it returned ``count`` packets."""
        if count > 1:
            self.backlog = True
        elif count >= self.size:
            self.maybe = True


class SendPath:
    def __init__(
        self,
        tun: TunPort,
        udp: UdpPort,
        router: AllowedIPs[Peer],
        dirty: set[Peer],
        batch: BatchSize,
    ) -> None:
        self.tun = tun
        self.udp = udp
        self.router = router
        self.dirty = dirty
        self.batch = batch
        self.no_route = 0
        self.path_limit: Callable[[Address, int, float], int | None] | None = None
        """(address, refused datagram size, now) -> the largest payload the kernel sends
        there now: set by the lifecycle (``pmtu.PathMtu.kernel_limit``)."""
        self.take_pending: Callable[[], bytes | None] | None = None
        """The packet the C lone-packet hop read from the TUN but left to us (``lone.py``),
        served before reading more."""
        self.on_lone_sent: Callable[[Peer, bytes, int], None] | None = None
        """(peer, buffer, offset of the IP packet) after ``_send_lone`` sent a packet
        itself: the hop learns the destination and arms the peer's lane."""

    def on_tun(self, now: float) -> None:
        lookup = self.router.lookup_destination
        batch = self.batch
        size = batch.on_wake(now)
        take_pending = self.take_pending
        pending = take_pending() if take_pending is not None else None
        if not self.tun.vnet_hdr:
            if pending is None:
                packets = self.tun.read_batch(size)
            else:  # the C hop left it to us: under load, what queued behind it comes too
                packets = [pending] if size == 1 else [pending, *self.tun.read_batch(size - 1)]
            batch.note(len(packets))
            if len(packets) == 1:
                self._send_lone(packets[0], 0, now)
                return
            # each peer's packets go to its session in one call, in the order read (the
            # order between peers is not kept anyway: each session is flushed on its own);
            # a run per change of peer cost more than one call per packet on a hub
            runs: dict[Peer, list[bytes]] = {}
            run: list[bytes] = []
            run_peer: Peer | None = None
            for packet in packets:
                peer = lookup(packet)
                if peer is None:
                    self.no_route += 1
                    continue
                if peer is not run_peer:
                    run = runs.get(peer)  # type: ignore[assignment]
                    if run is None:
                        run = runs[peer] = []
                    run_peer = peer
                run.append(packet)
            write_run = self.write_run
            for peer, run in runs.items():
                write_run(peer, DATA_TYPE, run, 0, 0, now)
            return
        if pending is None:
            bufs = self.tun.read_batch(size, MAX_SEGMENT)
        elif size == 1:
            bufs = [pending]
        else:
            bufs = [pending, *self.tun.read_batch(size - 1, MAX_SEGMENT)]
        batch.note(len(bufs))
        if len(bufs) == 1:
            buf = bufs[0]
            if len(buf) > VNET_HDR_SIZE and buf[0] == 0 and buf[1] == 0:
                self._send_lone(buf, VNET_HDR_SIZE, now)
                return
        # each peer's packets in runs of one kind (plain, or with offload work: sent with
        # the header), one call per run; a peer's runs go in the order read
        runs: dict[Peer, tuple[int, list[bytes]]] = {}
        for buf in bufs:
            peer = lookup(buf, VNET_HDR_SIZE)
            if peer is None:
                self.no_route += 1
                continue
            if buf[0] == 0 and buf[1] == 0:  # no offload work pending: a plain IP packet
                mtype = DATA_TYPE
            elif peer.offload.remote_caps & CAP_VNET:  # with its header, for the peer's TUN
                mtype = VNET_TYPE
            else:
                peer.counters.drops["offload-unsupported"] += 1
                continue
            current = runs.get(peer)
            if current is not None and current[0] == mtype:
                current[1].append(buf)
                continue
            if current is not None:  # in order: what came before this packet goes first
                self._write_vnet_run(peer, *current, now)
            runs[peer] = (mtype, [buf])
        for peer, (mtype, run) in runs.items():
            self._write_vnet_run(peer, mtype, run, now)

    def _write_vnet_run(self, peer: Peer, mtype: int, bufs: list[bytes], now: float) -> None:
        """A run of virtio-net buffers: plain IP packets without their header, the others
        with it; neither counts the header's bytes."""
        offset = VNET_HDR_SIZE if mtype == DATA_TYPE else 0
        self.write_run(peer, mtype, bufs, offset, VNET_HDR_SIZE, now)

    def write_run(
        self, peer: Peer, mtype: int, packets: list[bytes], offset: int, header: int, now: float
    ) -> None:
        """``write(peer, mtype, p[offset:], now)`` for every packet, in one session call
        (``Session.write_messages``: a flood of small packets paid three Python calls per
        packet), with the same counters, drops and refusals. ``header``: the bytes of each
        packet that are not counted (a virtio-net header, whether sent or not)."""
        self.dirty.add(peer)
        s = peer.session
        if s is None:
            peer.counters.drops["not-established"] += len(packets)
            return
        refused = s.write_messages(mtype, packets, now, offset)
        for _, exc in refused:
            self._refused(peer, exc)
        if s.state is _ESTABLISHED:  # otherwise only queued: sent (and counted) later
            size = sum(map(len, packets)) - header * len(packets)
            if refused:
                size -= sum(len(packets[i]) - header for i, _ in refused)
            c = peer.counters
            c.tx_packets += len(packets) - len(refused)
            c.tx_bytes += size

    def _send_lone(self, buf: bytes, offset: int, now: float) -> None:
        """The only packet of this wake-up, a plain IP packet at ``offset`` of ``buf``
        (after a virtio-net header with no offload work). When the session can seal it at
        once (``seal_message_now``: nothing else pending, the same datagram the batch path
        would make) it goes out now, and the peer stays out of the wake-up's flush:
        nothing else of it is due and only its keepalive moved, later. Otherwise it takes
        the general path."""
        peer = self.router.lookup_destination(buf, offset)
        if peer is None:
            self.no_route += 1
            return
        payload = buf[offset:] if offset else buf
        s = peer.session
        sealed = (
            s.seal_message_now(DATA_TYPE, payload, now)
            if s is not None and peer.timer is not None and peer not in self.dirty
            else None
        )
        if sealed is None:
            if self.write(peer, DATA_TYPE, payload, now):
                c = peer.counters
                c.tx_packets += 1
                c.tx_bytes += len(payload)
            self.dirty.add(peer)
            return
        c = peer.counters
        c.tx_packets += 1
        c.tx_bytes += len(payload)
        datagram, addr = sealed
        failures = self.udp.send_batch((datagram,), addr)
        if failures:
            self.not_sent(peer, failures, addr, now)
            self.dirty.add(peer)  # a too-big datagram left the session work to send
        elif self.on_lone_sent is not None:
            self.on_lone_sent(peer, buf, offset)

    def write(self, peer: Peer, mtype: int, payload: bytes | memoryview, now: float) -> bool:
        """Hand one message to the peer's session; True if it goes out now (counted as
        sent), False if dropped or only queued until the session is established. Whatever
        the session refuses is a counted drop, never an exception: one odd packet from the
        TUN must not end the wake-up that carries the others."""
        s = peer.session
        if s is None:
            peer.counters.drops["not-established"] += 1
            return False
        try:
            s.write_message(mtype, payload, now)
        except (SecureioError, ValueError) as exc:
            self._refused(peer, exc)
            return False
        self.dirty.add(peer)
        return s.state is _ESTABLISHED

    @staticmethod
    def _refused(peer: Peer, exc: SecureioError | ValueError) -> None:
        """Count what ``write_message`` refused, by why."""
        if isinstance(exc, PayloadTooBigError):
            reason = "too-big"
        elif isinstance(exc, QueueFullError):
            reason = "queue-full"
        elif isinstance(exc, SessionClosedError):
            reason = "not-established"
        else:
            reason = "refused-by-session"
        peer.counters.drops[reason] += 1

    def transmit(self, peer: Peer, now: float) -> None:
        """Send what the session has for the wire, to the address the session names.

        A fragmented message comes as one run already in the GSO layout and goes out
        with ``send_run`` (no join); runs of lone datagrams go together to ``send_batch``,
        which groups equal sizes. With ``SECUREIOD_NO_TX_BATCH=1`` (or
        ``SECUREIOD_NO_BATCH=1``) the session seals fragments one by one, so every run is
        a lone datagram and all of them take ``send_batch``, as before batch sealing."""
        s = peer.session
        if s is None:
            return
        udp = self.udp
        for _ in range(MAX_TOO_BIG_ROUNDS):
            runs = s.datagram_runs_to_send(now)
            if not runs:
                return
            lone: list[bytes] = []
            lone_addr = runs[0].address
            for run in runs:
                if lone and (run.count > 1 or run.address != lone_addr):
                    self.not_sent(peer, udp.send_batch(lone, lone_addr), lone_addr, now)
                    lone = []
                if run.count == 1:
                    lone.append(run.buffer)
                    lone_addr = run.address
                else:
                    failures = udp.send_run(run.buffer, run.segment_size, run.address)
                    self.not_sent(peer, failures, run.address, now)
            if lone:
                self.not_sent(peer, udp.send_batch(lone, lone_addr), lone_addr, now)

    def not_sent(
        self, peer: Peer, failures: list[tuple[bytes, SendResult]], addr: Address, now: float
    ) -> None:
        """Datagrams the socket did not send: a too-big one goes back to the session
        (it shrinks its size and sends the messages again), the rest are counted."""
        s = peer.session
        for datagram, result in failures:
            if result is SendResult.TOO_BIG and s is not None:
                size = len(datagram)
                path_limit = self.path_limit
                limit = path_limit(addr, size, now) if path_limit is not None else None
                s.report_too_big(size, now, datagram=datagram, path_limit=limit)
            else:
                peer.counters.drops["send-failed"] += 1
