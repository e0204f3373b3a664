"""Signed X25519 key exchange and the four key slots (PROTOCOL §6.4, §7), hardened per §12.

Wire-compatible with the reference, but:

* the signature is checked against the pinned key **first**; a message that fails it, or
  carries the wrong AnswersMode, a low-order key, or an older SessionID, changes nothing;
* after a local rotation we keep **sending** under the previous local key until the peer
  has shown it knows the new one (an answer, or a session packet opened by a slot built on
  the new key), so the peer never sees packets it cannot open (§13 item 13);
* no new local key is generated while a rotation is unconfirmed, so the peer never falls
  two generations behind;
* every X25519 key a remote session has shown is remembered (the newest
  ``max_remote_keys``), and a message carrying one of them again is refused instead of
  moving ``remoteNext`` back (§13 item 9): the message has no counter or timestamp that
  orders keys within a session, so memory is the only way to tell an old key from a new one;
* a new remote SessionID is accepted only from a correctly signed message with a larger
  CreatedAt (the peer restarted, §13 item 10), and then the caller resets receive state;
  the restarted peer can only know our newest key, so from then on we send under it;
* a key this session of ours never saw may still be old (shown before our session began,
  or lost on the way, then replayed). If the peer keeps sealing with the previous key and
  never with the new one, we ask (a request) and take the previous key back when the
  peer's answer carries it: a fraction of a second of our traffic lost, not the whole
  time until the peer's next rotation or restart;
* what could change nothing even if it were signed (an older SessionID, a key this
  remote session already showed, the exact bytes of a message already checked) is refused
  by ``triage`` before the caller spends any of its signature-check budget on it.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from .crypto import RandomSource, x25519_private_from_random, x25519_public
from .errors import InvalidKeyError
from .identity import Identity, PublicKey
from .keys import PskKeys, derive_cipher_key
from .kx_message import AnswersMode, KeyExchangeMessage
from .packet import PacketKey
from .wire import SessionID

SLOT_RB: Final = 0
SLOT_RL: Final = 1
SLOT_RR: Final = 2
SLOT_PREV: Final = 3
_FINGERPRINT: Final = 8
"""Bytes of an X25519 public key kept to recognise it again. The peer's keys are random
points chosen by the peer and signed by it, so a false match among 4096 is ~2^-52."""
_NUDGES: Final = 2
"""Requests sent while the peer's newest key goes unused and its previous one is still
used (at most one a retry interval): the answer tells which key the peer has."""
_CHECKED_MESSAGES: Final = 64
"""Exact key-exchange payloads remembered as verified (the peer's retransmissions and
answers repeat byte for byte: Ed25519 signatures are deterministic) or as forged."""


@dataclass(frozen=True, slots=True)
class KeyExchangeOptions:
    key_update_interval: float = 60.0
    retry_interval: float = 1.0
    first_retry_interval: float = 0.25
    """How often the first request of a session is re-sent during its first
    ``4 * retry_interval`` seconds, until answered (then every ``retry_interval``). A
    lost first request then costs a quarter second instead of a second; and a peer whose
    signature-check budget is being spent by a flood of forged key exchanges (it can only
    check a share of what arrives) gets four times the chances to see our restart."""
    timeout: float | None = 60.0
    """Seconds an unconfirmed rotation may wait before the session fails; ``None`` retries
    forever (what a daemon wants: the peer may come back)."""
    answers_mode: AnswersMode = AnswersMode.ANSWER_AND_WAIT
    min_answer_interval: float = 0.2
    """Answer a retransmitted request at most this often, so replays cannot make us a
    packet reflector; a changed key is always answered at once."""
    max_remote_keys: int = 4096
    """How many X25519 keys of one remote session are remembered (8 bytes each), so that
    none of them is accepted again. At one rotation a minute that is the last ~68 hours;
    a key older than that could be replayed once (its only effect: our sending breaks
    until the peer's next rotation or restart), which needs that long a capture."""


class KxOutcome(enum.Enum):
    """What one key-exchange message did; the first three are signed by the pinned key.

    The session needs "signed" and "changed the key state" apart: a signed message can be
    a replay (anyone who saw it can send it again from anywhere), so only a change may
    count as fresh evidence of where the peer is.
    """

    ACCEPTED = "accepted"
    """A new remote key: the key state changed."""
    PEER_RESTARTED = "peer-restarted"
    """A new remote SessionID (larger CreatedAt): the key state changed."""
    RESTORED = "restored"
    """The previous remote key again, which the peer evidently still uses while the newer
    one was never used: the newer one was an old key replayed. The key state changed
    back; no proof of freshness (it may itself be a replay, and harmless)."""
    UNCHANGED = "unchanged"
    """Signed, but carries the remote key we already use: a retransmission or a replay.
    It may still be answered and may confirm our rotation, but proves nothing fresh."""
    BAD_SIGNATURE = "kx-bad-signature"
    MODE_MISMATCH = "kx-mode-mismatch"
    BAD_KEY = "kx-bad-key"
    STALE_SESSION = "kx-stale-session"
    """An older SessionID than the remote session we know (refused unchecked)."""
    REPLAYED = "kx-replayed"
    """A key this remote session showed before and moved past (refused unchecked)."""


@dataclass(slots=True)
class _Slots:
    """The X25519 inputs and the session keys derived from them."""

    local_prev: bytes | None = None
    local_next: bytes | None = None
    remote_prev: bytes | None = None
    remote_next: bytes | None = None
    cipher_keys: dict[int, bytes] = field(default_factory=dict)


class KeyExchanger:
    """One side's key-exchange state machine; the session feeds it and drains its outbox."""

    def __init__(
        self,
        identity: Identity,
        remote_identity: PublicKey | None,
        local_session_id: SessionID,
        options: KeyExchangeOptions,
        psk: PskKeys | None,
        random: RandomSource,
    ) -> None:
        self._identity = identity
        self.remote_identity = remote_identity
        self._local_sid = local_session_id
        self._local_sid_bytes = local_session_id.to_bytes()
        self._opt = options
        self._psk = psk
        self._random = random
        self._slots = _Slots()
        self.remote_session_id: SessionID | None = None
        self._seen_remote = _KeyMemory(options.max_remote_keys)
        self._checked: OrderedDict[bytes, bool] = OrderedDict()
        """Exact payloads already checked against the pinned key: True verified."""

        self.pending_rotation = False
        """Our ``local_next`` is not yet confirmed by the peer (drives retries/timeout)."""
        self.send_confirmed = False
        """Sending uses ``local_next``: the peer has shown it knows our newest key."""
        self.confirmed_once = False
        self.failed: str | None = None
        self.rotations = 0
        self.remote_rotations = 0

        self._started = False
        self._start_time = 0.0
        self._next_rotation: float | None = None
        self._next_retry: float | None = None
        self._deadline: float | None = None
        self._last_answer: tuple[bytes, float] | None = None
        self._outbox: list[bytes] = []

        self._adopted_at = 0.0
        """When ``remote_next`` was taken."""
        self._next_used_at: float | None = None
        """The last session packet opened under a slot built on ``remote_next`` since."""
        self._prev_used_at: float | None = None
        """The same for ``remote_prev`` (also from before, while it was ``remote_next``)."""
        self._nudge_at: float | None = None
        self._nudges_left = 0
        self.watching = True
        """The caller should report which slot opens each session packet
        (``note_session_packet``): our newest key or the peer's is not yet seen in use."""

        self.recv_keys: list[PacketKey] = []
        """Session-class keys to try on receipt, in slot order RB, RL, RR, PREV."""
        self.recv_slot_ids: list[int] = []
        self.send_key: PacketKey | None = None
        self.keys_version = 0
        """Bumped whenever ``recv_keys``/``send_key`` change, so callers can cache."""

    # -- inputs -----------------------------------------------------------------------

    def start(self, now: float) -> None:
        if self._started:
            return
        self._started = True
        self._start_time = now
        self._rotate(now)
        self._next_rotation = now + self._opt.key_update_interval

    def triage(self, msg: KeyExchangeMessage, payload: bytes) -> KxOutcome | None:
        """The refusal ``handle_message`` would reach whatever the signature, decided
        without checking it; None when the message needs the full treatment.

        For the caller's budget of signature checks: an older SessionID, a key this remote
        session already moved past, or the exact bytes of a message that failed the check
        before change nothing even if signed, so a flood of them (replays of old sessions,
        one forgery sent again and again) must not cost a check or crowd out the message
        that matters (a restarted peer's first request). ``payload``: the 146 bytes.
        """
        sid = self.remote_session_id
        if sid is not None:
            if msg.session_id != sid:
                if msg.session_id.created_at <= sid.created_at:
                    return KxOutcome.STALE_SESSION
            elif (
                msg.x25519_public != self._slots.remote_next
                and msg.x25519_public in self._seen_remote
                and not self._may_restore(msg.x25519_public)
            ):
                return KxOutcome.REPLAYED
        if self._checked.get(payload) is False:
            return KxOutcome.BAD_SIGNATURE
        return None

    def is_verified(self, payload: bytes) -> bool:
        """These exact bytes passed the signature check against the pinned key before
        (the peer's retransmissions repeat them): checking them again would cost a
        signature check for nothing."""
        return self._checked.get(payload) is True

    def handle_message(
        self,
        msg: KeyExchangeMessage,
        now: float,
        payload: bytes | None = None,
        heard_at: float | None = None,
    ) -> KxOutcome:
        """Apply one decoded key-exchange message; the order of checks is the hardening.

        ``payload`` (its 146 bytes) lets the result of the signature check be remembered
        for those exact bytes. ``heard_at``: when the caller's last fresh session packet
        arrived (while not ``watching``, that is when the peer last used ``remote_next``).
        """
        if not self._started:
            self.start(now)
        if not self.watching and heard_at is not None:
            self._next_used_at = heard_at
        pinned = self.remote_identity
        if not (payload is not None and pinned is not None and self.is_verified(payload)):
            signer = pinned if pinned is not None else _public_key_or_none(msg.identity_key)
            valid = signer is not None and msg.verify(signer)
            if payload is not None and pinned is not None:
                self._remember_check(payload, valid)
            if not valid:
                return KxOutcome.BAD_SIGNATURE
        else:
            signer = pinned
        if msg.answers_mode != self._opt.answers_mode:
            return KxOutcome.MODE_MISMATCH
        outcome = KxOutcome.UNCHANGED
        sid = self.remote_session_id
        restarted = False
        if sid is not None and msg.session_id != sid:
            if msg.session_id.created_at <= sid.created_at:
                return KxOutcome.STALE_SESSION
            restarted = True
        key = msg.x25519_public
        s = self._slots
        if not restarted and self._may_restore(key):
            # The newer remote key went unused while the previous one is still used: take
            # the previous one back. The newer one stays known, so it cannot come back as
            # new; and if it was the peer's real newest key after all (its rotation waited
            # for our answer), the peer now uses it, and the same rule brings it back.
            keys = self._derive(s.local_prev, s.local_next, s.remote_next, key)
            s.remote_prev, s.remote_next, s.cipher_keys = s.remote_next, key, keys
            self._adopted(now, prev_used_at=None)
            self._rebuild_packet_keys()
            outcome = KxOutcome.RESTORED
        elif not restarted and key != s.remote_next and key in self._seen_remote:
            return KxOutcome.REPLAYED
        elif restarted or key != s.remote_next:
            # A suspect ``remote_next`` (never used, while the peer kept using the previous
            # key) is replaced rather than kept as ``remote_prev``: a burst of replayed old
            # keys then cannot push the key the peer really uses out of both slots.
            keep_prev = not restarted and self._next_suspect()
            if restarted:
                remote_prev = None
            elif keep_prev:
                remote_prev = s.remote_prev
            else:
                remote_prev = s.remote_next
            # The restarted peer learns our keys only from what we send it from now on, all
            # carrying ``local_next``: ``local_prev`` is of no use to it (§13 item 13 waits
            # for proof the peer knows our newest key; a restarted peer knows no other).
            local_prev = None if restarted else s.local_prev
            try:
                keys = self._derive(local_prev, s.local_next, remote_prev, key)
            except InvalidKeyError:
                return KxOutcome.BAD_KEY
            if restarted:
                self._seen_remote.clear()
                outcome = KxOutcome.PEER_RESTARTED
                s.local_prev = None
                self.send_confirmed = True
            else:
                outcome = KxOutcome.ACCEPTED
            if pinned is None:
                self.remote_identity = signer
            self.remote_session_id = msg.session_id
            s.remote_prev, s.remote_next, s.cipher_keys = remote_prev, key, keys
            self._seen_remote.add(key)
            self.remote_rotations += 1
            if restarted:
                self._adopted(now, prev_used_at=None)
            elif not keep_prev:
                self._adopted(now, prev_used_at=self._next_used_at)
            else:
                self._adopted(now, prev_used_at=self._prev_used_at)
            self._rebuild_packet_keys()

        if self.pending_rotation and (
            msg.is_answer or self._opt.answers_mode != AnswersMode.ANSWER_AND_WAIT
        ):
            self._confirm()
        if not msg.is_answer and self._opt.answers_mode != AnswersMode.DISABLE:
            last = self._last_answer
            if last is None or last[0] != key or now - last[1] >= self._opt.min_answer_interval:
                self._last_answer = (key, now)
                self._queue(is_answer=True)
        return outcome

    def note_session_packet(self, slot_id: int, now: float) -> bool:
        """A session packet (fresh, by the replay window) opened under ``slot_id``; called
        while ``watching``. True if the caller must send (a changed send key, a request).

        A slot built on our ``local_next`` proves the peer has it. The remote half shows
        which of the peer's keys it uses: if it keeps using ``remote_prev`` a while after
        we took ``remote_next``, never the latter, we ask (a request: the answer carries
        the key the peer really has, and ``handle_message`` may take it back).
        """
        changed = False
        if not self.send_confirmed and slot_id in (SLOT_RB, SLOT_RL):
            self.send_confirmed = True
            self._rebuild_packet_keys()
            if self.pending_rotation and self._opt.answers_mode != AnswersMode.ANSWER_AND_WAIT:
                self._confirm()
            changed = True
        if slot_id in (SLOT_RB, SLOT_RR):
            self._next_used_at = now
            self._nudge_at = None
        else:
            self._prev_used_at = now
            if self._nudge_at is None and self._next_suspect():
                self._nudge_at = max(now, self._adopted_at + self._opt.retry_interval)
                changed = self._nudge_at <= now and self._nudge(now)
        self.watching = not self.send_confirmed or self._next_used_at is None
        return changed

    def retry_now(self, now: float) -> bool:
        """Send the pending rotation's request again at once; False if nothing is pending.

        For a request that could not leave (the session had nowhere to send it): once the
        peer's address is known, waiting out the retry interval would only delay the
        handshake by up to a second.
        """
        if self.failed or not self.pending_rotation:
            return False
        self._queue(is_answer=False)
        self._next_retry = now + self._retry_delay(now)
        return True

    def get_timer(self) -> float | None:
        times = [
            t for t in (self._next_rotation, self._next_retry, self._deadline, self._nudge_at) if t
        ]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.failed:
            return
        if self._deadline is not None and now >= self._deadline:
            self.failed = "key exchange timeout"
            self._next_retry = self._next_rotation = self._deadline = None
            return
        if self._next_rotation is not None and now >= self._next_rotation:
            self._next_rotation += self._opt.key_update_interval
            if self._next_rotation <= now:  # a long stall: do not replay every missed tick
                self._next_rotation = now + self._opt.key_update_interval
            if self.pending_rotation:
                self._queue(is_answer=False)
            else:
                self._rotate(now)
        if self._nudge_at is not None and now >= self._nudge_at:
            self._nudge(now)
        if self._next_retry is not None and now >= self._next_retry:
            if self.pending_rotation:
                self._queue(is_answer=False)
                self._next_retry = now + self._retry_delay(now)
            else:
                self._next_retry = None

    def take_outgoing(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    # -- internals --------------------------------------------------------------------

    def _remember_check(self, payload: bytes, valid: bool) -> None:
        checked = self._checked
        checked[payload] = valid
        checked.move_to_end(payload)
        if len(checked) > _CHECKED_MESSAGES:
            checked.popitem(last=False)

    def _next_suspect(self) -> bool:
        """Is ``remote_next`` unused while the peer used ``remote_prev`` shortly before we
        took it, or since? Then the peer still holds ``remote_prev``: either it has not
        switched yet (its rotation waits for our answer) or ``remote_next`` was an old key
        replayed. (Half a rotation interval: the peer makes a new key only a rotation
        interval after the previous one was confirmed, so a key used that recently is one
        it still holds.)"""
        used = self._prev_used_at
        if used is None or self._next_used_at is not None or self._slots.remote_prev is None:
            return False
        return self._adopted_at - used < self._opt.key_update_interval / 2

    def _may_restore(self, key: bytes) -> bool:
        """May ``key`` come back? Only the previous remote key, while the newer is suspect."""
        return key == self._slots.remote_prev and self._next_suspect()

    def _nudge(self, now: float) -> bool:
        """While ``remote_next`` is suspect, send a request now and then: the answer
        carries the key the peer really has (``handle_message`` takes it back if it is
        ``remote_prev``). True if one was queued."""
        self._nudge_at = None
        opt = self._opt
        if (
            not self._next_suspect()
            or self._nudges_left <= 0
            or opt.answers_mode == AnswersMode.DISABLE  # no answers would come
            or self.failed
        ):
            return False
        self._nudges_left -= 1
        self._queue(is_answer=False)
        self._nudge_at = now + opt.retry_interval
        return True

    def _adopted(self, now: float, *, prev_used_at: float | None) -> None:
        """A new ``remote_next``: not yet seen in use. If ``remote_prev`` is, a request
        goes out a retry interval from now unless the peer uses the new key by then."""
        self._adopted_at = now
        self._next_used_at = None
        self._prev_used_at = prev_used_at
        self._nudges_left = _NUDGES
        self._nudge_at = now + self._opt.retry_interval if self._next_suspect() else None
        self.watching = True

    def _retry_delay(self, now: float) -> float:
        opt = self._opt
        if not self.confirmed_once and now - self._start_time < 4 * opt.retry_interval:
            return min(opt.first_retry_interval, opt.retry_interval)
        return opt.retry_interval

    def _rotate(self, now: float) -> None:
        s = self._slots
        new = x25519_private_from_random(self._random)
        keys = self._derive(s.local_next, new, s.remote_prev, s.remote_next)
        s.local_prev, s.local_next, s.cipher_keys = s.local_next, new, keys
        self._local_public = x25519_public(new)
        self.pending_rotation = True
        self.send_confirmed = False
        self.watching = True
        self.rotations += 1
        self._rebuild_packet_keys()
        self._queue(is_answer=False)
        self._next_retry = now + self._retry_delay(now)
        timeout = self._opt.timeout
        self._deadline = now + timeout if timeout is not None else None

    def _confirm(self) -> None:
        self.pending_rotation = False
        self.confirmed_once = True
        self._deadline = None
        self._next_retry = None
        if not self.send_confirmed:
            self.send_confirmed = True
            self.watching = self._next_used_at is None
            self._rebuild_packet_keys()

    def _derive(
        self,
        local_prev: bytes | None,
        local_next: bytes | None,
        remote_prev: bytes | None,
        remote_next: bytes | None,
    ) -> dict[int, bytes]:
        """All four slot keys for a candidate state; raises before anything is changed."""
        pairs = {
            SLOT_RB: (local_next, remote_next),
            SLOT_RL: (local_next, remote_prev),
            SLOT_RR: (local_prev, remote_next),
            SLOT_PREV: (local_prev, remote_prev),
        }
        old = self._slots
        old_pairs = {
            SLOT_RB: (old.local_next, old.remote_next),
            SLOT_RL: (old.local_next, old.remote_prev),
            SLOT_RR: (old.local_prev, old.remote_next),
            SLOT_PREV: (old.local_prev, old.remote_prev),
        }
        reuse = {old_pairs[i]: k for i, k in old.cipher_keys.items()}
        keys: dict[int, bytes] = {}
        for slot, (priv, pub) in pairs.items():
            if priv is None or pub is None:
                continue
            cached = reuse.get((priv, pub))
            keys[slot] = cached if cached is not None else derive_cipher_key(priv, pub, self._psk)
        return keys

    def _rebuild_packet_keys(self) -> None:
        self.keys_version += 1
        s = self._slots
        rsid = self.remote_session_id
        if rsid is None:
            self.recv_keys, self.recv_slot_ids = [], []
        else:
            rsid_bytes = rsid.to_bytes()
            ids = sorted(s.cipher_keys)
            self.recv_slot_ids = ids
            self.recv_keys = [PacketKey.session(s.cipher_keys[i], rsid_bytes) for i in ids]
        slot = SLOT_RB if self.send_confirmed else SLOT_RR
        key = s.cipher_keys.get(slot)
        self.send_key = PacketKey.session(key, self._local_sid_bytes) if key else None

    def _queue(self, *, is_answer: bool) -> None:
        msg = KeyExchangeMessage(
            self._local_sid,
            self._identity.public_key.raw,
            self._local_public,
            int(self._opt.answers_mode),
            is_answer,
        ).signed_by(self._identity)
        self._outbox.append(msg.encode())


class _KeyMemory:
    """The newest ``capacity`` keys of one remote session, as 8-byte fingerprints in one
    ring buffer (32 KB at the default 4096): a set of ``bytes`` would take ~15 times that
    per peer. Looked up by a C-speed scan, which only key exchanges ask for."""

    __slots__ = ("_capacity", "_next", "_ring")

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._ring = bytearray()
        self._next = 0

    def __len__(self) -> int:
        return len(self._ring) // _FINGERPRINT

    def __contains__(self, key: bytes) -> bool:
        fingerprint = key[:_FINGERPRINT]
        ring = self._ring
        at = ring.find(fingerprint)
        while at >= 0:
            if at % _FINGERPRINT == 0:
                return True
            at = ring.find(fingerprint, at + 1)
        return False

    def add(self, key: bytes) -> None:
        fingerprint = key[:_FINGERPRINT]
        if len(self._ring) < self._capacity * _FINGERPRINT:
            self._ring += fingerprint
            return
        at = self._next * _FINGERPRINT  # full: the oldest goes
        self._ring[at : at + _FINGERPRINT] = fingerprint
        self._next = (self._next + 1) % self._capacity

    def clear(self) -> None:
        self._ring = bytearray()
        self._next = 0


def _public_key_or_none(raw: bytes) -> PublicKey | None:
    try:
        return PublicKey(raw)
    except InvalidKeyError:
        return None
