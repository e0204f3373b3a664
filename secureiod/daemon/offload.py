"""TUN offload between two secureiod peers: whole TCP segments instead of MTU packets.

With ``IFF_VNET_HDR`` and TSO enabled on the TUN device, the kernel hands the daemon TCP
segments of up to 64 KiB, each behind a 10-byte ``virtio_net_hdr`` saying how to split it
(``gso_type``, ``gso_size``) and where its checksum goes. The sender carries header and
segment as ONE secureio message (type ``VNET_TYPE``; secureio fragments it into
path-sized, encrypted packets), and the receiving daemon writes it to its own TUN device
unchanged, where the kernel takes it as one large packet. One system call and one pass
through the kernel's TCP code per 64 KiB instead of per 1.4 KiB, on both ends.

Only peers that said so (a ``CAPS_TYPE`` message after establishment) get such messages;
the device turns TSO on only while every established peer accepts them and none reports
a lossy path (``CAP_LOSSY``: one lost datagram loses a whole chain). Plain packets still
travel as ``READ_WRITE`` messages, so a peer without offload interoperates. Reference Go
peers drop both reserved types silently (PROTOCOL §5.4).

A received header is checked before the kernel sees it: known GSO types only (TCP over
IPv4 or IPv6, optionally ECN), flags limited to NEEDS_CSUM/DATA_VALID, and checksum offsets
inside the packet. The fields are little-endian (the TUN default on little-endian hosts).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from ..logs import RateLimitedLog
from ..secureio.constants import FRAGMENT_HEADER_SIZE, PACKET_OVERHEAD
from ..secureio.events import SessionState
from ..tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6
from ..udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS

if TYPE_CHECKING:
    from .peer import Peer
    from .ports import TunPort

logger = logging.getLogger(__name__)

VNET_TYPE: Final = 0xFFFFFFEF
"""Message type: virtio-net header + IP packet (reserved range, §3.1)."""
CAPS_TYPE: Final = 0xFFFFFFF0
"""Message type: u32 LE capability bits of the sending daemon (reserved range)."""
CAP_VNET: Final = 0x1
"""The sender of the caps takes VNET_TYPE messages."""
CAP_LOSSY: Final = 0x2
"""...but loses whole-segment chains on this path: please let the kernel segment (TSO off).
Segments already on their way are still welcome, so nothing is dropped at the switch."""

VNET_HDR_SIZE: Final = 10
ZERO_HDR: Final = bytes(VNET_HDR_SIZE)
_HDR: Final = struct.Struct("<BBHHHH")
_CAPS: Final = struct.Struct("<I")

GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80
F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
MAX_SEGMENT: Final = 65535 + VNET_HDR_SIZE
LOSS_CHECK_INTERVAL: Final = 0.25
LOSS_MIN_CHAINS: Final = 2
LOSS_RATIO: Final = 0.01
MAX_COOLDOWN: Final = 600.0
CAPS_INTERVAL: Final = 10.0
"""Seconds between two announcements of our caps (a lost one is repeated), and between
two changes of a peer's caps that we apply once its burst is spent."""
CAPS_BURST: Final = 3
"""Changes of a peer's caps applied at once (a new session, then a lossy path and its
recovery); beyond that one per ``CAPS_INTERVAL``, the latest announcement winning. Each
change may switch TSO on the TUN device (an ioctl) and is logged: a peer toggling its caps
in a loop must not turn that into an ioctl and a log line per message."""


MIN_GSO_MAX_SIZE: Final = 1280
LEGACY_GSO_MAX_SIZE: Final = 65536
"""A TUN device's ``gso_max_size`` when nobody set it (``GSO_LEGACY_MAX_SIZE``)."""


def _fit(payload_size: int) -> int:
    per_send = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // (payload_size + PACKET_OVERHEAD))
    if per_send <= 1:  # a segment not fragmented at all
        return payload_size - VNET_HDR_SIZE
    return per_send * (payload_size - FRAGMENT_HEADER_SIZE) - VNET_HDR_SIZE


COMMON_PAYLOAD_SIZES: Final = range(1168, 1409, 16)
"""Payload sizes of the paths most tunnels run on: 1280-byte IPv6 (1168) to 1500-byte IPv4
(1408) underlays."""
SEGMENT_CEILING: Final = min(_fit(p) for p in COMMON_PAYLOAD_SIZES)  # 59,966
"""``gso_max_size`` never goes above the smallest fit of the common paths, so it is the same
on all of them and a peer on another common path never lowers it: the kernel copies the
value into a TCP socket only when the socket checks its route, and a stream that kept a
larger one would have its segments cut into MTU-sized packets (a third of the speed). TCP
keeps its segments about 300 bytes under the value, so a lowering smaller than that is
harmless too. Costs 1.5 % more segments than the exact fit on a 1500-byte path."""


def gso_max_size_for(payload_size: int) -> int:
    """The TUN device's ``gso_max_size`` (bytes of IP packet) that lets every segment it
    hands us leave in ONE UDP GSO send toward a peer whose session carries
    ``payload_size`` bytes per datagram.

    A segment travels as one VNET message (10-byte header + IP packet), fragmented into
    datagrams of ``payload_size + 53`` bytes that each carry ``payload_size - 24`` bytes
    of it (PROTOCOL §4, §6); one send takes at most ``GSO_MAX_SEGMENTS`` datagrams and
    ``GSO_MAX_BYTES`` bytes. Left at the kernel's 65,536, a full segment is 47 datagrams
    on a 1500-byte path: two sends, two GRO reads at the peer, and a reassembly there that
    copies it three times; 44 datagrams go in one of each and arrive as one whole
    message. When at most one datagram fits a send (a path of 32 KB or more), a segment
    not fragmented at all: ``payload_size - 10``. At most ``SEGMENT_CEILING`` (59,966),
    at least 1280."""
    return max(MIN_GSO_MAX_SIZE, min(SEGMENT_CEILING, _fit(payload_size)))


def encode_caps(caps: int) -> bytes:
    return _CAPS.pack(caps)


def decode_caps(payload: bytes | memoryview) -> int | None:
    """The peer's capability bits; None for a malformed message (ignored)."""
    if len(payload) < _CAPS.size:
        return None
    (caps,) = _CAPS.unpack_from(payload)
    return caps


def header_acceptable(message: bytes | memoryview) -> bool:
    """Is ``message`` (header + IP packet) safe to hand to the kernel as it is?"""
    if len(message) < VNET_HDR_SIZE + 20:
        return False
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(message)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        return False
    base = gso_type & ~GSO_ECN
    version = message[VNET_HDR_SIZE] >> 4
    packet_len = len(message) - VNET_HDR_SIZE
    if base == GSO_TCPV4:
        if version != 4 or not 0 < gso_size < packet_len:
            return False
    elif base == GSO_TCPV6:
        if version != 6 or not 0 < gso_size < packet_len:
            return False
    elif base != GSO_NONE or gso_type & GSO_ECN:
        return False
    if flags & F_NEEDS_CSUM and csum_start + csum_offset + 2 > packet_len:
        return False
    return hdr_len <= packet_len


Write = Callable[["Peer", int, bytes, float], bool]


class OffloadCaps:
    """The capability exchange and the TSO switch on the TUN device.

    Whole segments travel as chains of fragments, and one lost datagram loses the chain:
    on a lossy path that turns 1 % loss into 30 % and starves TCP. So a receiver that
    sees chains lost tells the sender to stop (caps with ``CAP_LOSSY``), which then
    segments in the kernel like any MTU-sized tunnel; it offers again after a cooldown
    that doubles up to ``MAX_COOLDOWN``.
    """

    def __init__(self, tun: TunPort, write: Write, ifname: str) -> None:
        self.tun = tun
        self.write = write
        self.ifname = ifname
        self.caps_deferred = 0
        """Caps announcements not applied at once (the peer changed them too often)."""
        self.log = RateLimitedLog(logger, interval=CAPS_INTERVAL, max_keys=4096, max_lines=64)

    @property
    def enabled(self) -> bool:
        return self.tun.vnet_hdr

    def send_caps(self, peer: Peer, now: float) -> None:
        state = peer.offload
        state.caps_sent_at = now
        caps = CAP_VNET if self.tun.vnet_hdr else 0
        if caps and state.suspended_until is not None:
            caps |= CAP_LOSSY
        self.write(peer, CAPS_TYPE, encode_caps(caps), now)

    def on_caps(
        self,
        peer: Peer,
        payload: bytes | memoryview,
        peers: Iterable[Peer],
        now: float | None = None,
    ) -> None:
        """A caps message from ``peer``: applied at once while its burst lasts, else kept
        as ``pending_caps`` (the latest wins) for ``check_loss`` to apply when due.
        ``now`` defaults to the time the session last accepted a datagram, which is the
        arrival time of the datagram that carried this message."""
        caps = decode_caps(payload)
        if caps is None:
            return
        state = peer.offload
        if caps == state.remote_caps:
            state.pending_caps = None  # back where it was: nothing left to apply
            return
        if now is None:
            s = peer.session
            now = s.last_received if s is not None and s.last_received is not None else 0.0
        if state.caps_budget.take(now):
            self._apply(peer, caps, peers, now)
        else:
            if state.pending_caps is None:
                self.caps_deferred += 1
            state.pending_caps = caps

    def _apply(self, peer: Peer, caps: int, peers: Iterable[Peer], now: float) -> None:
        state = peer.offload
        state.remote_caps = caps
        state.pending_caps = None
        self.log.log(
            now, (peer.name, "caps"), logging.INFO, "peer %s: capabilities 0x%x", peer.name, caps
        )
        self.update(peers)

    def check_loss(self, peers: Iterable[Peer], now: float) -> None:
        """Every ``LOSS_CHECK_INTERVAL``: ask for MTU-sized packets where chains are lost,
        offer whole segments again after the cooldown, repeat a lost announcement."""
        if not self.tun.vnet_hdr:
            return
        peers = list(peers)  # iterated again by ``update``
        for peer in peers:
            s = peer.session
            if s is None or not s.is_established:
                continue
            state = peer.offload
            if state.pending_caps is not None and state.caps_budget.take(now):
                self._apply(peer, state.pending_caps, peers, now)
            done, lost = s.fragment_chains
            seen_done, seen_lost = state.chains_seen
            state.chains_seen = (done, lost)
            d_done, d_lost = done - seen_done, lost - seen_lost
            if d_done < 0 or d_lost < 0:  # the reassembler was replaced (peer restart)
                continue
            suspended = state.suspended_until
            if suspended is None:
                if d_lost >= LOSS_MIN_CHAINS and d_lost > LOSS_RATIO * (d_done + d_lost):
                    state.suspended_until = now + state.cooldown
                    logger.warning(
                        "peer %s: %d of %d whole-segment chains lost in the last %g s; "
                        "asking for MTU-sized packets for %g s",
                        peer.name,
                        d_lost,
                        d_done + d_lost,
                        LOSS_CHECK_INTERVAL,
                        state.cooldown,
                    )
                    state.cooldown = min(state.cooldown * 2, MAX_COOLDOWN)
                    self.send_caps(peer, now)
            elif now >= suspended:
                state.suspended_until = None
                logger.info("peer %s: offering whole segments again", peer.name)
                self.send_caps(peer, now)
            elif d_done + d_lost:
                # Chains still arrive: our request was lost on this lossy path. Again.
                self.send_caps(peer, now)
                continue
            if now >= state.caps_sent_at + CAPS_INTERVAL:
                self.send_caps(peer, now)  # a lost announcement must not cost offload

    def update(self, peers: Iterable[Peer]) -> None:
        """TSO on the TUN device only while every established peer takes whole segments:
        the kernel then hands over up to 64 KiB per read. Otherwise it segments itself."""
        if not self.tun.vnet_hdr:
            return
        established = [p for p in peers if p.state == SessionState.ESTABLISHED]
        want = (
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
            if established
            and all(
                p.offload.remote_caps & CAP_VNET and not p.offload.remote_caps & CAP_LOSSY
                for p in established
            )
            else 0
        )
        if want != self.tun.offload:
            try:
                self.tun.set_offload(want)
                logger.info("%s: TCP segmentation offload %s", self.ifname, "on" if want else "off")
            except Exception as exc:
                logger.warning("%s: %s", self.ifname, exc)
