"""The receive path: UDP → demultiplexer → the peer's session → checks → TUN.

The secureio core decides everything about a datagram (which session owns it, whether it
is authentic, whether its address may become the peer's endpoint); this module only
moves what the core accepted on to the TUN device, after two checks of its own on each
inner packet: its IP header must agree with its length (``inner``), and its source must
route back to the peer that sent it (cryptokey routing: the inner-source check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..secureio.demux import Demultiplexer
from ..secureio.events import Event, MessageReceived
from ..secureio.rxbatch import RXBATCH
from .allowed_ips import AllowedIPs
from .inner import inner_packet_problem
from .offload import CAPS_TYPE, VNET_HDR_SIZE, VNET_TYPE, ZERO_HDR, header_acceptable
from .peer import DATA_TYPE, Peer
from .ports import TunPort, UdpPort
from .send import BatchSize

_DATA: Final = DATA_TYPE


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
        self._recv_runs = udp.recv_runs if RXBATCH is not None else None
        """Reads as runs (one per GRO read, opened in one C call: ``secureio/rxbatch.py``);
        ``None`` (no extension, ``SECUREIOD_NO_BATCH=1``): datagram by datagram."""

    def on_udp(self, now: float) -> None:
        receive = self.demux.receive_datagram
        dirty = self.dirty
        batch = self.batch
        if self._recv_runs is not None:
            receive_run = self.demux.receive_run
            count = 0
            for data, segment, addr in self._recv_runs(batch.on_wake(now)):
                if segment >= len(data):
                    count += 1
                    peer = receive(data, addr, now)
                    if peer is not None:
                        dirty.add(peer)
                else:
                    count += -(-len(data) // segment)
                    dirty.update(receive_run(data, segment, addr, now))
            batch.note(count)
            return
        datagrams = self.udp.recv_batch(batch.on_wake(now))
        batch.note(len(datagrams))
        for data, addr in datagrams:
            peer = receive(data, addr, now)
            if peer is not None:
                dirty.add(peer)

    def drain(self, peer: Peer, now: float) -> None:
        """Deliver what the peer's session accepted: packets to the TUN device, everything
        else (state, path, sizes, capabilities) to its owner."""
        s = peer.session
        if s is None:
            return
        next_event = s.next_event
        ev = next_event()
        if ev is None:  # a wake-up that only sent: nothing to set up for
            return
        source_owner = self.router.lookup_source
        tun = self.tun
        vnet = tun.vnet_hdr
        drops = peer.counters.drops
        c = peer.counters
        while ev is not None:
            if type(ev) is not MessageReceived:
                self.on_event(peer, ev, now)
                ev = next_event()
                continue
            mtype = ev.type
            payload = ev.payload
            if mtype == _DATA:
                problem = inner_packet_problem(payload)
                if problem is not None:
                    drops[problem] += 1
                elif source_owner(payload) is not peer:
                    drops["source-not-allowed"] += 1
                elif tun.write_parts(ZERO_HDR, payload) if vnet else tun.write(payload):
                    c.rx_packets += 1
                    c.rx_bytes += len(payload)
                else:
                    self.tun_write_errors += 1
            elif mtype == VNET_TYPE:
                if not vnet or not header_acceptable(payload):
                    drops["bad-offload-header"] += 1
                elif (problem := inner_packet_problem(payload, VNET_HDR_SIZE)) is not None:
                    drops[problem] += 1
                elif source_owner(payload, VNET_HDR_SIZE) is not peer:
                    drops["source-not-allowed"] += 1
                elif tun.write(payload):
                    c.rx_packets += 1
                    c.rx_bytes += len(payload) - VNET_HDR_SIZE
                else:
                    self.tun_write_errors += 1
            elif mtype == CAPS_TYPE:
                self.on_caps(peer, payload)
            # KEEPALIVE_TYPE and unknown types: liveness only
            ev = next_event()
