"""Path MTU for the life of a session: the payload size follows the path (sans-IO).

The §8 negotiation sizes the path once, at the start. Paths change afterwards (a laptop
moves to a PPPoE or mobile link, a tunnel in the middle reroutes), so an established
session keeps checking, in the spirit of Packetization-Layer PMTU Discovery (RFC 8899):

* **Signals that it shrank.** EMSGSIZE on a send (the local kernel knows a smaller path
  MTU, usually from an ICMP "fragmentation needed"/"packet too big"), with the largest
  payload the kernel will now send when the caller knows it (``data_too_big``,
  ``probe_refused``); the caller's own reading of the kernel's path MTU
  (``path_limit``); full-size datagrams that stop arriving while small ones still do (an
  ICMP black hole), found by confirmation probes; a new endpoint (``path_changed``).
* **Upward.** While the size is below the ceiling, a raise is tried 10 s after it went
  down, then at doubling intervals up to every 10 minutes (RFC 8899's PMTU_RAISE_TIMER),
  and at once when the caller sees the kernel's path MTU grow again.

Probes are §8.2 pings; the peer answers each with a pong of the same size (a secureiod
peer always does; a reference Go peer does too, because its negotiation handler stays
registered after its negotiation ended). No control or END message is ever sent
mid-session: a Go peer whose negotiation finished may block on one (PROTOCOL §13 item 19).
A pong proves the size crosses both ways; only our own sending size follows from it. Each
side sizes its own direction, so nothing needs to be agreed with the peer.

The ceiling is the session's payload limit P: a reference peer reads into a buffer of its
P + 53 bytes, and a larger datagram would be truncated there and close its session.

Everything is bounded: one probe round or confirmation at a time, confirmations at most
every ``confirm_interval`` while full-size datagrams flow (none when idle), searches drawn
from a token bucket, raises on a backoff timer. A peer cannot make us probe in a loop: what
it can do is not answer (our size goes down, and the next raise finds out), or answer
pongs only for sizes we asked for in the current round.

The floor is ``MIN_PAYLOAD_SIZE`` (the smallest size §8.3 probes): whatever the signals
say, the size never goes below it, so a fragment always has room and a message a bounded
number of them.

Time is the caller's ``now``; nothing here reads a clock, does I/O or logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .budget import TokenBucket
from .negotiation import MIN_PAYLOAD_SIZE, MIN_PROBE_SIZE
from .negotiation_message import NegotiationProbe, encode_ping

GRANULARITY: Final = 16
"""Searches stop when the bracket is narrower than this; sizes are multiples of it."""
CONFIRM_MIN_SIZE: Final = 512
"""Datagrams carrying at most this much are never confirmed: every IPv4 path carries 576
bytes (and every IPv6 path 1280), so a black hole cannot be below it."""
ITERATION_BASE: Final = 0x80000000
"""Our mid-session pings carry IterationIDs from here up: the §8.3 rounds use 0, 1, 2, ...
so a pong tells at once whose it is."""
UNDERLAY_MTU_PLATEAUS: Final = (9000, 4352, 1500, 1492, 1480, 1460, 1420, 1400, 1360, 1280, 576)
"""Common link MTUs (RFC 1191's table, plus PPPoE, tunnels and the IPv6 minimum): after an
EMSGSIZE with no better information, the size drops to the next plateau below what was
refused, and a search then looks between the two."""
_PLATEAU_OVERHEAD: Final = 48 + 53
"""IPv6 + UDP + secureio headers: the plateau guess is conservative for IPv4 paths."""

REASON_KERNEL: Final = "kernel"
REASON_TOO_BIG: Final = "too-big"
REASON_BLACK_HOLE: Final = "black-hole"
REASON_RAISE: Final = "raise"
REASON_ROAM: Final = "roam"


@dataclass(frozen=True, slots=True)
class PathMtuOptions:
    """Tuning of mid-session path MTU tracking; ``enabled`` needs negotiation enabled too
    (a peer that does not negotiate may not expect pings)."""

    enabled: bool = True
    confirm_interval: float = 1.0
    """While full-size datagrams flow, check at most this often that one still crosses."""
    confirm_failures: int = 2
    """Consecutive unanswered full-size confirmations (with the small control answered)
    that mean a black hole. After the first, a second one is sent at once."""
    raise_interval: float = 10.0
    """First upward try after the size went down; doubles after each try that finds no
    more, up to ``raise_interval_max``."""
    raise_interval_max: float = 600.0
    answer_timeout: float = 1.0
    """A probe round without any answer for this long is inconclusive (the peer or the
    whole path is away): nothing is concluded from silence."""
    min_window: float = 0.05
    """A round closes 4 first-answer delays after it was sent, but never sooner than this:
    the answers to larger pings may queue behind traffic at the peer."""
    max_rounds: int = 6
    redundancy: int = 2
    """Each search ping is sent this many times, against random loss."""
    search_burst: int = 3
    search_refill: float = 20.0
    """Seconds per new search token: at most ``search_burst`` searches at once, then one per
    this many seconds, whatever triggers them."""

    def __post_init__(self) -> None:
        if self.confirm_interval <= 0 or self.answer_timeout <= 0 or self.min_window < 0:
            raise ValueError("path MTU intervals must be positive")
        if self.raise_interval <= 0 or self.raise_interval_max < self.raise_interval:
            raise ValueError("raise_interval must be > 0 and <= raise_interval_max")
        if self.max_rounds < 1 or self.redundancy < 1 or self.confirm_failures < 1:
            raise ValueError("max_rounds, redundancy and confirm_failures must be >= 1")
        if self.search_burst < 1 or self.search_refill <= 0:
            raise ValueError("search_burst must be >= 1 and search_refill > 0")


@dataclass(slots=True)
class PathMtuStats:
    probes_sent: int = 0
    answers: int = 0
    confirmations: int = 0
    confirmations_failed: int = 0
    black_holes: int = 0
    searches: int = 0
    searches_refused: int = 0
    """Wanted but over the token budget."""
    decreases: int = 0
    increases: int = 0
    resent_messages: int = 0
    """Messages of datagrams refused with EMSGSIZE that went out again at the new size."""
    remote_sizes_ignored: int = 0
    """Negotiations whose peer END reported less than ``MIN_PAYLOAD_SIZE``: E came from our
    own probing alone (a buggy or hostile peer; an honest one never reports that)."""
    renegotiation_timeouts: int = 0
    """Re-negotiations of an established session (after a peer restart) that timed out
    or failed: the session kept going at the best size known, at worst the one it had."""


@dataclass(slots=True)
class _Round:
    iteration: int
    sizes: tuple[int, ...]
    """Descending; a confirmation is (confirm size, control size)."""
    sent_at: float
    answered: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    first_answer: float | None = None

    @property
    def decided(self) -> bool:
        """Nothing more to learn: the largest size answered, or every size settled."""
        if self.sizes[0] in self.answered:
            return True
        return all(s in self.answered or s in self.refused for s in self.sizes)


@dataclass(slots=True)
class _Search:
    lo: int
    """Believed to cross (verified only if ``best`` is set)."""
    hi: int
    """Believed not to cross (exclusive bound)."""
    reason: str
    best: int | None
    """The largest size answered in this search (or verified just before it)."""
    rounds: int = 0
    timed: bool = False
    """A raise of the raise timer: one that finds nothing backs the timer off."""


def plateau_below(payload: int) -> int:
    """The payload of the largest common link MTU whose datagram is smaller than one of
    ``payload`` bytes (see ``UNDERLAY_MTU_PLATEAUS``); at least ``MIN_PAYLOAD_SIZE``."""
    for mtu in UNDERLAY_MTU_PLATEAUS:
        size = (mtu - _PLATEAU_OVERHEAD) // GRANULARITY * GRANULARITY
        if size < payload:
            return max(MIN_PAYLOAD_SIZE, size)
    return MIN_PAYLOAD_SIZE


class PathProber:
    """One session's mid-session path MTU state machine (see the module docstring).

    The session owns the payload size E; it calls ``start(E)`` when it establishes (and
    after a re-negotiation), feeds the signals in, drains ``take_outgoing`` (ping payloads,
    each sent as its own NEGOTIATION message) and applies ``take_decision`` (a new E and
    why).
    """

    def __init__(self, ceiling: int, options: PathMtuOptions) -> None:
        self.options = options
        self.ceiling = ceiling
        """P: never probe above it (a reference peer's receive buffer is P + 53)."""
        self.size = ceiling
        """E as the session uses it now."""
        self.kernel_limit: int | None = None
        """The largest payload the local kernel will send toward the peer, when known
        (a snapshot: forgotten at each raise and path change)."""
        self.stats = PathMtuStats()
        self.srtt: float | None = None
        self._active = False
        self._round: _Round | None = None
        self._confirming = 0
        """0, or the size a confirmation round checks."""
        self._failures = 0
        self._search: _Search | None = None
        self._last_confirm = 0.0
        self._next_raise: float | None = None
        self._raise_delay = options.raise_interval
        self._searches = TokenBucket(1.0 / options.search_refill, float(options.search_burst))
        self._iteration = 0
        self._outgoing: list[bytes] = []
        self._decision: tuple[int, str] | None = None
        self._raise_asked = False
        """The caller saw the kernel's limit grow while a round was out: raise after it."""

    # -- life ---------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    @property
    def busy(self) -> bool:
        """A confirmation or search round is out."""
        return self._round is not None

    def start(self, size: int, now: float) -> None:
        """The session is established at payload size ``size`` (again): track from here."""
        self._active = self.options.enabled
        self.size = size = max(MIN_PAYLOAD_SIZE, min(size, self.ceiling))
        self._round = None
        self._search = None
        self._confirming = 0
        self._failures = 0
        self._raise_asked = False
        self._last_confirm = now
        self._raise_delay = self.options.raise_interval
        self._next_raise = now + self._raise_delay if size < self.ceiling else None

    def stop(self) -> None:
        """Nothing more until the next ``start`` (re-negotiating, closing)."""
        self._active = False
        self._round = None
        self._search = None
        self._next_raise = None

    # -- inputs -------------------------------------------------------------------------

    def owns(self, iteration: int) -> bool:
        return iteration >= ITERATION_BASE

    def on_pong(self, msg: NegotiationProbe, now: float) -> bool:
        """A pong from the peer; True when it belongs to our mid-session probing (answered
        or late), False when it is the §8 negotiation's business."""
        if not self.owns(msg.iteration):
            return False
        r = self._round
        if r is None or msg.iteration != r.iteration or msg.size not in r.sizes:
            return True  # late (its round closed) or not a size we asked for: ignored
        if msg.size in r.answered:
            return True  # a redundant copy
        r.answered.add(msg.size)
        self.stats.answers += 1
        if r.first_answer is None:
            delay = max(0.0, now - r.sent_at)
            r.first_answer = delay
            self.srtt = delay if self.srtt is None else 0.875 * self.srtt + 0.125 * delay
        if r.decided:
            self._close_round(now)
        return True

    def probe_refused(self, size: int, now: float, limit: int | None = None) -> bool:
        """EMSGSIZE for one of our pings of payload ``size``; False if no current round
        sent that size (the caller then treats it as data)."""
        r = self._round
        if r is None or size not in r.sizes:
            return False
        r.refused.add(size)
        self._learn_kernel_limit(size, limit)
        if self._confirming:
            # The kernel refuses the confirmed size: that is the EMSGSIZE signal itself.
            self._round = None
            self._confirming = 0
            self._last_confirm = now
            self.data_too_big(size, now, limit)
            return True
        if r.decided:
            self._close_round(now)
        return True

    def data_too_big(self, size: int, now: float, limit: int | None = None) -> None:
        """EMSGSIZE for a data datagram carrying ``size`` payload bytes; ``limit`` is the
        largest payload the kernel now sends toward the peer, if the caller read it.

        With a usable ``limit`` the size drops to it at once: the kernel's value comes from
        the path itself (ICMP), and confirmations check it in traffic. Without one, the size
        drops to the next common plateau below ``size`` (a further refusal steps it down
        again) and a search finds the largest size below ``size`` that crosses.
        """
        if not self._active:
            return
        self._learn_kernel_limit(size, limit)
        if limit is not None and MIN_PROBE_SIZE <= limit < size:
            if limit < self.size:
                self._decide(limit, REASON_KERNEL, now)
            return
        if size > self.size:
            return  # sized before an earlier decrease: the re-send takes care of it
        self._decide(plateau_below(size), REASON_TOO_BIG, now)
        if self._search is None:
            # Sizes above the kernel's limit are refused locally at no cost on the wire,
            # so searching the whole range is cheap and also undoes a guess that was low.
            self._begin_search(MIN_PROBE_SIZE, size, REASON_TOO_BIG, None, now)

    def path_limit(self, limit: int, now: float) -> None:
        """The caller read the kernel's path MTU toward the peer: at most ``limit`` payload
        bytes go out. Below the current size: take it at once. Above it (the kernel's
        learned path MTU expired, or the route changed): try to raise now."""
        if not self._active:
            return
        limit = max(MIN_PAYLOAD_SIZE, min(limit, self.ceiling))
        self.kernel_limit = limit
        if limit < self.size:
            self._decide(limit, REASON_KERNEL, now)
        elif limit > self.size:
            if self._round is None:
                self._begin_search(self.size, limit + 1, REASON_RAISE, self.size, now)
            else:
                self._raise_asked = True

    def path_changed(self, now: float) -> None:
        """The peer's endpoint moved: the new path is sized from scratch (up to P)."""
        if not self._active:
            return
        self.kernel_limit = None
        self._failures = 0
        if self._round is not None:
            self._round = None
            self._confirming = 0
            self._search = None
        self._begin_search(MIN_PROBE_SIZE, self.ceiling + 1, REASON_ROAM, None, now)

    def handle_timer(self, now: float, largest_sent: int) -> bool:
        """Advance: close a round whose time is up, start a raise or a confirmation when due.
        ``largest_sent`` is the largest payload sent in one datagram since the last
        confirmation began; True when a confirmation began (the caller resets it)."""
        if not self._active:
            return False
        r = self._round
        if r is not None:
            if now >= self._round_deadline(r):
                self._close_round(now)
            if self._round is not None:
                return False
        if self._next_raise is not None and now >= self._next_raise and self._round is None:
            self._next_raise = None
            self.kernel_limit = None
            self._begin_search(self.size, self.ceiling + 1, REASON_RAISE, self.size, now, free=True)
            if self._round is not None:
                return False
        if (
            self._round is None
            and largest_sent > CONFIRM_MIN_SIZE
            and now >= self._last_confirm + self.options.confirm_interval
        ):
            self._confirm(min(largest_sent, self.size), now, copies=1)
            return True
        return False

    # -- outputs ------------------------------------------------------------------------

    def get_timer(self, largest_sent: int) -> float | None:
        if not self._active:
            return None
        r = self._round
        if r is not None:
            return self._round_deadline(r)
        times = []
        if self._next_raise is not None:
            times.append(self._next_raise)
        if largest_sent > CONFIRM_MIN_SIZE:
            times.append(self._last_confirm + self.options.confirm_interval)
        return min(times) if times else None

    def take_outgoing(self) -> list[bytes]:
        out, self._outgoing = self._outgoing, []
        return out

    def take_decision(self) -> tuple[int, str] | None:
        """A new payload size and why (one of the ``REASON_*``), once."""
        d, self._decision = self._decision, None
        return d

    def outstanding(self, size: int) -> bool:
        """Is a ping of ``size`` in the current round? (For callers that only know the
        size of a refused datagram.)"""
        return self._round is not None and size in self._round.sizes

    # -- internals ----------------------------------------------------------------------

    def _learn_kernel_limit(self, refused: int, limit: int | None) -> None:
        if limit is not None and MIN_PROBE_SIZE <= limit < refused:
            self.kernel_limit = limit
        elif self.kernel_limit is None or self.kernel_limit >= refused:
            self.kernel_limit = max(MIN_PROBE_SIZE, refused - 1)

    def _decide(self, size: int, reason: str, now: float) -> None:
        size = max(MIN_PAYLOAD_SIZE, min(size, self.ceiling))
        if size == self.size:
            return
        if size < self.size:
            self.stats.decreases += 1
            self._raise_delay = self.options.raise_interval
            self._next_raise = now + self._raise_delay
        else:
            self.stats.increases += 1
            if size >= self.ceiling:
                self._next_raise = None
        self.size = size
        self._decision = (size, reason)
        self._failures = 0

    def _take_token(self, now: float) -> bool:
        if not self._searches.take(now):
            self.stats.searches_refused += 1
            return False
        return True

    def _begin_search(
        self,
        lo: int,
        hi: int,
        reason: str,
        best: int | None,
        now: float,
        *,
        free: bool = False,
    ) -> None:
        """``free``: the raise timer's own searches, already bounded by its backoff."""
        if not free and not self._take_token(now):
            if reason == REASON_RAISE and self.size < self.ceiling and self._next_raise is None:
                self._next_raise = now + self._raise_delay
            return
        self.stats.searches += 1
        self._search = _Search(lo=lo, hi=hi, reason=reason, best=best, timed=free)
        self._next_round(now)

    def _next_round(self, now: float) -> None:
        s = self._search
        assert s is not None
        top = min(s.hi - 1, self.ceiling)
        if s.reason != REASON_RAISE and self.kernel_limit is not None:
            top = min(top, self.kernel_limit)
        if top != self.ceiling:
            top = top // GRANULARITY * GRANULARITY
        if top - s.lo < GRANULARITY or s.rounds >= self.options.max_rounds or top <= s.lo:
            self._finish_search(now)
            return
        sizes = [top]
        for k in (3, 2, 1):
            size = (s.lo + (top - s.lo) * k // 4) // GRANULARITY * GRANULARITY
            if size > s.lo and size >= MIN_PROBE_SIZE and size not in sizes:
                sizes.append(size)
        self._send_round(tuple(sizes), self.options.redundancy, now)

    def _confirm(self, size: int, now: float, copies: int) -> None:
        self.stats.confirmations += 1
        self._confirming = size
        self._last_confirm = now
        self._send_round((size, MIN_PROBE_SIZE), copies, now, control_copies=1)

    def _send_round(
        self, sizes: tuple[int, ...], copies: int, now: float, control_copies: int | None = None
    ) -> None:
        self._iteration = (self._iteration + 1) & 0x7FFFFFFF
        iteration = ITERATION_BASE | self._iteration
        # Smallest first: an I/O layer with UDP GSO sends a run of equal datagrams plus one
        # shorter one as a single super-packet, and a router that cannot forward the run
        # drops it whole; in ascending order no small probe shares the fate of a big one.
        for size in sorted(sizes):
            n = control_copies if control_copies is not None and size == sizes[-1] else copies
            ping = encode_ping(iteration, size)
            self._outgoing.extend([ping] * n)
            self.stats.probes_sent += n
        self._round = _Round(iteration, sizes, now)

    def _round_deadline(self, r: _Round) -> float:
        if r.first_answer is None:
            return r.sent_at + self.options.answer_timeout
        return r.sent_at + max(4 * r.first_answer, self.options.min_window)

    def _close_round(self, now: float) -> None:
        self._settle_round(now)
        if self._round is None and self._raise_asked:
            # The caller saw the kernel's limit grow while a round was out (a raise then may
            # have met the old limit): try now, from the token budget.
            self._raise_asked = False
            if self.size < self.ceiling:
                self._begin_search(self.size, self.ceiling + 1, REASON_RAISE, self.size, now)

    def _settle_round(self, now: float) -> None:
        r = self._round
        assert r is not None
        self._round = None
        if self._confirming:
            self._close_confirmation(r, now)
            return
        s = self._search
        if s is None:
            return
        if not r.answered and not all(size in r.refused for size in r.sizes):
            self._finish_search(now)  # silence: inconclusive, keep what we know
            return
        if r.answered:
            largest = max(r.answered)
            s.lo = max(s.lo, largest)
            s.best = largest if s.best is None else max(s.best, largest)
        failed = [x for x in r.sizes if x not in r.answered and x > s.lo]
        if failed:
            s.hi = min(s.hi, min(failed))
        s.rounds += 1
        self._next_round(now)

    def _close_confirmation(self, r: _Round, now: float) -> None:
        size = self._confirming
        self._confirming = 0
        self._last_confirm = now
        if size in r.answered:
            self._failures = 0
            return
        if MIN_PROBE_SIZE not in r.answered:
            return  # nothing came back: the peer or the whole path is away; no conclusion
        self.stats.confirmations_failed += 1
        self._failures += 1
        if self._failures < self.options.confirm_failures:
            self._confirm(size, now, copies=self.options.redundancy)
            return
        self._failures = 0
        self.stats.black_holes += 1
        # The search tries ``size`` once more: random loss that took both confirmations
        # then costs a few probes, not a smaller size.
        self._begin_search(MIN_PROBE_SIZE, size + 1, REASON_BLACK_HOLE, MIN_PROBE_SIZE, now)

    def _finish_search(self, now: float) -> None:
        s = self._search
        self._search = None
        self._round = None
        self._last_confirm = now
        if s is None:
            return
        before = self.size
        if s.best is not None and (
            s.best > self.size or (s.best < self.size and s.reason != REASON_RAISE)
        ):
            self._decide(s.best, s.reason, now)
        if s.timed and self.size <= before and self.size < self.ceiling:
            self._raise_delay = min(self._raise_delay * 2, self.options.raise_interval_max)
        if self.size >= self.ceiling:
            self._next_raise = None
        elif self._next_raise is None:
            self._next_raise = now + self._raise_delay


__all__ = [
    "CONFIRM_MIN_SIZE",
    "GRANULARITY",
    "ITERATION_BASE",
    "REASON_BLACK_HOLE",
    "REASON_KERNEL",
    "REASON_RAISE",
    "REASON_ROAM",
    "REASON_TOO_BIG",
    "PathMtuOptions",
    "PathMtuStats",
    "PathProber",
    "plateau_below",
]
