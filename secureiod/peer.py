"""One configured peer: its session, endpoint, counters and timers.

The device owns the sockets; a ``Peer`` only decides what its session should do next and
keeps the numbers ``secureioctl peers`` shows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Final

from .offload import MAX_SEGMENT
from .secureio.events import SessionState
from .secureio.identity import Identity
from .secureio.keyexchange import KeyExchangeOptions
from .secureio.negotiation import NegotiationOptions
from .secureio.session import Session, SessionOptions
from .secureio.wire import MessageType
from .udp import Address, format_endpoint

logger = logging.getLogger(__name__)

KEEPALIVE_TYPE: Final = 0xFFFFFFEE
"""A reserved message type (§3.1): reference peers drop it silently (§5.4), we use it as
an empty keepalive so that dead peers are noticed in seconds, not the reference's ~2 min."""
DATA_TYPE: Final = MessageType.READ_WRITE
OFFLOAD_COOLDOWN: Final = 30.0
"""First pause of whole-segment offload on a lossy path; doubles up to 10 min."""
assert not MessageType.is_internal(KEEPALIVE_TYPE)


@dataclass(slots=True)
class PeerCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "source-not-allowed",
                "no-endpoint",
                "not-established",
                "too-big",
                "send-failed",
                "queue-full",
                "offload-unsupported",
                "bad-offload-header",
            ),
            0,
        )
    )


@dataclass(frozen=True, slots=True)
class PeerTiming:
    key_update_interval: float = 60.0
    keepalive_interval: float = 5.0
    """Send a keepalive when nothing was sent for this long (persistent_keepalive wins)."""
    dead_after: float = 15.0
    """No authenticated datagram for this long while established: start a new session."""
    restart_backoff: float = 1.0


class Peer:
    def __init__(
        self,
        config: Any,
        identity: Identity,
        timing: PeerTiming,
        payload_size_limit: int,
    ) -> None:
        self.config = config
        self.name: str = config.name
        self.identity = identity
        self.timing = timing
        self.payload_size_limit = payload_size_limit
        self.endpoint: Address | None = None
        self.counters = PeerCounters()
        self.session: Session | None = None
        self.sessions_started = 0
        self.last_handshake_wall: float | None = None
        self.route_mtu: int | None = None
        self.restart_at: float | None = None
        self.scheduled: float | None = None
        self.keepalive_interval = float(config.persistent_keepalive or timing.keepalive_interval)
        self._was_established = False
        self.reported: dict[str, int] = {}
        self.report_after: dict[str, float] = {}
        self.chains_seen = (0, 0)
        """(completed, lost) fragment chains at the last loss check."""
        self.vnet_suspended_until: float | None = None
        """While set, we told the peer not to send whole segments (the path loses them)."""
        self.vnet_cooldown = OFFLOAD_COOLDOWN
        self.caps_sent_at = 0.0
        self.remote_caps = 0
        """Capability bits the peer announced (``offload.CAP_VNET``); reset per session."""

    # -- session life ---------------------------------------------------------------

    def new_session(self, now: float, wall_ns: int, *, start: bool = True) -> Session:
        """A fresh session; ``start=False`` for a peer we cannot reach yet (no endpoint): it
        then sends nothing until the peer's first datagram arrives, instead of signing key
        exchanges every second that can go nowhere."""
        options = SessionOptions(
            payload_size_limit=self.payload_size_limit,
            send_delay=0.0005,
            key_exchange=KeyExchangeOptions(
                key_update_interval=self.timing.key_update_interval, timeout=None
            ),
            psk=self.config.psk,
            negotiation=NegotiationOptions(read_timeout=10.0, total_timeout=60.0),
            enable_fragmentation=True,
            # A TSO segment (64 KiB + virtio header) travels as one fragmented message.
            max_fragmented_message_size=MAX_SEGMENT,
            reassembly_budget=4 << 20,
            max_fragment_chains=32,
            max_chain_id_diff=32,
            # 4096 PacketIDs: 40 ms of reordering at 100k datagrams/s (the default 256
            # mistook 2.5 ms of reordering for replays at tunnel speeds).
            replay_window=4096,
            max_queued_messages=256,
        )
        self.session = Session(
            self.identity,
            self.config.public_key,
            created_at_ns=wall_ns,
            options=options,
            random=os.urandom,
        )
        self.sessions_started += 1
        self.restart_at = None
        self._was_established = False
        self.remote_caps = 0
        self.reported = {}  # the new session's drop counters start at zero
        self.chains_seen = (0, 0)
        if start:
            self.session.start(now)
        return self.session

    @property
    def state(self) -> SessionState:
        return self.session.state if self.session else SessionState.CLOSED

    def next_deadline(self) -> float | None:
        times = []
        s = self.session
        if s is not None:
            t = s.get_timer()
            if t is not None:
                times.append(t)
            if s.is_established:
                last_sent = s.last_sent or 0.0
                times.append(last_sent + self.keepalive_interval)
                if s.last_received is not None:
                    times.append(s.last_received + self.timing.dead_after)
        if self.restart_at is not None:
            times.append(self.restart_at)
        return min(times) if times else None

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
            and now - s.last_received >= self.timing.dead_after
        ):
            return f"no answer for {now - s.last_received:.0f} s"
        return None

    def keepalive_due(self, now: float) -> bool:
        s = self.session
        return bool(
            s is not None
            and s.is_established
            and now - (s.last_sent or 0.0) >= self.keepalive_interval
        )

    def describe(self, now: float) -> dict[str, Any]:
        s = self.session
        info: dict[str, Any] = {
            "name": self.name,
            "public_key": str(self.config.public_key),
            "endpoint": format_endpoint(self.endpoint) if self.endpoint else None,
            "state": s.state.name.lower().replace("_", "-") if s else "closed",
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
            "drops": {k: v for k, v in self.counters.drops.items() if v},
        }
        if s is not None:
            info["session_drops"] = {k: v for k, v in s.stats.drops.items() if v}
            info["key_rotations"] = list(s.key_rotations)
            info["wire_rx_packets"] = s.stats.rx_packets
            info["wire_tx_packets"] = s.stats.tx_packets
        return info
