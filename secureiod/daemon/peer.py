"""One configured peer: its session, what we know of its endpoint, its counters.

A ``Peer`` holds state and answers questions about it ("when is the next thing due?",
"should the session be replaced?"); the parts of the daemon that act on peers
(``lifecycle``, ``receive``, ``send``, ``offload``, ``routes``) change it. The endpoint
itself lives in the session: the secureio core alone decides when a datagram may move it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..endpoint import Address, format_endpoint
from ..secureio.budget import TokenBucket
from ..secureio.events import SessionState
from ..secureio.identity import Identity
from ..secureio.keyexchange import KeyExchangeOptions
from ..secureio.negotiation import NegotiationOptions
from ..secureio.session import Session, SessionOptions
from ..secureio.wire import MessageType
from .offload import CAPS_BURST, CAPS_INTERVAL, MAX_SEGMENT

if TYPE_CHECKING:
    from ..config import PeerConfig
    from ..resolver import Backoff
    from .loop import Timer

KEEPALIVE_TYPE: Final = 0xFFFFFFEE
"""A reserved message type (§3.1): reference peers drop it silently (§5.4), we use it as
an empty keepalive so that dead peers are noticed in seconds, not the reference's ~2 min."""
DATA_TYPE: Final = MessageType.READ_WRITE
OFFLOAD_COOLDOWN: Final = 30.0
"""First pause of whole-segment offload on a lossy path; doubles up to 10 min."""
assert not MessageType.is_internal(KEEPALIVE_TYPE)

DROP_REASONS: Final = (
    "source-not-allowed",
    "no-endpoint",
    "not-established",
    "too-big",
    "send-failed",
    "queue-full",
    "refused-by-session",
    "offload-unsupported",
    "bad-offload-header",
    "inner-truncated",
    "inner-bad-version",
    "inner-bad-header-length",
    "inner-bad-length",
)


@dataclass(slots=True)
class PeerCounters:
    """Inner packets (what crossed the TUN) and the daemon's own drops for this peer; the
    session keeps the wire-level counters and its drops by reason."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    roams: int = 0
    restarts: int = 0
    drops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


@dataclass(frozen=True, slots=True)
class PeerTiming:
    key_update_interval: float = 60.0
    keepalive_interval: float = 5.0
    """Send a keepalive when nothing was sent for this long (persistent_keepalive wins)."""
    dead_after: float = 15.0
    """No authenticated datagram for this long while established: start a new session."""
    restart_backoff: float = 1.0


@dataclass(slots=True)
class NameState:
    """A peer whose endpoint is a DNS name: where its resolution stands."""

    host: str
    port: int
    backoff: Backoff
    resolving: bool = False
    next_at: float = 0.0
    last_error: str | None = None
    addresses: tuple[Address, ...] = ()


@dataclass(slots=True)
class OffloadState:
    """Whole-segment offload with this peer (see ``offload``)."""

    remote_caps: int = 0
    """Capability bits the peer announced; reset with every session."""
    chains_seen: tuple[int, int] = (0, 0)
    """(completed, lost) fragment chains at the last loss check."""
    suspended_until: float | None = None
    """While set, we told the peer not to send whole segments (the path loses them)."""
    cooldown: float = OFFLOAD_COOLDOWN
    caps_sent_at: float = 0.0
    caps_budget: TokenBucket = field(
        default_factory=lambda: TokenBucket(1.0 / CAPS_INTERVAL, float(CAPS_BURST))
    )
    """Changes of ``remote_caps`` that may be applied now (see ``offload.OffloadCaps``)."""
    pending_caps: int | None = None
    """The latest announced caps not applied yet (too many changes in a short time)."""


def session_options(
    config: PeerConfig, timing: PeerTiming, payload_size_limit: int
) -> SessionOptions:
    """The daemon's session settings: fragmentation for whole segments, a replay window
    wide enough for tunnel speeds, and retrying key exchange forever."""
    return SessionOptions(
        payload_size_limit=payload_size_limit,
        send_delay=0.0005,
        key_exchange=KeyExchangeOptions(
            key_update_interval=timing.key_update_interval, timeout=None
        ),
        psk=config.psk,
        negotiation=NegotiationOptions(read_timeout=10.0, total_timeout=60.0),
        enable_fragmentation=True,
        # A TSO segment (64 KiB + virtio header) travels as one fragmented message.
        max_fragmented_message_size=MAX_SEGMENT,
        reassembly_budget=4 << 20,
        max_fragment_chains=32,
        max_chain_id_diff=32,
        # 4096 PacketIDs: 40 ms of reordering at 100k datagrams/s (the default 256 mistook
        # 2.5 ms of reordering for replays at tunnel speeds).
        replay_window=4096,
        max_queued_messages=256,
    )


class Peer:
    def __init__(
        self,
        config: PeerConfig,
        identity: Identity,
        timing: PeerTiming,
        payload_size_limit: int,
    ) -> None:
        self.config = config
        self.name: str = config.name
        self.identity = identity
        self.timing = timing
        self.payload_size_limit = payload_size_limit
        self.counters = PeerCounters()
        self.session: Session | None = None
        self.dormant = False
        """No session yet, by design: a peer without an endpoint waits for its first key
        exchange with no session, keys or timer (``Demultiplexer.add_dormant``); its
        session is made when that arrives. A daemon with 10,000 such peers starts in
        seconds and holds ~200 bytes for each instead of ~10 KB."""
        self.sessions_started = 0
        self.last_handshake_wall: float | None = None
        self.route_mtu: int | None = None
        self.payload_size: int | None = None
        """What its sessions carry per datagram, as last negotiated (``Routes``)."""
        self.restart_at: float | None = None
        self.keepalive_interval = float(config.persistent_keepalive or timing.keepalive_interval)
        self.offload = OffloadState()
        self.name_state: NameState | None = None
        self.timer: Timer | None = None
        self.timer_at: float | None = None
        self.refusals_seen: dict[str, int] = {}
        """Key-exchange refusal counts already reported for the current session."""
        self._endpoint: Address | None = None

    # -- session life ---------------------------------------------------------------

    def new_session(self, now: float, wall_ns: int) -> Session:
        """A fresh session that keeps the last endpoint the old one had validated. It is
        started only when that endpoint is known: a peer we cannot reach yet sends
        nothing until its first datagram arrives (the demultiplexer starts it then)
        instead of signing key exchanges every second that can go nowhere."""
        endpoint = self.endpoint
        self.dormant = False
        if self.session is not None:
            # what it lent (the C lone hop's lane, ``lone.py``) must not outlive it
            self.session.settle_reservation()
        self.session = Session(
            self.identity,
            self.config.public_key,
            created_at_ns=wall_ns,
            options=session_options(self.config, self.timing, self.payload_size_limit),
            random=os.urandom,
            endpoint=endpoint,
        )
        self.sessions_started += 1
        self.restart_at = None
        self.offload = OffloadState(cooldown=self.offload.cooldown)
        self.refusals_seen = {}
        if endpoint is not None:
            self.session.start(now)
        return self.session

    @property
    def endpoint(self) -> Address | None:
        s = self.session
        if s is not None:
            self._endpoint = s.endpoint
        return self._endpoint

    @property
    def state(self) -> SessionState:
        if self.session is not None:
            return self.session.state
        return SessionState.NEW if self.dormant else SessionState.CLOSED

    def next_deadline(self) -> float | None:
        """The earliest time anything about this peer is due (session timer, keepalive,
        dead-peer check, restart, a name to resolve).

        Each deadline here is exactly the instant the matching check (``keepalive_due``,
        ``needs_restart``) turns true: both compare ``now >= last + interval``, the same
        float sum. ``now - last >= interval`` can be false at ``now == last + interval``
        (rounding), and a timer armed for that instant would fire, find nothing due, and
        be armed for the same instant again, forever."""
        # Called after every wake-up that touched the peer: compared in place, no list.
        t: float | None = None
        s = self.session
        established = False
        if s is not None:
            t = s.get_timer()
            if s.state is SessionState.ESTABLISHED:
                established = True
                k = (s.last_sent or 0.0) + self.keepalive_interval
                if t is None or k < t:
                    t = k
                last = s.last_received
                if last is not None:
                    k = last + self.timing.dead_after
                    if k < t:
                        t = k
        restart_at = self.restart_at
        if restart_at is not None and (t is None or restart_at < t):
            t = restart_at
        ns = self.name_state
        if ns is not None and not ns.resolving and not established:
            k = ns.next_at
            if t is None or k < t:
                t = k
        return t

    def needs_restart(self, now: float) -> str | None:
        """Why the session should be replaced now, if it should."""
        s = self.session
        if s is None or s.state == SessionState.CLOSED:
            if self.restart_at is None:
                self.restart_at = now + self.timing.restart_backoff
            return "closed" if now >= self.restart_at else None
        if (
            s.is_established
            and s.last_received is not None
            and now >= s.last_received + self.timing.dead_after
        ):
            return f"no answer for {now - s.last_received:.0f} s"
        return None

    def keepalive_due(self, now: float) -> bool:
        s = self.session
        return bool(
            s is not None
            and s.is_established
            and now >= (s.last_sent or 0.0) + self.keepalive_interval
        )

    def describe(self, now: float) -> dict[str, Any]:
        """What ``secureioctl peers`` shows (JSON-able)."""
        s = self.session
        endpoint = self.endpoint
        ns = self.name_state
        info: dict[str, Any] = {
            "name": self.name,
            "public_key": str(self.config.public_key),
            "endpoint": format_endpoint(endpoint) if endpoint else None,
            "state": self.state.name.lower().replace("_", "-"),
            "established": bool(s and s.is_established),
            "latest_handshake": self.last_handshake_wall,
            "last_received_ago": (
                round(now - s.last_received, 3) if s and s.last_received is not None else None
            ),
            "payload_size": s.payload_size if s else None,
            "mtu": self.route_mtu,
            "sessions_started": self.sessions_started,
            "allowed_ips": [str(n) for n in self.config.allowed_ips],
            "rx_packets": self.counters.rx_packets,
            "rx_bytes": self.counters.rx_bytes,
            "tx_packets": self.counters.tx_packets,
            "tx_bytes": self.counters.tx_bytes,
            "roams": self.counters.roams,
            "drops": {k: v for k, v in self.counters.drops.items() if v},
        }
        if ns is not None:
            info["endpoint_name"] = format_endpoint((ns.host, ns.port))
            info["resolve"] = {
                "state": "resolving" if ns.resolving else ("failed" if ns.last_error else "ok"),
                "error": ns.last_error,
                "next_in": None if ns.resolving else max(0.0, round(ns.next_at - now, 3)),
                "addresses": [format_endpoint(a) for a in ns.addresses],
            }
        if s is not None:
            info["session_drops"] = {k: v for k, v in s.stats.drops.items() if v}
            info["key_rotations"] = list(s.key_rotations)
            info["wire_rx_packets"] = s.stats.rx_packets
            info["wire_tx_packets"] = s.stats.tx_packets
            info["wire_rx_kx_duplicates"] = s.stats.rx_kx_duplicates
            info["wire_rx_kx_restored"] = s.stats.rx_kx_restored
        return info
