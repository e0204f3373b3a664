"""Which session owns a datagram: many peers behind one socket.

A daemon with one UDP socket and one ``Session`` per peer has to hand every datagram to
the right session. The common case is a map lookup by source address. A datagram from an
address no session is at (a peer that roamed, or a passive peer's first contact) is
identified only by authenticated evidence, and only within a budget, because every
attempt costs a signature check or a few trial decryptions that a flood of garbage from
random addresses could otherwise buy for free:

1. a key-exchange packet (opened with the clear key or a peer's PSK aux key) whose
   identity key names a session's pinned peer and whose signature verifies; else
2. trial decryption with each session's current keys, while there are few sessions.

The budgets are priced by what the work costs (measured with the C extension): opening
a datagram under one key is 2-4 µs, an Ed25519 verification about 75 µs. A datagram of a
size no secureio packet has (shorter than a header and one message header, longer than
any session's payload limit allows) is dropped before any work. A key-exchange-sized
datagram is opened under each fallback key, one unit each of its own bucket, and must
name a configured peer's identity key before it may spend one of the
``identifications_per_second`` tokens on the signature check. Trial decryption draws one
unit per session tried from another bucket. Random garbage then never competes with a
roaming peer's key exchange, and with few sessions not with its data either.

Identification only picks the session; that session then decides on its own, by the
path-validation rules of ``Session.receive_datagram``, whether the address becomes its
endpoint. The demultiplexer mirrors the result in its address map.

The map answers "whose datagrams come from here", a session's endpoint "where do I send":
when one owner validates an address another owner's endpoint is at, the address maps to
the new owner, but the other keeps its endpoint (a datagram of one peer, held back and
sent from another peer's address, must not cut that peer off). The other stays the
address's *displaced* owner: its next authenticated datagram from there is tried against
it first (one session's keys, no token) and maps the address back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, NamedTuple, TypeVar

from .budget import TokenBucket
from .constants import KX_PACKET_SIZE, PACKET_OVERHEAD
from .errors import SecureioError
from .events import SessionState
from .identity import PublicKey
from .keys import PskKeys
from .kx_message import KeyExchangeMessage
from .packet import PacketKey, open_packet
from .path import Address, PathKey, path_key, same_path
from .rxbatch import split_run
from .session import Session, SessionOptions
from .wire import MessageType, iter_messages

__all__ = ["DemuxStats", "Demultiplexer"]

T = TypeVar("T")

_KX: Final = MessageType.KEY_EXCHANGE


@dataclass(slots=True)
class DemuxStats:
    """Counters of the demultiplexer's own decisions (each session counts its drops)."""

    unknown_source: int = 0
    """Datagrams nobody could be shown to own (garbage, strangers, stale peers)."""
    rate_limited: int = 0
    """Identifications skipped because the budget was spent: dropped unexamined."""
    key_checks: int = 0
    """Units of cheap checks done for unmapped addresses: fallback keys a key-exchange-
    sized datagram was opened with, sessions a trial decryption tried."""
    signature_checks: int = 0
    """Identification tokens spent: Ed25519 checks of key exchanges from unmapped
    addresses (the costly part; only for datagrams that passed the cheap checks)."""
    bad_size: int = 0
    """Datagrams from unmapped addresses of a size no secureio packet has: dropped before
    any work and without spending the budget (also counted in ``unknown_source``)."""
    identified_kx: int = 0
    """Owners found by a signed key exchange from an unmapped address."""
    identified_trial: int = 0
    """Owners found by trial decryption from an unmapped address."""
    reassigned: int = 0
    """A mapped address's session could not open a datagram and another owner could
    (e.g. a NAT handed the address to another peer)."""
    woken: int = 0
    """Dormant owners that got their session: a key exchange signed by their key came."""
    path_takeovers: int = 0
    """An owner validated an address the map gave another owner: the address maps to the
    new owner; the other keeps its endpoint and takes the address back with its next
    authenticated datagram from there."""


def fallback_key_for(options: SessionOptions) -> tuple[PacketKey, int]:
    """The ``fallback_key`` a session with ``options`` has, without making the session
    (its constructor derives it the same way; a test holds the two together)."""
    if options.psk is None:
        return PacketKey.clear(), 0
    psk = PskKeys.from_psk(options.psk, options.salt)
    return PacketKey.aux(psk.aux_key), psk.packet_id_mask


class Dormant(NamedTuple):
    """What identifies an owner that has no session yet (see ``add_dormant``)."""

    remote: PublicKey
    fallback: tuple[PacketKey, int]
    """What its session's ``fallback_key`` will be (``fallback_key_for``)."""
    payload_size_limit: int


class Demultiplexer(Generic[T]):
    """Maps datagrams to owners (``T``: the caller's hashable peer handle).

    Keep the address map honest by going through ``add``/``remove``/``set_endpoint``
    rather than calling ``Session.set_endpoint`` on a registered session directly.
    """

    def __init__(
        self,
        *,
        trial_peer_limit: int = 32,
        identifications_per_second: float = 500.0,
        key_checks_per_second: float = 25_000.0,
    ) -> None:
        """``trial_peer_limit``: above this many sessions an unknown address is identified
        only by key exchange, since trial decryption would cost too much per hostile
        datagram. ``identifications_per_second`` bounds the signature checks (~75 µs
        each). ``key_checks_per_second`` bounds the cheap checks: one unit per fallback key
        (clear, or a distinct PSK's aux key) a key-exchange-sized datagram is opened with,
        and per session a trial decryption tries (2-4 µs each), so at most ~0.15 s of CPU
        a second by default; the two kinds have a bucket each. Each burst is one second's
        worth."""
        self.trial_peer_limit = trial_peer_limit
        self.stats = DemuxStats()
        self._sessions: dict[T, Session] = {}
        self._by_addr: dict[PathKey, T] = {}
        self._displaced: dict[PathKey, T] = {}
        """Per address, the owner the map moved away from while its endpoint stayed there
        (at most one per address, and only at that owner's endpoint: bounded by owners)."""
        self._by_key: dict[bytes, T] = {}
        self._dormant: dict[T, Dormant] = {}
        self.wake: Callable[[T, float], Session] | None = None
        """Makes a dormant owner's session (unstarted: the datagram that woke it starts
        it); required before ``add_dormant``."""
        self._fallback_keys: list[tuple[PacketKey, int]] = []
        self._max_datagram = 0
        """The largest datagram any session's peer sends: its payload limit P + 53."""
        self._fallback_stale = False
        """Registry changed since the two above were derived: they are rebuilt on the next
        datagram that needs them, not per ``add`` (which made 10,000 adds quadratic)."""
        self._budget = TokenBucket(identifications_per_second, identifications_per_second)
        self._kx_opens = TokenBucket(key_checks_per_second, key_checks_per_second)
        self._trials = TokenBucket(key_checks_per_second, key_checks_per_second)
        """Separate, so garbage that costs trial decryptions (32 units a datagram at the
        trial limit) cannot starve the key-exchange check, which costs one."""

    # -- registry ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sessions) + len(self._dormant)

    def __contains__(self, owner: object) -> bool:
        return owner in self._sessions or owner in self._dormant

    def session(self, owner: T) -> Session:
        return self._sessions[owner]

    def owner_at(self, addr: Address) -> T | None:
        """Who the map says is at ``addr`` (for inspection and tests)."""
        return self._by_addr.get(path_key(addr))

    def add(self, owner: T, session: Session) -> None:
        """Register ``owner``'s session, replacing (not closing) any it had."""
        fallback, limit = session.fallback_key, session.options.payload_size_limit
        old = self._sessions.get(owner)
        was = self._dormant.get(owner)
        if old is not None:
            same = old.fallback_key == fallback
            same = same and old.options.payload_size_limit == limit
        else:
            same = was is not None and was[1:] == (fallback, limit)
        stale = self._fallback_stale
        self.remove(owner)
        self._sessions[owner] = session
        remote = session.remote_identity
        if remote is not None:
            self._by_key[remote.raw] = owner
        self._map(owner, session.endpoint)
        # A restart or a wake-up keeps the keys: no rebuild, so 10,000 peers waking
        # (or restarting) cost 10,000 steps, not 10,000 rebuilds of 10,000.
        self._fallback_stale = stale or not same

    def add_dormant(self, owner: T, dormant: Dormant) -> None:
        """Register ``owner`` without a session, for a peer that can only be waited for
        (no endpoint): a session costs ~10 KB and a key pair, a dormant entry ~200 bytes.
        A key exchange from an unmapped address that opens under ``dormant.fallback`` and
        is signed by ``dormant.remote`` gets it a session from ``wake``, and is fed to it."""
        assert self.wake is not None, "set Demultiplexer.wake before adding dormant owners"
        self.remove(owner)
        self._dormant[owner] = dormant
        self._by_key[dormant.remote.raw] = owner
        self._fallback_stale = True

    def is_dormant(self, owner: T) -> bool:
        return owner in self._dormant

    @property
    def fallback_keys(self) -> list[tuple[PacketKey, int]]:
        """The distinct keys a stranger's key exchange is opened with (for inspection)."""
        if self._fallback_stale:
            self._rebuild_fallback_keys()
        return list(self._fallback_keys)

    def remove(self, owner: T) -> None:
        if owner in self._sessions:
            self._forget(owner)
            self._fallback_stale = True
        dormant = self._dormant.pop(owner, None)
        if dormant is not None:
            if self._by_key.get(dormant.remote.raw) == owner:
                del self._by_key[dormant.remote.raw]
            self._fallback_stale = True

    def set_endpoint(self, owner: T, addr: Address | None) -> None:
        """The application's address for ``owner`` (configured or resolved)."""
        session = self._sessions[owner]
        before = session.endpoint
        session.set_endpoint(addr)
        self._sync(owner, before, addr)

    # -- input ------------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, addr: Address, now: float
    ) -> T | None:
        """Find the owner of ``data`` from ``addr``, feed it to that owner's session and
        return the owner (the caller then drains that session), or ``None``."""
        key = addr if len(addr) == 2 else (addr[0], addr[1], addr[3])  # path_key, inlined
        owner = self._by_addr.get(key)  # type: ignore[arg-type]
        if owner is not None:
            session = self._sessions[owner]
            if session.state is SessionState.NEW:
                session.start(now)
            stats = session.stats
            received = stats.rx_packets
            session.receive_datagram(data, addr, now)
            if stats.rx_packets != received or not session.consecutive_decrypt_failures:
                return owner  # authenticated, or opened and refused (a replay): it is ours
            return self._reconsider(owner, key, data, addr, now)  # type: ignore[arg-type]
        owner = self._identify(data, now, exclude=None)
        if owner is None:
            self.stats.unknown_source += 1
            return None
        return self._feed(owner, data, addr, now)

    def receive_run(
        self, data: bytes | bytearray | memoryview, segment_size: int, addr: Address, now: float
    ) -> list[T]:
        """``receive_datagram`` for each datagram of a run (``segment_size`` bytes back to
        back in ``data``, the last shorter: one UDP GRO read from ``addr``), with the same
        outcome, but opened in one C call by the session mapped at ``addr``
        (``Session.open_run``). Anything else (no session there, a datagram it cannot
        open, a key exchange, a changed map) goes datagram by datagram. Returns the owners
        fed, each once."""
        key = addr if len(addr) == 2 else (addr[0], addr[1], addr[3])  # path_key, inlined
        owner = self._by_addr.get(key)  # type: ignore[arg-type]
        plan = None
        if owner is not None and len(data) > segment_size > 0:
            session = self._sessions[owner]
            if session.state is SessionState.NEW:
                session.start(now)  # as receive_datagram does before the first datagram
            plan = session.open_run(data, segment_size)
        owners: list[T] = []
        if plan is None:
            for datagram in split_run(data, segment_size):
                fed = self.receive_datagram(datagram, addr, now)
                if fed is not None and fed not in owners:
                    owners.append(fed)
            return owners
        owners.append(owner)  # type: ignore[arg-type]
        stats = session.stats
        for group in plan.groups:
            if self._by_addr.get(key) == owner and self._sessions.get(owner) is session:  # type: ignore[arg-type]
                received = stats.rx_packets
                if session.receive_group(plan, group, addr, now):
                    if (
                        type(group) is tuple
                        and len(group) in (2, 4)
                        and stats.rx_packets == received
                        and session.consecutive_decrypt_failures
                    ):
                        # Not opened, or opened but refused (a replay) after failures:
                        # as in receive_datagram, look for a better owner.
                        fed = self._reconsider(owner, key, plan.datagram(group[0]), addr, now)  # type: ignore[arg-type]
                        if fed not in owners:
                            owners.append(fed)
                    continue
            for datagram in plan.group_datagrams(group):
                fed = self.receive_datagram(datagram, addr, now)
                if fed is not None and fed not in owners:
                    owners.append(fed)
        return owners

    # -- internals --------------------------------------------------------------------

    def _reconsider(
        self,
        owner: T,
        key: PathKey,
        data: bytes | bytearray | memoryview,
        addr: Address,
        now: float,
    ) -> T:
        """Nothing of ``owner``'s session opens ``data`` from its mapped address: maybe it
        is the displaced owner's (whose endpoint is still here), or the address now belongs
        to another peer (a NAT reusing a port), so look for a better owner."""
        back = self._displaced.get(key)
        if back is not None and self._sessions[back].owns_datagram(data):
            other: T | None = back
        else:
            other = self._identify(data, now, exclude=owner)
        if other is None:
            return owner
        self.stats.reassigned += 1
        return self._feed(other, data, addr, now)

    def _feed(self, owner: T, data: bytes | bytearray | memoryview, addr: Address, now: float) -> T:
        session = self._sessions[owner]
        if session.state is SessionState.NEW:  # a passive peer's first contact
            session.start(now)
        before = session.endpoint
        received = session.stats.rx_packets
        session.receive_datagram(data, addr, now)
        after = session.endpoint
        if after is not before:
            self._sync(owner, before, after)
        elif (
            session.stats.rx_packets != received
            and same_path(after, addr)
            and self._by_addr.get(path_key(addr)) != owner
        ):
            # An authenticated datagram from its own endpoint, which the map had given to
            # another owner: the address is this owner's again.
            self._map(owner, addr)
        return owner

    def _identify(
        self, data: bytes | bytearray | memoryview, now: float, exclude: T | None
    ) -> T | None:
        """Which other owner can show this datagram is theirs? Authenticated evidence
        only; the chosen session re-checks everything itself."""
        if self._fallback_stale:
            self._rebuild_fallback_keys()
        size = len(data)
        if size < PACKET_OVERHEAD or size > self._max_datagram:
            self.stats.bad_size += 1
            return None
        if size == KX_PACKET_SIZE:
            return self._identify_kx(data, now, exclude)
        if len(self._sessions) > self.trial_peer_limit:
            return None
        if not self._check(self._trials, now, len(self._sessions)):
            return None
        for owner, session in self._sessions.items():
            if owner != exclude and session.owns_datagram(data):
                self.stats.identified_trial += 1
                return owner
        return None

    def _check(self, bucket: TokenBucket, now: float, cost: int) -> bool:
        if bucket.take(now, cost):
            self.stats.key_checks += cost
            return True
        self.stats.rate_limited += 1
        return False

    def _spend(self, now: float) -> bool:
        if self._budget.take(now):
            self.stats.signature_checks += 1
            return True
        self.stats.rate_limited += 1
        return False

    def _identify_kx(
        self, data: bytes | bytearray | memoryview, now: float, exclude: T | None
    ) -> T | None:
        """The cheap checks (open under a fallback key, a configured peer's identity key,
        sealed that peer's way) come from their own budget; only a datagram that passes
        them spends an identification token, on the signature check."""
        if not self._check(self._kx_opens, now, len(self._fallback_keys)):
            return None
        for key, mask in self._fallback_keys:
            try:
                opened = open_packet(data, [key], mask)
                msg = next(iter_messages(opened.messages))
                if msg.type != _KX:
                    continue
                kx = KeyExchangeMessage.decode(msg.payload)
            except (SecureioError, StopIteration):
                continue
            owner = self._by_key.get(kx.identity_key)
            if owner is None or owner == exclude:
                return None
            dormant = self._dormant.get(owner)
            if dormant is not None:
                return self._wake(owner, dormant, kx, (key, mask), now)
            session = self._sessions[owner]
            if session.fallback_key != (key, mask):
                return None  # not how this peer's packets are sealed: its session would refuse
            remote = session.remote_identity
            if remote is None:
                return None
            if not self._spend(now):
                return None
            if not kx.verify(remote):
                return None
            self.stats.identified_kx += 1
            return owner
        return None

    def _wake(
        self,
        owner: T,
        dormant: Dormant,
        kx: KeyExchangeMessage,
        fallback: tuple[PacketKey, int],
        now: float,
    ) -> T | None:
        """The same checks a session's key exchange gets here, then its session."""
        if dormant.fallback != fallback:
            return None  # not how this peer's packets are sealed: its session would refuse
        if not self._spend(now):
            return None
        if not kx.verify(dormant.remote):
            return None
        assert self.wake is not None
        self.add(owner, self.wake(owner, now))
        self.stats.identified_kx += 1
        self.stats.woken += 1
        return owner

    def _map(self, owner: T, addr: Address | None) -> None:
        if addr is None:
            return
        key = path_key(addr)
        other = self._by_addr.get(key)
        if other is not None and other != owner:
            # The owner that just showed (or was told) it is here gets the address's
            # datagrams. The other keeps its endpoint: this may be a datagram of one peer
            # sent from another's address, and its own next datagram decides.
            if same_path(self._sessions[other].endpoint, addr):
                self._displaced[key] = other
            self.stats.path_takeovers += 1
        if self._displaced.get(key) == owner:
            del self._displaced[key]
        self._by_addr[key] = owner

    def _unmap(self, owner: T, addr: Address | None) -> None:
        if addr is None:
            return
        key = path_key(addr)
        if self._displaced.get(key) == owner:
            del self._displaced[key]
        if self._by_addr.get(key) == owner:
            del self._by_addr[key]
            back = self._displaced.pop(key, None)
            if back is not None and same_path(self._sessions[back].endpoint, addr):
                self._by_addr[key] = back  # the owner whose endpoint is still here

    def _sync(self, owner: T, before: Address | None, after: Address | None) -> None:
        self._unmap(owner, before)
        self._map(owner, after)

    def _forget(self, owner: T) -> None:
        session = self._sessions.pop(owner)
        self._unmap(owner, session.endpoint)
        remote = session.remote_identity
        if remote is not None and self._by_key.get(remote.raw) == owner:
            del self._by_key[remote.raw]

    def _rebuild_fallback_keys(self) -> None:
        """Keys that open key-exchange packets from unknown addresses: clear and each
        distinct PSK's aux key, each tried once however many peers share it. And the
        largest datagram a peer sends (payload limits must match the peer's)."""
        keys: dict[tuple[bytes | None, bytes, int], tuple[PacketKey, int]] = {}
        limit = 0
        for session in self._sessions.values():
            key, mask = session.fallback_key
            keys.setdefault((key.stream_key, key.mac_seed, mask), (key, mask))
            limit = max(limit, session.options.payload_size_limit)
        for dormant in self._dormant.values():
            key, mask = dormant.fallback
            keys.setdefault((key.stream_key, key.mac_seed, mask), (key, mask))
            limit = max(limit, dormant.payload_size_limit)
        self._fallback_keys = list(keys.values())
        self._max_datagram = PACKET_OVERHEAD + limit
        self._fallback_stale = False
