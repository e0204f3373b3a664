"""Signed X25519 key exchange and the four key slots (PROTOCOL §6.4, §7), hardened per §12.

Wire-compatible with the reference, but:

* the signature is checked against the pinned key **first**; a message that fails it, or
  carries the wrong AnswersMode, a low-order key, or an older SessionID, changes nothing;
* after a local rotation we keep **sending** under the previous local key until the peer
  has shown it knows the new one (an answer, or a session packet opened by a slot built on
  the new key), so the peer never sees packets it cannot open (§13 item 13);
* no new local key is generated while a rotation is unconfirmed, so the peer never falls
  two generations behind;
* a replayed message carrying an X25519 key this remote session has already moved past is
  ignored instead of moving ``remoteNext`` back (§13 item 9);
* a new remote SessionID is accepted only from a correctly signed message with a larger
  CreatedAt (the peer restarted, §13 item 10), and then the caller resets receive state.
"""

from __future__ import annotations

import enum
from collections import deque
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
_SEEN_KEYS: Final = 16


@dataclass(frozen=True, slots=True)
class KeyExchangeOptions:
    key_update_interval: float = 60.0
    retry_interval: float = 1.0
    timeout: float | None = 60.0
    """Seconds an unconfirmed rotation may wait before the session fails; ``None`` retries
    forever (what a daemon wants: the peer may come back)."""
    answers_mode: AnswersMode = AnswersMode.ANSWER_AND_WAIT
    min_answer_interval: float = 0.2
    """Answer a retransmitted request at most this often, so replays cannot make us a
    packet reflector; a changed key is always answered at once."""


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
    UNCHANGED = "unchanged"
    """Signed, but carries the remote key we already use: a retransmission or a replay.
    It may still be answered and may confirm our rotation, but proves nothing fresh."""
    BAD_SIGNATURE = "kx-bad-signature"
    MODE_MISMATCH = "kx-mode-mismatch"
    BAD_KEY = "kx-bad-key"
    STALE_SESSION = "kx-stale-session"
    REPLAYED = "kx-replayed"


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
        self._seen_remote: deque[bytes] = deque(maxlen=_SEEN_KEYS)

        self.pending_rotation = False
        """Our ``local_next`` is not yet confirmed by the peer (drives retries/timeout)."""
        self.send_confirmed = False
        """Sending uses ``local_next``: the peer has shown it knows our newest key."""
        self.confirmed_once = False
        self.failed: str | None = None
        self.rotations = 0
        self.remote_rotations = 0

        self._started = False
        self._next_rotation: float | None = None
        self._next_retry: float | None = None
        self._deadline: float | None = None
        self._last_answer: tuple[bytes, float] | None = None
        self._outbox: list[bytes] = []

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
        self._rotate(now)
        self._next_rotation = now + self._opt.key_update_interval

    def handle_message(self, msg: KeyExchangeMessage, now: float) -> KxOutcome:
        """Apply one decoded key-exchange message; the order of checks is the hardening."""
        if not self._started:
            self.start(now)
        pinned = self.remote_identity
        signer = pinned if pinned is not None else _public_key_or_none(msg.identity_key)
        if signer is None or not msg.verify(signer):
            return KxOutcome.BAD_SIGNATURE
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
        if not restarted and key != s.remote_next and key in self._seen_remote:
            return KxOutcome.REPLAYED
        if restarted or key != s.remote_next:
            remote_prev = None if restarted else s.remote_next
            try:
                keys = self._derive(s.local_prev, s.local_next, remote_prev, key)
            except InvalidKeyError:
                return KxOutcome.BAD_KEY
            if restarted:
                self._seen_remote.clear()
                outcome = KxOutcome.PEER_RESTARTED
            else:
                outcome = KxOutcome.ACCEPTED
            if pinned is None:
                self.remote_identity = signer
            self.remote_session_id = msg.session_id
            s.remote_prev, s.remote_next, s.cipher_keys = remote_prev, key, keys
            self._seen_remote.append(key)
            self.remote_rotations += 1
            self._rebuild_packet_keys()
        elif sid is None:
            self.remote_session_id = msg.session_id
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

    def note_session_packet(self, slot_id: int) -> None:
        """A packet opened under a slot built on ``local_next`` proves the peer has it."""
        if not self.send_confirmed and slot_id in (SLOT_RB, SLOT_RL):
            self.send_confirmed = True
            self._rebuild_packet_keys()
            if self.pending_rotation and self._opt.answers_mode != AnswersMode.ANSWER_AND_WAIT:
                self._confirm()

    def retry_now(self, now: float) -> bool:
        """Send the pending rotation's request again at once; False if nothing is pending.

        For a request that could not leave (the session had nowhere to send it): once the
        peer's address is known, waiting out the retry interval would only delay the
        handshake by up to a second.
        """
        if self.failed or not self.pending_rotation:
            return False
        self._queue(is_answer=False)
        self._next_retry = now + self._opt.retry_interval
        return True

    def get_timer(self) -> float | None:
        times = [t for t in (self._next_rotation, self._next_retry, self._deadline) if t]
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
        if self._next_retry is not None and now >= self._next_retry:
            if self.pending_rotation:
                self._queue(is_answer=False)
                self._next_retry = now + self._opt.retry_interval
            else:
                self._next_retry = None

    def take_outgoing(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    # -- internals --------------------------------------------------------------------

    def _rotate(self, now: float) -> None:
        s = self._slots
        new = x25519_private_from_random(self._random)
        keys = self._derive(s.local_next, new, s.remote_prev, s.remote_next)
        s.local_prev, s.local_next, s.cipher_keys = s.local_next, new, keys
        self._local_public = x25519_public(new)
        self.pending_rotation = True
        self.send_confirmed = False
        self.rotations += 1
        self._rebuild_packet_keys()
        self._queue(is_answer=False)
        self._next_retry = now + self._opt.retry_interval
        timeout = self._opt.timeout
        self._deadline = now + timeout if timeout is not None else None

    def _confirm(self) -> None:
        self.pending_rotation = False
        self.confirmed_once = True
        self._deadline = None
        self._next_retry = None
        if not self.send_confirmed:
            self.send_confirmed = True
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


def _public_key_or_none(raw: bytes) -> PublicKey | None:
    try:
        return PublicKey(raw)
    except InvalidKeyError:
        return None
