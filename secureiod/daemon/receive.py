"""The receive path: UDP → demultiplexer → the peer's session → checks → TUN.

The secureio core decides everything about a datagram (which session owns it, whether it
is authentic, whether its address may become the peer's endpoint); this module only
moves what the core accepted on to the TUN device, after two checks of its own on each
inner packet: its IP header must agree with its length (``inner``), and its source must
route back to the peer that sent it (cryptokey routing: the inner-source check).
The only datagram of a wake-up, when all it brought is one message, is delivered at once
through the same checks (``_receive_lone``) instead of waiting for the wake-up's flush.
After every ``YIELD_BUDGET`` packets written, at the end of the read that reached it, the
daemon gives up the CPU, so that the local receivers it woke can drain their sockets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from ..secureio.demux import Demultiplexer
from ..secureio.events import Event, MessageReceived
from ..secureio.rxbatch import RXBATCH
from .allowed_ips import AllowedIPs
from .inner import inner_packet_problem
from .offload import CAPS_TYPE, VNET_HDR_SIZE, VNET_TYPE, ZERO_HDR, header_acceptable
from .peer import DATA_TYPE, Peer
from .ports import Address, TunPort, UdpPort
from .send import BatchSize

_DATA: Final = DATA_TYPE
YIELD_BUDGET: Final = 64
"""Packets written to the TUN device after which the receive path gives up the CPU, at the
end of the read that reached the count (``_delivered``; one read, a GRO run of packed
small packets, can write a few hundred). Why: each write wakes a local receiver, and a
single-threaded daemon that keeps its core keeps that receiver waiting while its socket
buffer (212 KiB by default: about 256 small datagrams) overflows, and the work on those
packets is lost. The kernel's receive path has the same problem and bounds its softirq
work for the same reason (NAPI's budgets), an analogy rather than a copy. Measured (issue
13, UDP 64 B flood on two cores): 92,500 instead of 69,600 datagrams delivered per second,
the share lost at the receiver's socket from about a third to about a seventh; TCP (an
offload super-packet of up to 64 KiB counts as one packet) and ping (the lone path, which
does not count) unchanged."""


def _load_yield() -> Callable[[], None] | None:
    """``sched_yield`` that keeps the GIL (``_fastpath.yield_cpu``). Not ``os.sched_yield``:
    that releases the GIL, and a Python thread waiting for it (a metrics scrape) would take
    the interpreter for a switch interval at every yield. Without the C build: no yield."""
    if os.environ.get("SECUREIOD_PURE_PYTHON"):
        return None
    try:
        from ._fastpath import yield_cpu  # type: ignore[import-not-found]
    except ImportError:
        return None
    return yield_cpu  # type: ignore[no-any-return]


class ReceivePath:
    def __init__(
        self,
        tun: TunPort,
        udp: UdpPort,
        demux: Demultiplexer[Peer],
        router: AllowedIPs[Peer],
        dirty: set[Peer],
        batch: BatchSize,
        on_caps: Callable[[Peer, bytes], None],
        on_event: Callable[[Peer, Event, float], None],
        yield_cpu: Callable[[], None] | None = None,
    ) -> None:
        self.tun = tun
        self.udp = udp
        self.demux = demux
        self.router = router
        self.dirty = dirty
        self.batch = batch
        self.on_caps = on_caps
        self.on_event = on_event
        self.tun_write_errors = 0
        self.yield_cpu = yield_cpu if yield_cpu is not None else _load_yield()
        """Gives up the CPU with the GIL held (see ``YIELD_BUDGET``); None: never."""
        self.unyielded = 0
        """Packets ``_delivered`` wrote to the TUN since the last ``yield_cpu``. Kept across
        wake-ups: under load they come back to back, each with fewer than the budget."""
        self.yields = 0
        """``yield_cpu`` calls (the metric ``secureiod_receive_yields_total``)."""
        self.take_pending: Callable[[], tuple[bytes, int, Address] | None] | None = None
        """The datagram the C lone-packet hop read but left to us (``lone.py``): (data,
        segment size, source), served before reading more."""
        self.on_lone_received: Callable[[Peer, bytes], None] | None = None
        """(peer, IP packet) after ``_receive_lone`` delivered a packet itself: the hop
        may learn its source."""
        self._recv_runs = udp.recv_runs if RXBATCH is not None else None
        """Reads as runs (one per GRO read, opened in one C call: ``secureio/rxbatch.py``);
        ``None`` (no extension, ``SECUREIOD_NO_BATCH=1``): datagram by datagram."""

    def on_udp(self, now: float) -> None:
        """Read what the socket holds and deliver it read by read: the packets of one read
        (a GRO run or a datagram) go to the TUN device before the next read is opened
        (``_delivered``), not after all of the wake-up's reads (up to ``BATCH`` of them,
        a GRO run of up to 64 datagrams each). The first packets then wait for their own
        read only, and a receiver that drains its socket while we write gets them spread
        over the wake-up instead of in one burst that overflows its buffer. Measured
        (issue 13, iperf3 UDP 64 B flood, five alternations with the old build): 68,800
        instead of 58,000 datagrams delivered per second; TCP and ping unchanged."""
        receive = self.demux.receive_datagram
        dirty = self.dirty
        batch = self.batch
        size = batch.on_wake(now)
        count = 0
        failed: Exception | None = None
        if self.take_pending is not None and (pending := self.take_pending()) is not None:
            data, segment, addr = pending
            if size == 1:  # a lone datagram the C hop left to us
                if segment >= len(data):
                    batch.note(1)
                    self._receive_lone(data, addr, now)
                else:
                    batch.note(-(-len(data) // segment))
                    dirty.update(self.demux.receive_run(data, segment, addr, now))
                return
            # under load it goes first, then what queued behind it, in this wake-up
            if segment >= len(data):
                count = 1
                failed = self._delivered(receive(data, addr, now), now, failed)
            else:
                count = -(-len(data) // segment)
                for peer in self.demux.receive_run(data, segment, addr, now):
                    failed = self._delivered(peer, now, failed)
        if self._recv_runs is not None:
            runs = self._recv_runs(size)
            if not count and len(runs) == 1 and runs[0][1] >= len(runs[0][0]):
                batch.note(1)
                data, _, addr = runs[0]
                self._receive_lone(data, addr, now)
                return
            receive_run = self.demux.receive_run
            delivered = self._delivered
            for data, segment, addr in runs:
                if segment >= len(data):
                    count += 1
                    failed = delivered(receive(data, addr, now), now, failed)
                else:
                    count += -(-len(data) // segment)
                    for peer in receive_run(data, segment, addr, now):
                        failed = delivered(peer, now, failed)
            batch.note(count)
        else:
            datagrams = self.udp.recv_batch(size)
            batch.note(count + len(datagrams))
            if not count and len(datagrams) == 1:
                self._receive_lone(*datagrams[0], now)
                return
            for data, addr in datagrams:
                failed = self._delivered(receive(data, addr, now), now, failed)
        if failed is not None:
            raise failed  # the loop logs it; every read before and after it was taken

    def _delivered(
        self, peer: Peer | None, now: float, failed: Exception | None
    ) -> Exception | None:
        """A read fed ``peer``: mark it for ``Device.after_wakeup`` (flush, send, timers)
        and deliver what it accepted now, then yield the CPU if the writes since the last
        yield reached ``YIELD_BUDGET``. A handler that fails does not cost the reads after this
        one: the first failure is returned, raised once they are all taken."""
        if peer is None:
            return failed
        self.dirty.add(peer)
        c = peer.counters
        before = c.rx_packets
        try:
            self.drain(peer, now)
        except Exception as exc:
            failed = failed or exc
        self.unyielded += c.rx_packets - before
        if self.unyielded >= YIELD_BUDGET and self.yield_cpu is not None:
            self.unyielded = 0
            self.yields += 1
            self.yield_cpu()
        return failed

    def _receive_lone(self, data: bytes, addr: Address, now: float) -> None:
        """The only datagram of this wake-up. When all it did was bring one message (the
        session says so: ``take_lone_message``), deliver that at once, through ``drain``
        with its checks, and leave the peer out of the wake-up's flush: nothing of it is
        due, and its deadlines only moved later (a lazy timer fires early and re-arms).
        Anything else marks the peer for ``Device.after_wakeup`` as any datagram does."""
        peer = self.demux.receive_datagram(data, addr, now)
        if peer is None:
            return
        s = peer.session
        if (
            s is not None
            and peer not in self.dirty
            and peer.timer_at is not None
            # the one deadline a fresh datagram can set is the dead-peer check's (its first)
            and peer.timer_at <= now + peer.timing.dead_after
            and (ev := s.take_lone_message()) is not None
        ):
            self.drain(peer, now, ev)
            if self.on_lone_received is not None and ev.type == _DATA:
                self.on_lone_received(peer, ev.payload)
            return
        self.dirty.add(peer)

    def drain(self, peer: Peer, now: float, first: Event | None = None) -> None:
        """Deliver what the peer's session accepted: packets to the TUN device, everything
        else (state, path, sizes, capabilities) to its owner. ``first``: an event already
        taken off the session's queue (``take_lone_message``), delivered before the rest.

        Packets that pass the checks are written in runs (``_write_run``: one
        ``write_many`` call, not a Python call and a system call wrapper per packet); a run
        ends where the kind of packet changes (plain, or with its own offload header) or
        another event comes between, so packets and events keep their order."""
        s = peer.session
        if s is None:
            return
        events: list[Event] = [first] if first is not None else s.take_events()
        if not events:  # a wake-up that only sent: nothing to set up for
            return
        source_owner = self.router.lookup_source
        vnet = self.tun.vnet_hdr
        drops = peer.counters.drops
        run: list[bytes] = []
        offloaded = False  # the run holds VNET_TYPE payloads (with their own header)
        write_run = self._write_run
        while events:
            done = 0
            try:
                for ev in events:
                    # ``done`` counts an event once it is taken: a handler's event after
                    # the run before it is written (a dead TUN raises there and the event
                    # stays queued), a packet when it joins the run
                    if type(ev) is not MessageReceived:
                        if run:
                            write_run(peer, run, offloaded)
                        done += 1
                        self.on_event(peer, ev, now)
                        continue
                    mtype = ev.type
                    payload = ev.payload
                    if mtype == CAPS_TYPE:
                        if run:
                            write_run(peer, run, offloaded)
                        done += 1
                        self.on_caps(peer, payload)
                        continue
                    done += 1
                    if mtype == _DATA:
                        problem = inner_packet_problem(payload)
                        if problem is not None:
                            drops[problem] += 1
                        elif source_owner(payload) is not peer:
                            drops["source-not-allowed"] += 1
                        else:
                            if offloaded and run:
                                write_run(peer, run, True)
                            offloaded = False
                            run.append(payload)
                    elif mtype == VNET_TYPE:
                        if not vnet or not header_acceptable(payload):
                            drops["bad-offload-header"] += 1
                        elif (problem := inner_packet_problem(payload, VNET_HDR_SIZE)) is not None:
                            drops[problem] += 1
                        elif source_owner(payload, VNET_HDR_SIZE) is not peer:
                            drops["source-not-allowed"] += 1
                        else:
                            if not offloaded and run:
                                write_run(peer, run, False)
                            offloaded = True
                            run.append(payload)
                    # KEEPALIVE_TYPE and unknown types: liveness only
                if run:
                    write_run(peer, run, offloaded)
            except BaseException:
                # a handler failed (the loop logs it): the events after it stay queued
                # for the next drain instead of being lost with this list
                s.put_back_events(events[done:])
                raise
            # what the handlers caused meanwhile (a state change's follow-ups), in order
            events = s.take_events()

    def _write_run(self, peer: Peer, run: list[bytes], offloaded: bool) -> None:
        """Write ``run`` to the TUN in one call and empty it, counting what the kernel took
        for ``peer``. ``offloaded``: VNET_TYPE payloads, which carry their own virtio-net
        header (not counted in bytes); otherwise plain packets, behind a zero header when
        the device has ``vnet_hdr``."""
        tun = self.tun
        try:
            refused = tun.write_many(b"" if offloaded or not tun.vnet_hdr else ZERO_HDR, run)
            strip = VNET_HDR_SIZE if offloaded else 0
            size = sum(map(len, run)) - strip * len(run)
            if refused:
                size -= sum(len(run[i]) - strip for i in refused)
                self.tun_write_errors += len(refused)
            c = peer.counters
            c.rx_packets += len(run) - len(refused)
            c.rx_bytes += size
        finally:
            run.clear()
