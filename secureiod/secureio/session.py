"""The sans-IO secureio session: one peer, bytes and time in, bytes, events and timers out.

Shaped like aioquic's ``QuicConnection``: the caller owns the socket and the clock.

* inputs: ``start(now)``, ``receive_datagram(data, addr, now)`` (and, for a UDP GRO
  read, ``receive_datagram_run(data, segment_size, addr, now)``: the same, in one C
  call, ``rxbatch.py``), ``write_message(type, payload, now)``, ``flush(now)``,
  ``handle_timer(now)``, ``report_too_big(size, now, datagram, path_limit)``,
  ``report_path_limit(limit, now)``, ``set_endpoint(addr)``, ``close(now)``;
* outputs: ``datagrams_to_send(now)`` as ``(bytes, addr)`` pairs (or the same datagrams as
  ``datagram_runs_to_send(now)``: a fragmented message as one UDP GSO buffer),
  ``get_timer()``, ``next_event()`` (or ``take_events()``: all at once), ``endpoint``,
  ``stats``;
* the lone-packet shortcuts, for a caller that wants a quiet tunnel's packet handled in
  the fewest steps: ``seal_message_now`` (write + flush + take the one datagram) and
  ``take_lone_message`` (the one message an input brought, when nothing else is due).
  Each gives exactly what the general path gives, or ``None`` and changes nothing.

Receive path order (PROTOCOL §4.6 with the §12 hardening): open the packet (MAC) →
refuse everything but key exchange from clear/aux packets → only then the replay window →
messages. A datagram that fails is dropped and counted; it never closes the session
unless ``close_after_decrypt_failures`` asks for that.

Path validation: the session alone decides where the peer is. A datagram from an address
other than ``endpoint`` moves it there only if it opened under a session key, passed the
replay window and carries a PacketID above every one accepted from this remote session,
or if it carried a key exchange signed by the pinned key that restarted the remote
session. A key exchange that only brought a new remote key moves it only while no
session packet vouches for the current path: before the remote session's first one (the
handshake) or after ``key_exchange_moves_path_after`` seconds without one. The message
carries nothing that orders keys, so a key we never saw may still be an old one
(captured before this session of ours began, replayed now), while a session packet's
PacketID is proof. Anything else, including a validly signed key exchange we already
knew, can be replayed by anyone who saw it, so it moves nothing.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .budget import TokenBucket
from .constants import (
    CONTAINER_HEADER_SIZE,
    DEFAULT_PAYLOAD_SIZE_LIMIT_UDP,
    FRAGMENT_HEADER_SIZE,
    KX_PAYLOAD_SIZE,
    MESSAGE_FLAG_CONFIDENTIAL,
    MESSAGE_FLAG_FRAGMENTED,
    MESSAGE_HEADER_SIZE,
    PACKET_OVERHEAD,
    SALT,
)
from .crypto import RandomSource
from .datagram_run import DatagramRun
from .errors import AuthenticationError, MalformedError, PayloadTooBigError, SecureioError
from .events import (
    Closed,
    DropReason,
    Event,
    KeyRotated,
    MessageReceived,
    PathChanged,
    PayloadSizeNegotiated,
    PeerRestarted,
    SessionState,
    StateChanged,
)
from .fragment import FRAGMENT_HEADER
from .identity import Identity, PublicKey
from .keyexchange import KeyExchangeOptions, KeyExchanger, KxOutcome
from .keys import PskKeys
from .kx_message import KeyExchangeMessage
from .negotiation import MIN_PAYLOAD_SIZE, NegotiationOptions, Negotiator
from .negotiation_message import SUBTYPE_PING, NegotiationProbe, decode_negotiation
from .packet import (
    ACCEL,
    BATCH_SEAL,
    MAX_BATCH_PAYLOAD,
    KeyRing,
    PacketClass,
    PacketKey,
    open_packet,
    open_ring,
    seal,
    seal_fragments,
)
from .path import Address, same_path
from .pmtu import CONFIRM_MIN_SIZE, PathMtuOptions, PathMtuStats, PathProber
from .reassembly import Reassembler, fragment_message
from .replay import ReplayWindow
from .reservation import ReceiveReservation, Reservation, Settle, SettleReceive
from .rxbatch import (
    MAX_RUN_DATAGRAMS,
    NOT_OPENED_MALFORMED,
    RXBATCH,
    Group,
    RunPlan,
    open_run,
    split_run,
)
from .wire import MESSAGE_HEADER, MessageType, SessionID, iter_messages, split_messages

_KX: Final = MessageType.KEY_EXCHANGE
_NEG: Final = MessageType.NEGOTIATION
_CONF: Final = MESSAGE_FLAG_CONFIDENTIAL
_MAX_EVENTS: Final = 65536
_CLOSED: Final = SessionState.CLOSED
_CLOSING: Final = SessionState.CLOSING
_ESTABLISHED: Final = SessionState.ESTABLISHED
_NEW: Final = SessionState.NEW
_SESSION_CLASS: Final = PacketClass.SESSION
_U32_AT_65: Final = 65
"""Where a ping's IterationID sits (PROTOCOL §8.2)."""
_GO_COVERAGE_WORD: Final = 64
"""A reference receiver counts fragment coverage in 64-byte words (§9.2): re-split
fragments start on word boundaries so its count stays exact."""
_KX_BURST: Final = 20.0
_SPLIT: Final = getattr(ACCEL, "split_messages", split_messages)
"""The message framing of a received packet, in one call (``wire.split_messages``); the
reference when the C build is missing or older than the function."""


class SessionClosedError(SecureioError):
    """A write on a session that is closing or closed."""


class QueueFullError(SecureioError):
    """More messages written before the session is established than it will hold."""


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """Every knob, defaulting to the reference's UDP defaults except where §12 says better."""

    payload_size_limit: int = DEFAULT_PAYLOAD_SIZE_LIMIT_UDP
    """P: the largest payload one packet carries before negotiation (1392 on UDP)."""
    send_delay: float = 50e-6
    """Aggregation window for small messages; 0 sends each message in its own packet."""
    replay_window: int = 0
    """PacketIDs remembered (0: 256). Below 0 there is no replay check, and then data
    packets cannot prove they are fresh: only key exchange moves the peer's address."""
    key_exchange: KeyExchangeOptions = field(default_factory=KeyExchangeOptions)
    psk: bytes | None = None
    negotiation: NegotiationOptions = field(default_factory=NegotiationOptions)
    path_mtu: PathMtuOptions = field(default_factory=PathMtuOptions)
    """Mid-session path MTU tracking (``pmtu.py``); only with negotiation enabled."""
    enable_fragmentation: bool = False
    accept_unencrypted_fragments: bool = False
    """Reference peers send their fragments in clear/aux packets (§9.1): accepting them
    means accepting unauthenticated data without a PSK. Off unless a Go peer needs it."""
    max_fragmented_message_size: int = 65536
    reassembly_budget: int = 1 << 20
    max_fragment_chains: int = 8
    max_chain_id_diff: int = 8
    """How far behind the newest chain a partial chain may fall before it is given up."""
    key_exchanges_per_second: float = 200.0
    """Budget of signature checks (~60 µs each) for received key-exchange messages (burst:
    20), once for those from the peer's endpoint and once for those from anywhere else,
    so neither can spend the other's. Messages that could change nothing (an older
    SessionID, a key already moved past, bytes already checked) are refused or taken
    without a check. A real peer sends a few a minute; under a flood of forgeries only a
    share gets checked, so the budget sets how long a restarted peer may wait: against
    1,200 forgeries a second, median 0.6 s, worst of ten runs 6 s (in memory), for at
    most ~2.5 % of a core."""
    key_exchange_moves_path_after: float = 15.0
    """A key exchange that brings a new remote key (not a restart) moves the endpoint
    only after this many seconds without a fresh session packet from the peer, or before
    the first one. While the peer is heard from, only its session packets (whose
    PacketIDs prove them fresh) show where it is: the key exchange message orders nothing,
    so a key this session never saw may be an old one, captured before it began. A peer
    that went quiet (it roamed, and only its key exchanges get through) is followed."""
    close_after_decrypt_failures: int = 0
    """Close after this many consecutive undecryptable datagrams; 0 never (the reference
    closes on the first one, §13 item 12)."""
    max_queued_messages: int = 1024
    """Messages held while not yet established; more raise ``QueueFullError``."""
    salt: bytes = SALT

    def __post_init__(self) -> None:
        # Whatever E negotiation or the path prober settle on stays within
        # [MIN_PAYLOAD_SIZE, P]: a smaller P would leave fragments no room.
        if self.payload_size_limit < MIN_PAYLOAD_SIZE:
            raise ValueError(
                f"payload_size_limit {self.payload_size_limit} is below {MIN_PAYLOAD_SIZE}, "
                "the smallest payload size a session uses"
            )


@dataclass(slots=True)
class SessionStats:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_messages: int = 0
    tx_messages: int = 0
    rx_kx_duplicates: int = 0
    """Key exchanges signed by the peer that carried a key we already had: its retries
    (normal), or replays by anyone who saw one. Answered, but not counted in
    ``rx_packets``, and they move nothing (not the endpoint, not liveness)."""
    rx_kx_restored: int = 0
    """Key exchanges that took the peer's previous key back: the newer one had never been
    used while the previous one still was, so it was an old key replayed (see
    ``keyexchange.py``). Not counted in ``rx_packets``; they move nothing."""
    drops: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in DropReason})

    def drop(self, reason: DropReason) -> None:
        self.drops[reason.value] += 1


class Session:
    def __init__(
        self,
        identity: Identity,
        remote_identity: PublicKey | None,
        *,
        created_at_ns: int,
        options: SessionOptions | None = None,
        random: RandomSource = os.urandom,
        endpoint: Address | None = None,
    ) -> None:
        """``created_at_ns`` is the wall-clock UnixNano of creation: it goes on the wire in
        the SessionID, and a peer tells our restart from a replay by it growing.

        ``endpoint`` is where the peer is believed to be (``None``: wait to be contacted);
        the session moves it only on evidence (see the module docstring)."""
        self.options = opt = options or SessionOptions()
        self.identity = identity
        self.session_id = SessionID(created_at_ns, int.from_bytes(random(8), "little"))
        self._psk = PskKeys.from_psk(opt.psk, opt.salt) if opt.psk is not None else None
        self._pid_mask = self._psk.packet_id_mask if self._psk else 0
        self._fallback = PacketKey.aux(self._psk.aux_key) if self._psk else PacketKey.clear()
        self._kx = KeyExchanger(
            identity, remote_identity, self.session_id, opt.key_exchange, self._psk, random
        )
        self._negotiator = Negotiator(opt.payload_size_limit, opt.negotiation)
        self._reassembler = self._new_reassembler()
        self._replay = ReplayWindow(opt.replay_window)
        self.state = SessionState.NEW
        self.payload_size = opt.payload_size_limit
        """E: payloads up to this size go in one packet (negotiated, else P; afterwards
        it follows the path, see ``pmtu.py``)."""
        self.payload_size_reason = "negotiated"
        """Why ``payload_size`` has its value: "negotiated", or a ``pmtu.REASON_*``."""
        self._prober = PathProber(opt.payload_size_limit, opt.path_mtu)
        self._largest_sent = 0
        """Largest payload sent in one data datagram since the last confirmation began."""
        self.stats = SessionStats()
        self.last_received: float | None = None
        """When the last authenticated, fresh datagram arrived (for keepalive/dead-peer
        logic). A key exchange counts only when it may also move the endpoint (a restart,
        or no session packet vouches for the path): any other may be a replay."""
        self.last_sent: float | None = None
        """When the last session packet was sent (for keepalive logic). Key exchanges do
        not count: the peer cannot tell one from a replay, so it takes none as a sign that
        we are alive, and a peer rotating every second must still get keepalives."""
        self.close_reason: str | None = None
        self._endpoint: Address | None = endpoint
        self._unsent_for_no_endpoint = False

        self._next_pid = 1
        self._reservation: tuple[int, Settle] | None = None
        """The PacketID lent out (``reserve_message``) and how to take it back."""
        self._receive_reservation: tuple[int, SettleReceive] | None = None
        """The receipt lent out (``reserve_receive``): the window's newest PacketID then,
        and how to take it back."""
        self._lent = False
        """Either is lent out: the one check every entry point makes."""
        self._out: list[bytes | tuple[bytes, int, int]] = []
        """Sealed datagrams in send order; a fragmented message sealed in one call is one
        ``(buffer, count, segment_size)`` run (``packet.seal_fragments``)."""
        self._seal_runs = BATCH_SEAL
        self._events: deque[Event] = deque()
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._batch_deadline: float | None = None
        self._queued: deque[tuple[int, bytes]] = deque()
        self._blocked_internal: list[bytes] = []
        self._chain_id = 0
        self._decrypt_failures = 0
        self._negotiating_probe_sizes = False
        self._seen_rotations = (0, 0)
        self._kx_change: KxOutcome | None = None
        """What a key exchange in the datagram being read did to the key state, if anything."""
        self._heard_session_packet = False
        """A session packet of the current remote session passed the replay window: from
        then on only such packets, or a restart, show where the peer is."""
        self._needs_update = False
        self._unsettled = True
        """Since the last ``take_lone_message``, something may have moved ``get_timer``
        earlier or changed the state (a sub-machine update, a key slot being watched):
        the caller must then take the general path (``next_event``, ``get_timer``)."""
        self._kx_budget = TokenBucket(opt.key_exchanges_per_second, _KX_BURST)
        self._kx_budget_strangers = TokenBucket(opt.key_exchanges_per_second, _KX_BURST)
        self._ring = KeyRing([self._fallback])
        self._ring_version = -1

    def _new_reassembler(self) -> Reassembler:
        opt = self.options
        return Reassembler(
            max_message_size=opt.max_fragmented_message_size,
            max_chains=opt.max_fragment_chains,
            byte_budget=opt.reassembly_budget,
            max_chain_id_diff=opt.max_chain_id_diff,
        )

    # -- properties -------------------------------------------------------------------

    @property
    def remote_identity(self) -> PublicKey | None:
        return self._kx.remote_identity

    @property
    def remote_session_id(self) -> SessionID | None:
        return self._kx.remote_session_id

    @property
    def endpoint(self) -> Address | None:
        """Where datagrams go now: the application's address, or the latest validated one."""
        return self._endpoint

    @property
    def fallback_key(self) -> tuple[PacketKey, int]:
        """The key and PacketID mask of this session's key-exchange packets (clear, or the
        PSK's aux key): what a demultiplexer opens a stranger's first packet with."""
        return self._fallback, self._pid_mask

    @property
    def consecutive_decrypt_failures(self) -> int:
        """Datagrams in a row that no key opened (0 after any authenticated one)."""
        return self._decrypt_failures

    @property
    def is_established(self) -> bool:
        return self.state == SessionState.ESTABLISHED

    @property
    def fragment_chains(self) -> tuple[int, int]:
        """(chains reassembled, chains given up incomplete) since the peer's session began:
        a lost fragment costs its whole chain, so the ratio tells how lossy the path is."""
        r = self._reassembler
        return r.completed, r.expired + r.evictions

    @property
    def path_mtu_stats(self) -> PathMtuStats:
        """Mid-session path MTU counters (probes, decreases, increases, re-sent messages)."""
        return self._prober.stats

    @property
    def key_rotations(self) -> tuple[int, int]:
        """(local rotations, remote key changes) so far."""
        return self._kx.rotations, self._kx.remote_rotations

    # -- inputs -----------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self._lent:
            self._settle()
        if self.state != SessionState.NEW:
            return
        self._set_state(SessionState.KEY_EXCHANGING)
        self._kx.start(now)
        self._after_input(now)

    def set_endpoint(self, addr: Address | None) -> None:
        """The application's own knowledge of the peer's address (configured, resolved).

        Emits no event: the caller already knows. ``None`` stops sending until the peer
        makes contact from an address the session can validate.
        """
        if self._lent:
            self._settle()
        self._endpoint = addr

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, addr: Address, now: float
    ) -> None:
        """One datagram from ``addr``. It may move ``endpoint`` (``PathChanged``) only
        under the rules in the module docstring."""
        if self._lent:
            self._settle()
        state = self.state
        if state is _NEW or state is _CLOSED:
            self.stats.drop(DropReason.NOT_ACCEPTING)
            return
        if not data:
            self.stats.drop(DropReason.EMPTY)
            return
        kx = self._kx
        if kx.keys_version != self._ring_version:
            self._ring = KeyRing([*kx.recv_keys, self._fallback])
            self._ring_version = kx.keys_version
        ring = self._ring
        try:
            pid, index, messages = open_ring(data, ring, self._pid_mask)
        except MalformedError:
            self._decrypt_failed(DropReason.MALFORMED, now)
            return
        except AuthenticationError:
            self._decrypt_failed(DropReason.AUTH, now)
            return
        self._receive_opened(pid, index, messages, len(data), addr, now)

    def _receive_opened(
        self, pid: int, index: int, messages: bytes, size: int, addr: Address, now: float
    ) -> None:
        """The rest of ``receive_datagram`` for a datagram of ``size`` bytes that opened
        under ``self._ring.keys[index]`` (shared with ``receive_datagram_run``)."""
        stats = self.stats
        kx = self._kx
        if self._ring.keys[index].packet_class is _SESSION_CLASS:
            replay = self._replay
            if not replay.accept(pid):
                stats.drop(DropReason.REPLAY)
                return
            # Accepted and equal to the window's newest: above every PacketID so far.
            if addr != self._endpoint and pid == replay.latest and replay.size > 0:
                self._path_validated(addr, now)
            self._heard_session_packet = True
            if kx.watching:
                self._unsettled = True  # (a watched slot may arm a nudge: get_timer moves)
                if kx.note_session_packet(kx.recv_slot_ids[index], now):
                    self._needs_update = True
            # an accepted datagram: the peer is alive (written out: this runs per datagram)
            self._decrypt_failures = 0
            self.last_received = now
            stats.rx_packets += 1
            stats.rx_bytes += size
            # The common case, one data message filling the packet, without the generic walk.
            if len(messages) >= MESSAGE_HEADER_SIZE:
                mtype, length, flags = MESSAGE_HEADER.unpack_from(messages)
                if (
                    length + MESSAGE_HEADER_SIZE == len(messages)
                    and not flags & MESSAGE_FLAG_FRAGMENTED
                    and mtype != _KX
                    and mtype != _NEG
                ):
                    stats.rx_messages += 1
                    events = self._events
                    if len(events) < _MAX_EVENTS:
                        events.append(MessageReceived(mtype, messages[MESSAGE_HEADER_SIZE:]))
                    else:
                        stats.drop(DropReason.EVENT_QUEUE_FULL)
                    if self._needs_update:
                        self._after_input(now)
                    return
                if (
                    length + MESSAGE_HEADER_SIZE == len(messages)
                    and flags & MESSAGE_FLAG_FRAGMENTED
                ):
                    self._handle_fragment(mtype, memoryview(messages)[MESSAGE_HEADER_SIZE:])
                    if self._needs_update:
                        self._after_input(now)
                    return
            self._process_messages(messages, now)
        else:
            # Clear/aux packets are authenticated by nothing but the PacketID (or a static
            # PSK key): decide what they may carry before they touch any state. They never
            # move the replay window, so a forged PacketID cannot poison it (§13 item 2).
            if not self._unencrypted_allowed(messages):
                stats.drop(DropReason.UNENCRYPTED_PAYLOAD)
                return
            self._kx_change = None
            self._process_messages(messages, now, stranger=not same_path(addr, self._endpoint))
            change = self._kx_change
            if change is not None:  # signed by the peer, and it changed the key state
                self._decrypt_failures = 0
                stats.rx_packets += 1
                stats.rx_bytes += size
                if change is KxOutcome.PEER_RESTARTED or self._kx_may_move_path(now):
                    self.last_received = now
                    if addr != self._endpoint:
                        self._path_validated(addr, now)
        if self._needs_update:
            self._after_input(now)

    def receive_datagram_run(
        self, data: bytes | bytearray | memoryview, segment_size: int, addr: Address, now: float
    ) -> None:
        """Datagrams of ``segment_size`` bytes back to back in ``data`` (the last may be
        shorter: one UDP GRO read), all from ``addr``: exactly what ``receive_datagram``
        of each in turn does (events, counters, endpoint), in fewer steps. A demultiplexer
        uses ``open_run`` and ``receive_group`` instead, to keep its say per datagram."""
        if self._lent:
            self._settle()
        plan = self.open_run(data, segment_size)
        if plan is None:
            for datagram in split_run(data, segment_size):
                self.receive_datagram(datagram, addr, now)
            return
        for group in plan.groups:
            if not self.receive_group(plan, group, addr, now):
                for datagram in plan.group_datagrams(group):
                    self.receive_datagram(datagram, addr, now)

    def open_run(self, data: bytes | bytearray | memoryview, segment_size: int) -> RunPlan | None:
        """Open a run of datagrams under the current keys (one C call, ``rxbatch.py``),
        changing nothing yet; ``None`` when there is no batch path or nothing to gain
        (one datagram, a session not accepting): feed the datagrams one by one."""
        if self._lent:
            self._settle()
        if (
            RXBATCH is None
            or segment_size <= 0
            or len(data) <= segment_size
            or len(data) > segment_size * MAX_RUN_DATAGRAMS
            or self.state in (SessionState.NEW, SessionState.CLOSED)
        ):
            return None
        kx = self._kx
        if kx.keys_version != self._ring_version:
            self._ring = KeyRing([*kx.recv_keys, self._fallback])
            self._ring_version = kx.keys_version
        groups = open_run(data, segment_size, self._ring, self._pid_mask)
        return RunPlan(data, segment_size, self._ring, self._ring_version, groups)

    def receive_group(self, plan: RunPlan, group: Group, addr: Address, now: float) -> bool:
        """Take one group of ``plan`` as ``receive_datagram`` would take its datagrams.
        False, with nothing changed, when they must go through ``receive_datagram`` after
        all: they did not open, the keys changed since ``open_run``, or anything but the
        steady state (a new address, a key slot being watched, an out-of-order span)."""
        if self._lent:
            self._settle()
        if (
            type(group) is int
            or self._kx.keys_version != plan.keys_version
            or self.state in (SessionState.NEW, SessionState.CLOSED)
        ):
            return False
        n = len(group)  # type: ignore[arg-type]
        if n == 2:  # did not open under these keys: counted as receive_datagram would
            malformed = group[1] == NOT_OPENED_MALFORMED  # type: ignore[index]
            self._decrypt_failed(DropReason.MALFORMED if malformed else DropReason.AUTH, now)
            return True
        if n == 4:
            i, index, pid, messages = group  # type: ignore[misc]
            size = min(plan.segment_size, len(plan.data) - i * plan.segment_size)
            self._receive_opened(pid, index, messages, size, addr, now)
            return True
        return self._receive_span(plan, group, addr, now)  # type: ignore[arg-type]

    def _receive_span(
        self,
        plan: RunPlan,
        group: tuple[int, int, int, int, int, int, int, int, bytes, int],
        addr: Address,
        now: float,
    ) -> bool:
        """Consecutive fresh session packets, each one fragment of one chain, from the
        endpoint: the replay window, counters and reassembly once for all of them."""
        _, count, index, pid, mtype, chain_id, total, start, chunks, size = group
        endpoint = self._endpoint
        if (
            (addr != endpoint and not same_path(endpoint, addr))
            or self._kx.watching
            or self._ring.keys[index].packet_class is not PacketClass.SESSION
            or not self._replay.accept_consecutive(pid, count)
        ):
            return False
        # What _receive_opened does for each accepted datagram; the path stays (addr is
        # the endpoint's, so path validation would change nothing).
        self._heard_session_packet = True
        self._decrypt_failures = 0
        self.last_received = now
        stats = self.stats
        stats.rx_packets += count
        stats.rx_bytes += size
        whole = self._reassembler.add_span(mtype, chain_id, total, start, chunks)
        if whole is False:
            # Not one step for the reassembler: its fragments one by one, rebuilt exactly
            # (every chunk but a run's last is segment_size - 77 bytes).
            chunk = plan.segment_size - PACKET_OVERHEAD - FRAGMENT_HEADER_SIZE
            view = memoryview(chunks)
            pack = FRAGMENT_HEADER.pack
            for k in range(count):
                lo = k * chunk
                hi = lo + chunk if k < count - 1 else len(chunks)
                self._handle_fragment(
                    mtype, memoryview(pack(chain_id, start + lo, total) + view[lo:hi])
                )
        elif whole is not None:
            self._deliver(mtype, whole)  # type: ignore[arg-type]
        if self._needs_update:
            self._after_input(now)
        return True

    def owns_datagram(self, data: bytes | memoryview) -> bool:
        """Would one of this session's current keys open ``data``? Changes no state.

        For the demultiplexer (``demux.py``), which gets a session packet from an address no
        session is at (a roaming peer) and asks each candidate before handing it over.
        """
        keys = self._kx.recv_keys
        if not keys:
            return False
        try:
            open_packet(data, keys, self._pid_mask)
        except (MalformedError, AuthenticationError):
            return False
        return True

    def refuses_key_exchange(self, msg: KeyExchangeMessage, payload: bytes) -> bool:
        """Would this session refuse ``msg`` (its 146 bytes: ``payload``) whatever its
        signature? Changes no state.

        For the demultiplexer, before it spends a signature check identifying a stranger:
        an older SessionID of the peer, a key its current session already moved past, or
        bytes already found forged change nothing, so a flood of them need not cost one.
        """
        return self._kx.triage(msg, payload) is not None

    def write_message(self, message_type: int, payload: bytes | memoryview, now: float) -> None:
        """Queue one message; it goes out with the next ``datagrams_to_send``.

        Raises ``PayloadTooBigError`` for a payload above the negotiated size when
        fragmentation is off, ``QueueFullError`` when too much waits for establishment and
        ``SessionClosedError`` after ``close``.
        """
        if self._lent:
            self._settle()
        state = self.state
        if state is _CLOSING or state is _CLOSED:
            raise SessionClosedError("session is closed")
        if message_type in (_KX, _NEG):  # MessageType.is_internal, without the call
            raise ValueError("internal message types cannot be written by the application")
        size = len(payload)
        opt = self.options
        if size > self.payload_size and (
            not opt.enable_fragmentation or size > opt.max_fragmented_message_size
        ):
            raise PayloadTooBigError(
                f"payload of {size} bytes exceeds the session's {self.payload_size}"
            )
        if state is not _ESTABLISHED or self._kx.send_key is None:
            if len(self._queued) >= opt.max_queued_messages:
                raise QueueFullError("too many messages waiting for the session to establish")
            self._queued.append((message_type, bytes(payload)))
            return
        self._send_data(message_type, payload, now)

    def write_messages(
        self,
        message_type: int,
        payloads: Sequence[bytes | bytearray | memoryview],
        now: float,
        offset: int = 0,
    ) -> list[tuple[int, SecureioError | ValueError]]:
        """``write_message(message_type, p[offset:], now)`` for every ``p`` of ``payloads``,
        in order, with the same datagrams, PacketIDs and counters: a TUN read of small
        packets goes to its peer in one call, not three Python calls per packet (the
        sender's cost per packet of a UDP 64 B flood). ``offset`` skips a virtio-net header.

        Returns the payloads refused, as ``(index, exception)`` (what ``write_message``
        would have raised for it); a refusal does not stop the payloads after it.
        """
        if self._lent:
            self._settle()
        send_delay = self.options.send_delay
        if (
            self.state is not _ESTABLISHED
            or self._kx.send_key is None
            or send_delay <= 0
            or message_type in (_KX, _NEG)
        ):
            return self._write_each(message_type, payloads, now, offset)
        limit = self.payload_size
        room = limit + PACKET_OVERHEAD - CONTAINER_HEADER_SIZE  # of one datagram's messages
        pack = MESSAGE_HEADER.pack
        refused: list[tuple[int, SecureioError | ValueError]] = []
        batch = self._batch
        filled = self._batch_size
        written = 0
        try:  # if anything escapes (a payload that is not bytes), the batch's books stay right
            for i, p in enumerate(payloads):
                size = len(p) - offset
                if not 0 <= size <= limit:  # fragments, refused, or a runt: the general path
                    self._batch_size = filled
                    self.stats.tx_messages += written
                    written = 0
                    refused += self._write_each(message_type, (p,), now, offset, i)
                    batch = self._batch
                    filled = self._batch_size
                    continue
                needed = MESSAGE_HEADER_SIZE + size
                if batch and filled + needed > room:
                    self._batch_size = filled
                    self._flush_batch(now)
                    batch = self._batch
                    filled = 0
                batch.append(pack(message_type, size, _CONF) + (p[offset:] if offset else p))
                filled += needed
                written += 1
        finally:
            if batch is self._batch:  # else a flush that raised has reset the batch itself
                self._batch_size = filled
            self.stats.tx_messages += written
            if self._batch and self._batch_deadline is None:
                self._batch_deadline = now + send_delay
        return refused

    def _write_each(
        self,
        message_type: int,
        payloads: Iterable[bytes | bytearray | memoryview],
        now: float,
        offset: int,
        first: int = 0,
    ) -> list[tuple[int, SecureioError | ValueError]]:
        """``write_messages`` one ``write_message`` at a time (any state, any size)."""
        refused: list[tuple[int, SecureioError | ValueError]] = []
        for i, p in enumerate(payloads, first):
            try:
                self.write_message(message_type, p[offset:] if offset else p, now)
            except (SecureioError, ValueError) as exc:
                refused.append((i, exc))
        return refused

    def seal_message_now(
        self, message_type: int, payload: bytes | memoryview, now: float
    ) -> tuple[bytes, Address] | None:
        """``write_message`` then ``flush`` then ``datagrams_to_send`` for one message, when
        that is all they would do: the one datagram and where it goes, with the same
        PacketID, bytes and counters. The lone packet of a quiet tunnel (a ping) is sealed
        and handed back at once, without the batch, the output queue and the runs.

        ``None``, having changed nothing, whenever the general path has more to do: not
        established, anything batched, queued or waiting to go out (it goes first), no
        endpoint, an internal type, a payload above the packet size, or a size that would
        give the path prober a confirmation deadline (``get_timer`` must not move earlier
        behind the caller's back). The caller then calls ``write_message`` as usual."""
        if self._lent:
            self._settle()
        size = len(payload)
        lone = self._lone_limit(message_type)
        if lone is None or size > lone[1]:
            return None
        key = lone[0]
        self.stats.tx_messages += 1
        if size > self._largest_sent:
            self._largest_sent = size
        self._seal(key, MESSAGE_HEADER.pack(message_type, size, _CONF) + payload, now)
        return self._out.pop(), self._endpoint

    def _lone_limit(self, message_type: int) -> tuple[PacketKey, int] | None:
        """The key and the largest payload (bytes) one message of ``message_type`` may
        have to be sealed on its own now, with nothing else changing; ``None`` when the
        general path has more to do (see ``seal_message_now``). A size above the largest
        sent would give an active path prober a confirmation deadline."""
        if (
            self.state is not _ESTABLISHED
            or self._batch
            or self._out
            or self._queued
            or self._endpoint is None
            or message_type in (_KX, _NEG)
        ):
            return None
        key = self._kx.send_key
        if key is None:
            return None
        if self._prober.active:
            return key, min(self.payload_size, max(self._largest_sent, CONFIRM_MIN_SIZE))
        return key, self.payload_size

    def take_lone_message(self) -> MessageReceived | None:
        """After an input, when its only outcome is one message to deliver: that message,
        taken off the event queue. Nothing else is then due for this session (no other
        event, nothing batched or to send, no sub-machine update or watched key slot since
        the last call, so ``get_timer`` moved no earlier): the caller delivers it and is
        done. ``None`` otherwise (then, once, also after such an update): deliver with
        ``next_event`` and re-arm from ``get_timer`` as usual."""
        events = self._events
        if self._unsettled:
            self._unsettled = False
            return None
        if len(events) != 1 or self._out or self._batch:
            return None
        ev = events[0]
        if type(ev) is not MessageReceived:
            return None
        events.clear()
        return ev

    def reserve_message(self, message_type: int, settle: Settle) -> Reservation | None:
        """Lend the next PacketID to an executor outside the session (the daemon's C
        lone-packet hop) for at most one message of ``message_type``, sealed exactly as
        ``seal_message_now`` would seal it: the same key, flags, endpoint and size rule,
        so the datagram is the one the session would have made itself.

        ``None``, changing nothing, whenever ``seal_message_now`` would refuse any size:
        not established, anything batched, queued or waiting to go out, no endpoint, an
        internal type. Otherwise the PacketID stays lent until it is settled: every method
        that seals, receives, times or closes first calls ``settle()``, which disarms the
        executor and returns what it sent (``ReservationUse``, counted as if this session
        had sent it: statistics, ``last_sent``, the largest size sent) or ``None`` when
        the PacketID certainly never went out (it is then reused). A PacketID is never
        used twice, whatever the executor does in between. ``settle_reservation`` settles
        on demand (the daemon: right after each wait, for the reservations used)."""
        if self._reservation is not None:  # its own only: a lent receipt stays lent
            self._settle_send()
        lone = self._lone_limit(message_type)
        if lone is None:
            return None
        key, max_payload = lone
        pid = self._next_pid
        self._next_pid = pid + 1
        self._reservation = (pid, settle)
        self._lent = True
        return Reservation(
            key, pid, self._pid_mask, message_type, _CONF, max_payload, self._endpoint
        )

    def reserve_receive(
        self, message_type: int, settle: SettleReceive
    ) -> ReceiveReservation | None:
        """Lend the receipt of one datagram to an executor outside the session (the
        daemon's C lone-packet hop): one session packet from ``endpoint``, under one of
        the current receive keys, with a PacketID above every one seen so far, carrying
        exactly one whole message of ``message_type``. That is the steady state, where
        ``receive_datagram`` only moves the window, the counters and ``last_received`` and
        queues the message; the executor delivers the message itself, and must leave
        every other datagram to ``receive_datagram`` untouched.

        ``None``, changing nothing, unless established with an endpoint and nothing
        pending (a key slot being watched, a sub-machine update due). Settled like
        ``reserve_message``: every method that receives, seals, times or closes first
        calls ``settle()``, which disarms the executor and returns what it received
        (``ReceiveUse``, counted as ``receive_datagram`` counts it) or ``None``."""
        if self._receive_reservation is not None:  # its own only: a lent PacketID stays
            self._settle_receive()
        kx = self._kx
        if (
            self.state is not _ESTABLISHED
            or self._endpoint is None
            or kx.watching
            or self._needs_update
            or message_type in (_KX, _NEG)
        ):
            return None
        if kx.keys_version != self._ring_version:
            self._ring = KeyRing([*kx.recv_keys, self._fallback])
            self._ring_version = kx.keys_version
        keys = tuple(
            pair
            for key, pair in zip(self._ring.keys, self._ring.pairs, strict=True)
            if key.packet_class is _SESSION_CLASS
        )
        if not keys:
            return None
        latest = self._replay.latest
        self._receive_reservation = (latest, settle)
        self._lent = True
        return ReceiveReservation(keys, self._pid_mask, latest, message_type, _CONF, self._endpoint)

    def settle_reservation(self) -> None:
        """Take back now whatever is lent (``reserve_message``, ``reserve_receive``)."""
        if self._lent:
            self._settle()

    def _settle(self) -> None:
        if self._receive_reservation is not None:
            self._settle_receive()
        if self._reservation is not None:
            self._settle_send()

    def _settle_send(self) -> None:
        pid, settle = self._reservation  # type: ignore[misc]
        # cleared first: if settle() raises, the PacketID counts as used (never reused)
        self._reservation = None
        self._lent = self._receive_reservation is not None
        use = settle()
        if use is None:
            if self._next_pid == pid + 1:
                self._next_pid = pid
            return
        stats = self.stats
        stats.tx_messages += 1
        stats.tx_packets += 1
        stats.tx_bytes += use.datagram_size
        if self.last_sent is None or use.sent_at > self.last_sent:
            self.last_sent = use.sent_at
        if use.payload_size > self._largest_sent:
            self._largest_sent = use.payload_size

    def _settle_receive(self) -> None:
        latest, settle = self._receive_reservation  # type: ignore[misc]
        self._receive_reservation = None
        self._lent = self._reservation is not None
        use = settle()
        if use is None:
            return
        stats = self.stats
        # above every PacketID seen when lent, and nothing was received since: accepted
        if use.packet_id <= latest or not self._replay.accept(use.packet_id):
            stats.drop(DropReason.REPLAY)  # an executor that broke the rules: counted
            return
        self._heard_session_packet = True
        self._decrypt_failures = 0
        if self.last_received is None or use.received_at > self.last_received:
            self.last_received = use.received_at
        stats.rx_packets += 1
        stats.rx_bytes += use.datagram_size
        stats.rx_messages += 1

    def flush(self, now: float) -> None:
        """Send the aggregated batch now: an I/O loop calls this when its input runs dry."""
        if self._lent:
            self._settle()
        if self._batch:
            self._flush_batch(now)

    def handle_timer(self, now: float) -> None:
        if self._lent:
            self._settle()
        if self.state == SessionState.CLOSED:
            return
        if self._batch_deadline is not None and now >= self._batch_deadline:
            self._flush_batch(now)
        self._kx.handle_timer(now)
        self._negotiator.handle_timer(now)
        prober = self._prober
        if prober.active and prober.handle_timer(now, self._largest_sent):
            self._largest_sent = 0
        self._after_input(now)

    def report_too_big(
        self,
        datagram_size: int,
        now: float,
        datagram: bytes | None = None,
        path_limit: int | None = None,
    ) -> None:
        """The I/O layer got EMSGSIZE sending a datagram of ``datagram_size`` bytes.

        ``datagram`` (the refused bytes) lets the session send its messages again;
        ``path_limit`` is the largest payload the local kernel now sends toward the peer
        (from its path MTU), when the caller read it.

        A §8 negotiation probe shrinks the probing (§13 item 20) instead of closing. Once
        established, the payload size goes down at once (to ``path_limit``, else to a
        common plateau, then a search) and the refused messages go out again at the new
        size: whole when they fit, re-fragmented when fragmentation is on, else dropped and
        counted as ``send-too-big`` (as they are when ``datagram`` is not given).
        """
        if self._lent:
            self._settle()
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        size = datagram_size - PACKET_OVERHEAD
        messages = self._open_own(datagram) if datagram is not None else None
        probe = self._refused_probe(messages) if messages is not None else None
        renegotiating = self.state == SessionState.NEGOTIATING or self._negotiating_probe_sizes
        prober = self._prober
        if probe is not None:
            iteration, is_ping = probe
            if is_ping and prober.owns(iteration):
                prober.probe_refused(size, now, path_limit)
            elif renegotiating:
                self._negotiator.report_too_big(size, now)
        elif messages is None:
            if prober.outstanding(size):
                prober.probe_refused(size, now, path_limit)
            elif renegotiating:
                self._negotiator.report_too_big(size, now)
            else:
                prober.data_too_big(size, now, path_limit)
                self.stats.drop(DropReason.SEND_TOO_BIG)
        else:
            prober.data_too_big(size, now, path_limit)
            self._apply_path_mtu(now)
            if self.payload_size < size and self.state == SessionState.ESTABLISHED:
                self._resend(messages, now)
            else:
                # The size did not go down (tracking off, or not established): sending the
                # same bytes again would only be refused again.
                self.stats.drop(DropReason.SEND_TOO_BIG)
        self._after_input(now)

    def report_path_limit(self, limit: int, now: float) -> None:
        """The caller read the local kernel's path MTU toward the peer: at most ``limit``
        payload bytes fit one datagram. Below the current size it applies at once; above
        it (a learned path MTU expired, a wider route) the session tries to raise its size.
        """
        if self._lent:
            self._settle()
        if self.state != SessionState.ESTABLISHED or self._negotiating_probe_sizes:
            return
        self._prober.path_limit(limit, now)
        self._after_input(now)

    def close(self, now: float, reason: str = "closed by application") -> None:
        """Flush what is batched, then stop; nothing is sent to the peer (there is no close
        message in the protocol)."""
        if self._lent:
            self._settle()
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            return
        self._set_state(SessionState.CLOSING)
        if self._batch and self._kx.send_key is not None:
            self._flush_batch(now)
        self._finish_close(reason)

    # -- outputs ----------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """What to send, each with its destination (the current ``endpoint``).

        An aggregation batch whose deadline has passed goes out too. Without an endpoint
        the datagrams are dropped and counted (``no-endpoint``): a peer that has not made
        contact yet cannot be reached, and holding them would only grow memory.
        """
        return [
            (datagram, run.address)
            for run in self.datagram_runs_to_send(now)
            for datagram in run.datagrams()
        ]

    def datagram_runs_to_send(self, now: float) -> list[DatagramRun]:
        """``datagrams_to_send`` in the batch form: the same datagrams in the same order,
        a fragmented message as one run in one buffer (one UDP GSO ``sendmsg``, no join),
        every other datagram as a run of one."""
        if self._lent:
            self._settle()
        deadline = self._batch_deadline
        if deadline is not None and now >= deadline:
            self._flush_batch(now)
        out = self._take_out()
        if not out:
            return []
        endpoint: Address = self._endpoint  # type: ignore[assignment]
        return [
            DatagramRun(item, len(item), 1, endpoint)
            if type(item) is bytes
            else DatagramRun(item[0], item[2], item[1], endpoint)  # type: ignore[index]
            for item in out
        ]

    def _take_out(self) -> list[bytes | tuple[bytes, int, int]]:
        """Empty the output queue; without an endpoint it is dropped and counted
        (``no-endpoint``) and nothing is returned."""
        out = self._out
        if not out:
            return out
        self._out = []
        if self._endpoint is None:
            dropped = sum(1 if type(item) is bytes else item[1] for item in out)  # type: ignore[misc]
            self.stats.drops[DropReason.NO_ENDPOINT.value] += dropped
            self._unsent_for_no_endpoint = True
            return []
        return out

    def get_timer(self) -> float | None:
        """The earliest of the batch, key-exchange, negotiation and probe deadlines.
        Called after every wake-up for every active peer, so it compares in place
        instead of building a list (the same minimum)."""
        if self.state is _CLOSED:
            return None
        t = self._batch_deadline
        k = self._kx.get_timer()
        if k is not None and (t is None or k < t):
            t = k
        negotiator = self._negotiator
        if not negotiator.done or negotiator.end_resend_at is not None:
            k = negotiator.get_timer()
            if k is not None and (t is None or k < t):
                t = k
        prober = self._prober
        if prober.active:
            k = prober.get_timer(self._largest_sent)
            if k is not None and (t is None or k < t):
                t = k
        return t

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def put_back_events(self, events: list[Event]) -> None:
        """Return events taken with ``take_events`` but not handled (the caller's handler
        failed part-way) to the front of the queue, in order, for the next call."""
        self._events.extendleft(reversed(events))

    def take_events(self) -> list[Event]:
        """Every queued event, in order, at once (``next_event`` without a call per event,
        for a caller that delivers a packet's worth of small messages). Events that its
        handling causes meanwhile are queued for the next call."""
        events = self._events
        if not events:
            return []
        taken = list(events)
        events.clear()
        return taken

    # -- receive internals ------------------------------------------------------------

    def _unencrypted_allowed(self, messages: bytes) -> bool:
        if not messages:
            return False  # nothing legitimate is empty: count it, do not ignore it
        allow_fragments = self.options.accept_unencrypted_fragments
        try:
            for m in iter_messages(messages):
                if m.type == _KX and not m.flags & MESSAGE_FLAG_FRAGMENTED:
                    continue
                if allow_fragments and m.flags & MESSAGE_FLAG_FRAGMENTED and m.type != _KX:
                    continue
                return False
        except MalformedError:
            return False
        return True

    def _kx_may_move_path(self, now: float) -> bool:
        """May a key exchange that brought a new key (signed, but perhaps an old one
        replayed) count as fresh evidence of where the peer is? Only while no session
        packet vouches for the path in use (see the module docstring)."""
        if not self._heard_session_packet or self._replay.size <= 0:
            return True  # the handshake, or no PacketID can ever show freshness
        last = self.last_received
        return last is None or now - last >= self.options.key_exchange_moves_path_after

    def _path_validated(self, addr: Address, now: float) -> None:
        """``addr`` passed path validation: adopt it unless it names the same path."""
        old = self._endpoint
        if same_path(old, addr):
            return
        self._endpoint = addr
        if old is None and self._unsent_for_no_endpoint:
            # Our own request was dropped for want of an address; answering the peer is
            # not enough for ANSWER_AND_WAIT, which waits for an answer to a request.
            self._unsent_for_no_endpoint = False
            if self._kx.retry_now(now):
                self._needs_update = True
        self._emit(PathChanged(old, addr))
        if old is not None and self._prober.active and not self._negotiating_probe_sizes:
            self._prober.path_changed(now)  # a new path: size it from scratch
            self._needs_update = True

    def _process_messages(self, messages: bytes, now: float, *, stranger: bool = False) -> None:
        """``stranger``: the datagram came from elsewhere than the endpoint (key exchanges
        then spend the strangers' budget)."""
        stats = self.stats
        events = self._events
        split, complete = _SPLIT(messages)
        for mtype, flags, payload in split:
            if flags & MESSAGE_FLAG_FRAGMENTED:
                self._handle_fragment(mtype, payload)
            elif mtype == _KX:
                self._needs_update = True
                self._handle_kx(payload, now, stranger)
            elif mtype == _NEG:
                self._needs_update = True
                self._handle_negotiation(payload, now)
            else:
                # _deliver, written out: an aggregated packet of small ones runs this
                # per message
                stats.rx_messages += 1
                if len(events) < _MAX_EVENTS:
                    events.append(MessageReceived(mtype, payload))
                else:
                    stats.drop(DropReason.EVENT_QUEUE_FULL)
        if not complete:
            # the messages before the bad header were delivered, as the reference does
            stats.drop(DropReason.TRUNCATED_MESSAGE)

    def _handle_negotiation(self, payload: bytes | memoryview, now: float) -> None:
        """Answers to our mid-session probes go to the prober; everything else (pings to
        answer, the §8 negotiation's pongs and controls) to the negotiator."""
        try:
            msg = decode_negotiation(payload)
        except MalformedError:
            self.stats.drop(DropReason.NEGOTIATION_MALFORMED)
            return
        if isinstance(msg, NegotiationProbe) and msg.is_pong and self._prober.on_pong(msg, now):
            return
        self._negotiator.handle_decoded(msg, payload, now)

    def _handle_kx(self, payload: bytes | memoryview, now: float, stranger: bool) -> None:
        stats = self.stats
        try:
            msg = KeyExchangeMessage.decode(payload)
        except MalformedError:
            stats.drop(DropReason.KX_MALFORMED)
            return
        raw = bytes(payload[:KX_PAYLOAD_SIZE])
        kx = self._kx
        refused = kx.triage(msg, raw)
        if refused is not None:
            stats.drop(DropReason(refused.value))
            return
        if not kx.is_verified(raw):
            # A token bucket: anyone can forge a clear key-exchange packet, and each costs an
            # Ed25519 verification; a real peer sends a few per minute. Strangers have their
            # own, so a flood from elsewhere cannot delay the peer's own messages.
            budget = self._kx_budget_strangers if stranger else self._kx_budget
            if not budget.take(now):
                stats.drop(DropReason.KX_RATE_LIMITED)
                return
        outcome = kx.handle_message(msg, now, raw, self.last_received)
        if outcome is KxOutcome.UNCHANGED:
            stats.rx_kx_duplicates += 1
        elif outcome is KxOutcome.ACCEPTED:
            self._kx_change = outcome
        elif outcome is KxOutcome.RESTORED:
            stats.rx_kx_restored += 1
        elif outcome is KxOutcome.PEER_RESTARTED:
            self._kx_change = outcome
            self._peer_restarted(now)
        else:
            stats.drop(DropReason(outcome.value))

    def _peer_restarted(self, now: float) -> None:
        """Forget the old remote session: its PacketIDs, chains and negotiation.

        We stay established and keep sending (the peer accepts data in any state), and
        negotiate again so the restarted peer gets the END it waits for.
        """
        self._replay.reset()
        self._heard_session_packet = False
        self._reassembler = self._new_reassembler()
        established = self.state == SessionState.ESTABLISHED
        self._negotiator = Negotiator(
            self.options.payload_size_limit,
            self.options.negotiation,
            current_size=self.payload_size if established else None,
        )
        if self.options.negotiation.enabled and self.state in (
            SessionState.NEGOTIATING,
            SessionState.ESTABLISHED,
        ):
            self._negotiating_probe_sizes = True
            self._prober.stop()  # the §8 negotiation sizes the path again
            self._negotiator.start(now)
        self._emit(PeerRestarted())

    def _handle_fragment(self, mtype: int, payload: bytes | memoryview) -> None:
        try:
            whole = self._reassembler.add(mtype, payload)
        except MalformedError:
            self.stats.drop(DropReason.FRAGMENT_INVALID)
            return
        if whole is not None:
            self._deliver(mtype, whole)

    def _deliver(self, mtype: int, payload: bytes) -> None:
        self.stats.rx_messages += 1
        self._emit(MessageReceived(mtype, payload))

    def _decrypt_failed(self, reason: DropReason, now: float) -> None:
        self.stats.drop(reason)
        self._decrypt_failures += 1
        limit = self.options.close_after_decrypt_failures
        if limit and self._decrypt_failures >= limit:
            self._finish_close(f"{self._decrypt_failures} consecutive undecryptable datagrams")

    # -- send internals ---------------------------------------------------------------

    def _seal(self, key: PacketKey, messages: bytes, now: float) -> None:
        pid = self._next_pid
        self._next_pid = pid + 1
        datagram = seal(key, pid, messages, self._pid_mask)
        self._out.append(datagram)
        stats = self.stats
        stats.tx_packets += 1
        stats.tx_bytes += len(datagram)
        self.last_sent = now

    def _send_data(self, mtype: int, payload: bytes | memoryview, now: float) -> None:
        size = len(payload)
        if size > self.payload_size:
            if not self.options.enable_fragmentation:
                # Accepted while E was still P, but negotiation settled lower.
                self.stats.drop(DropReason.QUEUED_TOO_BIG)
                return
            self.stats.tx_messages += 1
            self._send_fragments(mtype, payload, now)
            return
        self.stats.tx_messages += 1
        encoded = MESSAGE_HEADER.pack(mtype, size, _CONF) + payload
        send_delay = self.options.send_delay
        if send_delay <= 0:
            if size > self._largest_sent:
                self._largest_sent = size
            self._seal(self._kx.send_key, encoded, now)  # type: ignore[arg-type]
            return
        needed = MESSAGE_HEADER_SIZE + size
        if not self._batch:
            self._batch.append(encoded)
            self._batch_size = needed
            self._batch_deadline = now + send_delay
            return
        if CONTAINER_HEADER_SIZE + self._batch_size + needed > self.payload_size + PACKET_OVERHEAD:
            self._flush_batch(now)
        self._batch.append(encoded)
        self._batch_size += needed
        if self._batch_deadline is None:
            self._batch_deadline = now + send_delay

    def _send_fragments(self, mtype: int, payload: bytes | memoryview, now: float) -> None:
        self.flush(now)
        self._chain_id += 1
        key = self._kx.send_key
        largest = min(self.payload_size, FRAGMENT_HEADER_SIZE + len(payload))
        if largest > self._largest_sent:
            self._largest_sent = largest
        if self._seal_runs and len(payload) <= MAX_BATCH_PAYLOAD:
            pid = self._next_pid
            buffer, count, segment = seal_fragments(
                key,  # type: ignore[arg-type]
                pid,
                self._pid_mask,
                mtype,
                payload,
                self._chain_id,
                self.payload_size,
            )
            self._next_pid = pid + count
            self._out.append((buffer, count, segment))
            stats = self.stats
            stats.tx_packets += count
            stats.tx_bytes += len(buffer)
            self.last_sent = now
            return
        for encoded in fragment_message(mtype, payload, self._chain_id, self.payload_size):
            self._seal(key, encoded, now)  # type: ignore[arg-type]

    def _flush_batch(self, now: float) -> None:
        batch = self._batch
        largest = self._batch_size - MESSAGE_HEADER_SIZE
        if largest > self._largest_sent:
            self._largest_sent = largest
        self._batch = []
        self._batch_size = 0
        self._batch_deadline = None
        if batch:
            self._seal(self._kx.send_key, b"".join(batch), now)  # type: ignore[arg-type]

    def _send_internal(self, mtype: int, payload: bytes, now: float) -> None:
        encoded = MESSAGE_HEADER.pack(mtype, len(payload), _CONF) + payload
        key = self._kx.send_key
        if key is None:
            self._blocked_internal.append(encoded)
        else:
            self._seal(key, encoded, now)

    # -- state machine ----------------------------------------------------------------

    def _after_input(self, now: float) -> None:
        """Move every sub-machine's output onto the wire and advance the life cycle.

        Runs after every input that can change a sub-machine (key exchange, negotiation,
        timers, a newly confirmed send key); a plain data packet skips it.
        """
        self._needs_update = False
        self._unsettled = True
        if self.state == SessionState.CLOSED:
            return
        kx = self._kx
        outgoing = kx.take_outgoing()
        if outgoing:
            last_sent = self.last_sent  # (a key exchange is no sign of life: see last_sent)
            for payload in outgoing:
                encoded = MESSAGE_HEADER.pack(_KX, len(payload), 0) + payload
                self._seal(self._fallback, encoded, now)
            self.last_sent = last_sent
        rotations = (kx.rotations, kx.remote_rotations)
        if rotations != self._seen_rotations:
            if rotations[0] != self._seen_rotations[0]:
                self._emit(KeyRotated(local=True))
            if rotations[1] != self._seen_rotations[1]:
                self._emit(KeyRotated(local=False))
            self._seen_rotations = rotations
        if kx.failed:
            self._finish_close(kx.failed)
            return
        if self._blocked_internal and kx.send_key is not None:
            blocked, self._blocked_internal = self._blocked_internal, []
            for encoded in blocked:
                self._seal(kx.send_key, encoded, now)
        if self.state == SessionState.KEY_EXCHANGING and kx.confirmed_once:
            self._set_state(SessionState.NEGOTIATING)
            if self.options.negotiation.enabled:
                self._negotiator.start(now)
        neg = self._negotiator
        for payload in neg.take_outgoing():
            self._send_internal(_NEG, payload, now)
        if neg.failed:
            if not self._negotiating_probe_sizes:
                self._finish_close(neg.failed)
                return
            self._renegotiation_failed(now)
            neg = self._negotiator
        if self.state == SessionState.NEGOTIATING:
            if not self.options.negotiation.enabled:
                self._establish(self.options.payload_size_limit, now)
            elif neg.done:
                self._establish(self._negotiated(self.options.payload_size_limit), now)
        elif self._negotiating_probe_sizes and neg.done:
            self._negotiating_probe_sizes = False
            self.payload_size_reason = "negotiated"
            self._set_payload_size(self._negotiated(self.payload_size))
            if self.options.negotiation.enabled:
                self._prober.start(self.payload_size, now)
        prober = self._prober
        for payload in prober.take_outgoing():
            self._send_internal(_NEG, payload, now)
        self._apply_path_mtu(now)
        if self.state == SessionState.ESTABLISHED and self._queued and kx.send_key is not None:
            queued, self._queued = self._queued, deque()
            for mtype, payload in queued:
                self._send_data(mtype, payload, now)

    def _establish(self, size: int, now: float) -> None:
        self._set_payload_size(size)
        self._set_state(SessionState.ESTABLISHED)
        if self.options.negotiation.enabled:
            self._prober.start(self.payload_size, now)

    def _negotiated(self, fallback: int) -> int:
        """The finished negotiation's E (``fallback`` when it verified nothing), counting
        a peer END that was ignored and a re-negotiation that timed out."""
        neg = self._negotiator
        stats = self._prober.stats
        if neg.end_refused:
            stats.remote_sizes_ignored += 1
        if neg.timed_out is not None:
            stats.renegotiation_timeouts += 1
        return neg.result or fallback

    def _renegotiation_failed(self, now: float) -> None:
        """A re-negotiation of an established session failed in a way its timeouts do not
        cover (the kernel refused even the smallest probe): keep the size in use. A fresh,
        unstarted negotiator still answers the peer's pings."""
        self._negotiating_probe_sizes = False
        self._prober.stats.renegotiation_timeouts += 1
        self._negotiator = Negotiator(self.options.payload_size_limit, self.options.negotiation)
        if self.options.negotiation.enabled:
            self._prober.start(self.payload_size, now)

    # -- path MTU (pmtu.py decides; these apply it) ------------------------------------

    def _apply_path_mtu(self, now: float) -> None:
        """Take the prober's new size, if it has one. A batch that no longer fits one
        packet is split now rather than sent at a size the path refuses."""
        decision = self._prober.take_decision()
        if decision is None:
            return
        size, reason = decision
        self.payload_size_reason = reason
        self._set_payload_size(size)
        if self._batch and self._batch_size > size + MESSAGE_HEADER_SIZE:
            batch = b"".join(self._batch)
            self._batch = []
            self._batch_size = 0
            self._batch_deadline = None
            self._resend(batch, now)

    def _open_own(self, datagram: bytes) -> bytes | None:
        """The messages of a datagram we sealed under the current send key (None for key
        exchange packets, or after a rotation in between: then nothing is re-sent)."""
        key = self._kx.send_key
        if key is None:
            return None
        try:
            return open_packet(datagram, [key], self._pid_mask).messages
        except (MalformedError, AuthenticationError):
            return None

    @staticmethod
    def _refused_probe(messages: bytes) -> tuple[int, bool] | None:
        """(IterationID, is a ping) when ``messages`` is a negotiation ping or pong: those
        travel one per packet; None for anything else."""
        if len(messages) < MESSAGE_HEADER_SIZE:
            return None
        mtype, length, _flags = MESSAGE_HEADER.unpack_from(messages)
        if mtype != _NEG or length < _U32_AT_65 + 4:
            return None
        body = MESSAGE_HEADER_SIZE
        iteration = int.from_bytes(messages[body + _U32_AT_65 : body + _U32_AT_65 + 4], "little")
        return iteration, messages[body] == SUBTYPE_PING

    def _resend(self, messages: bytes, now: float) -> None:
        """Send ``messages`` (plaintext of a refused datagram, or a batch) again at the
        current size, and flush: they were due already."""
        stats = self.stats
        pstats = self._prober.stats
        fragmentation = self.options.enable_fragmentation
        try:
            for m in iter_messages(messages):
                mtype = m.type
                if mtype in (_KX, _NEG):
                    continue  # never batched with data; a probe is the prober's business
                if m.flags & MESSAGE_FLAG_FRAGMENTED:
                    self._refragment(mtype, m.flags, m.payload, now)
                elif len(m.payload) <= self.payload_size or fragmentation:
                    self._send_data(mtype, m.payload, now)
                    stats.tx_messages -= 1  # counted when it was first written
                else:
                    stats.drop(DropReason.SEND_TOO_BIG)
                    continue
                pstats.resent_messages += 1
        except MalformedError:
            stats.drop(DropReason.SEND_TOO_BIG)
        self.flush(now)

    def _refragment(self, mtype: int, flags: int, payload: memoryview, now: float) -> None:
        """One fragment of a chain, split into smaller fragments of the same chain (same
        ChainID and TotalMessageLength, sub-ranges of its StartPos range): the receiver
        reassembles by byte range, so the chain completes as if cut this way at first."""
        room = self.payload_size - FRAGMENT_HEADER_SIZE
        key = self._kx.send_key
        if len(payload) <= FRAGMENT_HEADER_SIZE or room <= 0 or key is None:
            self.stats.drop(DropReason.SEND_TOO_BIG)
            return
        chain, start, total = FRAGMENT_HEADER.unpack_from(payload)
        chunk = payload[FRAGMENT_HEADER_SIZE:]
        n = len(chunk)
        if FRAGMENT_HEADER_SIZE + min(n, room) > self._largest_sent:
            self._largest_sent = FRAGMENT_HEADER_SIZE + min(n, room)
        pos = 0
        while pos < n:
            cut = pos + room
            if cut < n:
                aligned = (start + cut) // _GO_COVERAGE_WORD * _GO_COVERAGE_WORD - start
                if aligned > pos:
                    cut = aligned
            else:
                cut = n
            piece = chunk[pos:cut]
            self._seal(
                key,
                MESSAGE_HEADER.pack(mtype, FRAGMENT_HEADER_SIZE + len(piece), flags)
                + FRAGMENT_HEADER.pack(chain, start + pos, total)
                + piece,
                now,
            )
            pos = cut

    def _set_payload_size(self, size: int) -> None:
        # Every source already keeps to these bounds; the clamp makes "fragments always
        # have room" a property of the session rather than of each source.
        size = max(MIN_PAYLOAD_SIZE, min(size, self.options.payload_size_limit))
        self.payload_size = size
        self._emit(PayloadSizeNegotiated(size))

    def _set_state(self, new: SessionState) -> None:
        old = self.state
        if old != new:
            self.state = new
            self._emit(StateChanged(old, new))

    def _finish_close(self, reason: str) -> None:
        if self.state == SessionState.CLOSED:
            return
        self.close_reason = reason
        self._prober.stop()
        self._batch = []
        self._batch_deadline = None
        self._queued.clear()
        self._set_state(SessionState.CLOSED)
        self._emit(Closed(reason))

    def _emit(self, event: Event) -> None:
        if len(self._events) >= _MAX_EVENTS:
            self.stats.drop(DropReason.EVENT_QUEUE_FULL)
            return
        self._events.append(event)
