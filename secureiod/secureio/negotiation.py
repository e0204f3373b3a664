"""Path-size probing (PROTOCOL §8.3), sans-IO, with the fixes §12/§13 recommend.

Each side probes on its own and answers the peer's pings. A round sends four sizes between
``min`` and ``max`` (each ``redundancy`` times, back to back), collects the pongs, and
narrows the range around the largest size that came back. The size sequence is the
reference's exactly (tests pin the §8.3 worked examples and the Go capture), because a Go
peer computes ``E = min(its largest, ours)`` from the END we send, and both sides should
land on the same answer for a symmetric path.

Where we deliberately differ from the Go reference:

* Reaching ``max_iterations`` finishes *with* END (§13 item 18: Go stops without one and
  both sides hang in Negotiating forever).
* Late pongs, pongs we never asked for, and ENDs that arrive before ``start`` or after
  finishing never block or fail anything (§13 item 19). An END that arrives before
  ``start`` is remembered: the peer may well finish before our own key exchange confirms.
* EMSGSIZE on a probe lowers a ceiling instead of closing the session (§13 item 20).
* A read timeout after a size has already been verified finishes with that size (the
  result is a lower bound anyway; the Go option docs describe this "best yet found"
  intent, the Go code fails instead). Without any verified size it fails.
* Only pongs that echo a ping we sent count, so a peer cannot inflate our result beyond
  what we probed, and the bookkeeping stays bounded.
* A peer's END below ``MIN_PAYLOAD_SIZE`` is no result: E is then our own measurement.
  No honest peer reports less than the smallest size it probed, and such a size would
  make E useless (no room after a fragment header, thousands of fragments per message).
* A re-negotiation of an established session (``current_size``: after a peer restart)
  never fails on a timeout: it finishes with the best size known, at worst the one in
  use, and sends END, so the session keeps working and a restarted peer can finish.
* END goes out again, one copy each, ``END_RESEND_DELAYS`` after the first three. Go
  sends its three back to back and never again, so a loss burst that takes all three
  leaves the peer in Negotiating although we are established (seen under 5 % loss: the
  peer waited until our dead-peer check restarted the session). Both implementations act
  on the first END only, so the copies change nothing for a peer that has one; a Go peer
  that blocks on an END (its negotiation disabled, §13 item 19) blocks on the first three.

Time is the caller's ``now`` (seconds); nothing here reads a clock or logs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .negotiation_message import (
    NegotiationControl,
    NegotiationProbe,
    decode_negotiation,
    encode_ping,
    pong_for,
)

MIN_PROBE_SIZE = 147
"""The smallest size the reference probes: ``min = 147`` in §8.3."""
MIN_PAYLOAD_SIZE = MIN_PROBE_SIZE
"""The smallest E a session ever uses, and the smallest END value believed from a peer.

Why not the size a 576-byte IPv4 path carries (495), or a 1280-byte IPv6 one (1179)? The
§8.3 rounds first try 1392, 977, 562 and 147, so on any path whose datagrams stop below
615 bytes (the IPv4 minimum of 576 among them) an honest peer, Go or ours, ends on 147: a
higher floor would refuse honest answers. Nothing is gained against a hostile peer either,
which can bring E to 147 by not answering larger pings. At 147, a fragment carries 123
bytes: a 1400-byte packet takes 12 fragments, a 64 KiB message 533. The configuration and
``secureioctl cat`` accept no smaller payload limit either."""
_WAIT_FACTOR = 3
"""The window lasts 3 times the delay of the first pong of the round (Go's constant)."""
_MINIMAL_WAIT = 0.001
"""Plus 1 ms, so a near-zero RTT still leaves the other pongs time to arrive."""
_PINGS_PER_ROUND = 3
"""Go's ``negotiationPingsPerIteration``: the range is cut in 3 steps, i.e. 4 sizes."""
END_RESEND_DELAYS = (0.25, 1.0, 3.0)
"""Seconds after finishing at which one more copy of our END is sent (§8.3 sends only
the first ``redundancy`` copies, back to back). Spread out so that a burst of loss or a
short outage does not take them all; bounded, so a finished negotiation goes quiet."""

REASON_READ_TIMEOUT = "negotiation read timeout"
REASON_TOTAL_TIMEOUT = "negotiation total timeout"
REASON_TOO_SMALL = "negotiation: the path refuses even the minimal probe"


@dataclass(frozen=True)
class NegotiationOptions:
    """Tuning of the probing; the defaults are the reference's (§11.2)."""

    enabled: bool = True
    read_timeout: float = 60.0
    """No pong for this long while collecting ends the probing; ``<= 0`` disables it
    (Go's documented meaning; its code fires at once instead, §8.3)."""
    total_timeout: float = 300.0
    """Bound on the whole negotiation including the wait for the peer's END; ``<= 0``
    disables it."""
    max_iterations: int = 4
    redundancy: int = 3
    """Each ping (and our END) is sent this many times, against loss."""

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be at least 1")
        if self.redundancy < 1:
            raise ValueError("redundancy must be at least 1")


class Negotiator:
    """One session's probing state machine. Feed it messages and timer ticks; drain
    ``take_outgoing`` after every call and send each payload as its own NEGOTIATION packet.
    """

    def __init__(
        self,
        payload_size_limit: int,
        options: NegotiationOptions,
        *,
        current_size: int | None = None,
    ) -> None:
        """``current_size``: the size an established session already uses, for a
        re-negotiation (the peer restarted). Timeouts then finish with what is known
        instead of failing: the session works at that size, and closing it because the
        path could not be sized again would cost more than keeping it."""
        if options.enabled and payload_size_limit < MIN_PROBE_SIZE:
            raise ValueError(
                f"payload_size_limit {payload_size_limit} is below the minimal probe "
                f"({MIN_PROBE_SIZE}); disable negotiation for such a path"
            )
        self._limit = payload_size_limit
        self._opts = options
        self._current_size = (
            None
            if current_size is None
            else max(MIN_PAYLOAD_SIZE, min(current_size, payload_size_limit))
        )
        self.timed_out: str | None = None
        """The timeout (a ``REASON_*``) a re-negotiation finished on instead of failing."""
        self.local_finished = False
        self.peer_finished = False
        self.failed: str | None = None
        self.local_largest = 0
        """Largest verified pong size not above the ceiling: what our END reports (or, for
        a re-negotiation that timed out without any, the size in use)."""
        self.remote_largest = 0
        """The peer's reported largest size (overwritten by each control, frozen at END)."""
        self.end_refused = False
        """The peer's END reported less than ``MIN_PAYLOAD_SIZE``: no honest peer does."""
        self.ignored_pongs = 0
        """Pongs that arrived late, before start, or that echo no ping of ours."""
        self._outgoing: list[bytes] = []
        self._end: bytes = b""
        self._end_resends: list[float] = []
        """Times (seconds) of the END copies still to send, earliest first."""
        self.end_resend_at: float | None = None
        """The next of those, or None: a plain attribute, read by the session on every
        wake-up to know whether a finished negotiator still needs its timer."""
        self._started = False
        self._start_time = 0.0
        self._ceiling = payload_size_limit
        """P, lowered by every EMSGSIZE report: we never probe above it."""
        self._sent: set[tuple[int, int]] = set()
        """(iteration, size) of every ping sent: a pong must echo one of these."""
        self._verified: set[int] = set()
        """Sizes that made the round trip."""
        # Current round.
        self._iter = 0
        self._min = MIN_PROBE_SIZE
        self._max = payload_size_limit
        self._step = 0.0
        self._round_sizes: tuple[int, ...] = ()
        self._collecting = False
        self._collect_start = 0.0
        self._first_pong_delay: float | None = None
        self._collected: set[int] = set()
        self._last_pong = 0.0

    # -- results ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.local_finished and self.peer_finished

    @property
    def remote_ignored(self) -> bool:
        """The peer's END reported less than ``MIN_PAYLOAD_SIZE`` (or it sent none before a
        re-negotiation gave up waiting): its value plays no part in ``result``."""
        return self.peer_finished and self._opts.enabled and self.remote_largest < MIN_PAYLOAD_SIZE

    @property
    def result(self) -> int | None:
        """E = min(local_largest, remote_largest) once both sides have finished; only
        local_largest when the peer's value is ignored. 0: nothing was verified (the caller
        keeps the size it has)."""
        if not self.done:
            return None
        if not self._opts.enabled:
            return self._limit
        if self.remote_ignored:
            return self.local_largest
        return min(self.local_largest, self.remote_largest)

    # -- inputs -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin probing (the session's first key-exchange confirmation). Idempotent.

        Disabled: both sides count as finished at once with E = P and no END is sent,
        because a peer with negotiation disabled expects none.
        """
        if self._started:
            return
        self._started = True
        self._start_time = now
        if not self._opts.enabled:
            self.local_finished = True
            self.peer_finished = True
            self.local_largest = self.remote_largest = self._limit
            return
        self._max = min(self._max, self._ceiling)
        self._start_round(now)

    def handle_message(self, payload: bytes | memoryview, now: float) -> None:
        """A NEGOTIATION message from the peer. Raises ``MalformedError`` for garbage
        before touching any state, so the caller can count and drop it."""
        self.handle_decoded(decode_negotiation(payload), payload, now)

    def handle_decoded(
        self,
        msg: NegotiationControl | NegotiationProbe,
        payload: bytes | memoryview,
        now: float,
    ) -> None:
        """``handle_message`` for a caller that already decoded ``payload`` (the session
        decodes once to tell mid-session probe answers from the §8 negotiation's)."""
        self._poll(now)
        if isinstance(msg, NegotiationControl):
            self._on_control(msg)
        elif not msg.is_pong:
            # Answered always (before start, while probing, after finishing): the peer's
            # probing depends on it and answering costs nothing.
            self._outgoing.append(pong_for(payload))
        else:
            self._on_pong(msg, now)

    def report_too_big(self, payload_size: int, now: float) -> None:
        """The I/O layer got EMSGSIZE sending a negotiation payload of this size.

        The local kernel refuses that size, so nothing at or above it can be E: lower the
        ceiling, forget verified sizes above it, and if no ping of the current round can
        be answered any more, start the next round at once instead of waiting for a
        timeout. Only a ceiling below the minimal probe fails the negotiation: then no
        size could ever be verified.
        """
        self._poll(now)
        new_ceiling = payload_size - 1
        if new_ceiling >= self._ceiling:
            return  # a repeat of an already-known limit (redundant copies)
        self._ceiling = new_ceiling
        self.local_largest = self._best_verified()
        if self.local_finished or self.failed is not None:
            return
        if new_ceiling < MIN_PROBE_SIZE:
            self._fail(REASON_TOO_SMALL)
            return
        self._max = min(self._max, new_ceiling)
        if not self._collecting:
            return
        if self._first_pong_delay is None and all(s > new_ceiling for s in self._round_sizes):
            self._move_on(now)

    def handle_timer(self, now: float) -> None:
        self._poll(now)

    # -- outputs ------------------------------------------------------------------------

    def take_outgoing(self) -> list[bytes]:
        out, self._outgoing = self._outgoing, []
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline: window close, read timeout, total timeout, or the next
        copy of our END (which outlives ``done``)."""
        if not self._started or self.failed is not None or self.done:
            return self.end_resend_at
        deadlines: list[float] = []
        if self.end_resend_at is not None:
            deadlines.append(self.end_resend_at)
        if self._opts.total_timeout > 0:
            deadlines.append(self._start_time + self._opts.total_timeout)
        if self._collecting:
            window = self._window_deadline()
            if window is not None:
                deadlines.append(window)
            read = self._read_deadline()
            if read is not None:
                deadlines.append(read)
        return min(deadlines) if deadlines else None

    # -- internals ----------------------------------------------------------------------

    def _window_deadline(self) -> float | None:
        if self._first_pong_delay is None:
            return None
        return self._collect_start + _WAIT_FACTOR * self._first_pong_delay + _MINIMAL_WAIT

    def _read_deadline(self) -> float | None:
        if self._opts.read_timeout <= 0:
            return None
        return self._last_pong + self._opts.read_timeout

    def _poll(self, now: float) -> None:
        """Fire whatever deadline has passed. Called before every input too, so a caller
        that is late with ``handle_timer`` still sees the events in time order."""
        if self.end_resend_at is not None and now >= self.end_resend_at:
            self._resend_end(now)
        if not self._started or self.failed is not None or self.done:
            return
        total = self._opts.total_timeout
        if total > 0 and now >= self._start_time + total:
            if self._current_size is None:
                self._fail(REASON_TOTAL_TIMEOUT)
                return
            # Re-negotiating: stop waiting (for pongs, or for the peer's END).
            self.timed_out = REASON_TOTAL_TIMEOUT
            if not self.local_finished:
                self._finish_with_best(now)
            self.peer_finished = True
            return
        if not self._collecting:
            return
        window = self._window_deadline()
        read = self._read_deadline()
        if window is not None and now >= window and (read is None or window <= read):
            self._close_window(now)
        elif read is not None and now >= read:
            self._read_timed_out(now)

    def _on_control(self, msg: NegotiationControl) -> None:
        if self.peer_finished:
            # The peer's END fixed its value; Go never sends controls after END, and E
            # must not move after the session has been established on it.
            return
        self.remote_largest = msg.largest
        if msg.end:
            self.peer_finished = True
            self.end_refused = msg.largest < MIN_PAYLOAD_SIZE

    def _on_pong(self, msg: NegotiationProbe, now: float) -> None:
        if (
            not self._started
            or self.local_finished
            or self.failed is not None
            or (msg.iteration, msg.size) not in self._sent
        ):
            self.ignored_pongs += 1
            return
        size = msg.size
        self._verified.add(size)
        if self.local_largest < size <= self._ceiling:
            self.local_largest = size
        if not self._collecting:
            return
        self._collected.add(size)
        self._last_pong = now
        if self._first_pong_delay is None and msg.iteration == self._iter:
            self._first_pong_delay = now - self._collect_start

    def _best_verified(self) -> int:
        return max((s for s in self._verified if s <= self._ceiling), default=0)

    def _start_round(self, now: float) -> None:
        lo, hi = self._min, self._max
        if hi - lo <= 3:
            self._finish(now)
            return
        step = (hi - lo) / _PINGS_PER_ROUND
        # The same float expression as the reference, so sizes match a Go peer's exactly.
        sizes = tuple(lo + int(0.999 + step * i) for i in range(_PINGS_PER_ROUND, -1, -1))
        for size in sizes:
            ping = encode_ping(self._iter, size)
            self._outgoing.extend([ping] * self._opts.redundancy)
            self._sent.add((self._iter, size))
        self._step = step
        self._round_sizes = sizes
        self._collecting = True
        self._collect_start = now
        self._last_pong = now
        self._first_pong_delay = None
        self._collected = set()

    def _close_window(self, now: float) -> None:
        """§8.3 after the collection: narrow the range around the largest pong."""
        self._collecting = False
        candidates = [s for s in self._collected if s <= self._ceiling]
        next_min = max(candidates, default=0)
        if next_min < self._min:
            # Only possible when an EMSGSIZE lowered the ceiling below this round's
            # answers: restart below the ceiling.
            self._move_on(now)
            return
        next_max = next_min + int(self._step + 1)
        if next_min == self._min or next_min >= self._ceiling:
            self._finish(now)
            return
        self._iter += 1
        self._min = next_min
        # The reference's re-widening: a lost pong may have hidden a larger good size.
        self._max = 2 * next_max if next_max >= self._max else next_max + 1
        self._max = min(self._max, self._ceiling)
        if self._iter >= self._opts.max_iterations:
            self._finish(now)  # with END, unlike the reference (§13 item 18)
            return
        self._start_round(now)

    def _move_on(self, now: float) -> None:
        """Start the next round below the ceiling without this round's answer."""
        self._collecting = False
        self._iter += 1
        self._min = max(MIN_PROBE_SIZE, self._best_verified())
        self._max = self._ceiling
        if self._iter >= self._opts.max_iterations:
            self._finish(now)
            return
        self._start_round(now)

    def _read_timed_out(self, now: float) -> None:
        """No pong for ``read_timeout``. A verified size is still a valid lower bound, so
        finish with it; with none the path (or peer) is unusable."""
        if self.local_largest >= MIN_PROBE_SIZE:
            self._finish(now)
        elif self._current_size is not None:
            self.timed_out = REASON_READ_TIMEOUT
            self._finish_with_best(now)
        else:
            self._fail(REASON_READ_TIMEOUT)

    def _finish_with_best(self, now: float) -> None:
        """A re-negotiation that cannot finish on its own: END with the largest verified
        size, else the size the session already uses (it works, or the prober will see)."""
        if self.local_largest < MIN_PROBE_SIZE:
            assert self._current_size is not None
            self.local_largest = min(self._current_size, self._ceiling)
        self._finish(now)

    def _finish(self, now: float) -> None:
        self._collecting = False
        self.local_finished = True
        self._end = NegotiationControl(self.local_largest, end=True).encode()
        self._outgoing.extend([self._end] * self._opts.redundancy)
        self._end_resends = [now + delay for delay in END_RESEND_DELAYS]
        self.end_resend_at = self._end_resends[0] if self._end_resends else None

    def _resend_end(self, now: float) -> None:
        """One copy for all that are due: copies sent together are lost together, so a
        caller late with its timer gains nothing from a second one."""
        resends = self._end_resends
        while resends and resends[0] <= now:
            resends.pop(0)
        self._outgoing.append(self._end)
        self.end_resend_at = resends[0] if resends else None

    def _fail(self, reason: str) -> None:
        self._collecting = False
        self.failed = reason


__all__ = [
    "END_RESEND_DELAYS",
    "MIN_PAYLOAD_SIZE",
    "MIN_PROBE_SIZE",
    "NegotiationOptions",
    "Negotiator",
    "REASON_READ_TIMEOUT",
    "REASON_TOO_SMALL",
    "REASON_TOTAL_TIMEOUT",
]
