"""An in-memory lossy, reordering, size-limited datagram path between two sans-IO sessions.

The test double of wireguard-go's bindtest, with a virtual clock: timers fire instantly,
so a minute of key rotations runs in milliseconds and every run is reproducible.

Each side has an address. Datagrams are delivered by the destination address the session
chose, from the sender's current address: change ``link.a.address`` and A has roamed;
a datagram sent to an address nobody holds lands in ``link.elsewhere`` (an attacker's
mailbox, or a stale address).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from secureiod.secureio.events import Event, MessageReceived
from secureiod.secureio.negotiation import END_RESEND_DELAYS
from secureiod.secureio.path import Address, same_path
from secureiod.secureio.session import Session

ADDR_A: Address = ("198.18.0.1", 5800)
ADDR_B: Address = ("198.18.0.2", 5800)


@dataclass
class PathRules:
    latency: float = 0.001
    loss: float = 0.0
    max_datagram: int | None = None
    """Datagrams larger than this vanish silently (a path MTU black hole)."""
    reorder: float = 0.0
    """Probability a datagram is delayed by an extra 0..3 latencies."""
    drop: Callable[[bytes], bool] | None = None
    """Targeted drop decision, e.g. "drop the next key-exchange request"."""


@dataclass
class Endpoint:
    session: Session
    address: Address
    """Where this side sends from (and is reachable at) now."""
    events: list[Event] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    def messages(self, mtype: int | None = None) -> list[bytes]:
        return [
            e.payload
            for e in self.events
            if isinstance(e, MessageReceived) and (mtype is None or e.type == mtype)
        ]


class Link:
    def __init__(
        self,
        a: Session,
        b: Session,
        rules: PathRules | None = None,
        rules_b_to_a: PathRules | None = None,
        seed: int = 1,
        start: float = 1000.0,
        *,
        set_endpoints: bool = True,
    ) -> None:
        """``set_endpoints``: tell each session where the other is (unless it already has
        an endpoint); without it a session with none waits to be contacted."""
        self.a, self.b = Endpoint(a, ADDR_A), Endpoint(b, ADDR_B)
        if set_endpoints:
            for ep in (self.a, self.b):
                if ep.session.endpoint is None:
                    ep.session.set_endpoint(self.peer(ep).address)
        self.rules = {id(a): rules or PathRules(), id(b): rules_b_to_a or rules or PathRules()}
        self.rng = random.Random(seed)
        self.now = start
        self._queue: list[tuple[float, int, Endpoint, bytes, Address]] = []
        self._seq = 0
        self.delivered = 0
        self.dropped = 0
        self.elsewhere: list[tuple[Address, bytes]] = []
        """Datagrams sent to an address neither side is at: (destination, datagram)."""

    def start(self) -> None:
        self.a.session.start(self.now)
        self.b.session.start(self.now)
        self.pump()

    def peer(self, ep: Endpoint) -> Endpoint:
        return self.b if ep is self.a else self.a

    def inject(
        self, to: Endpoint, datagram: bytes, delay: float = 0.0, src: Address | None = None
    ) -> None:
        """Put a datagram on the wire as if an attacker sent it, from ``src`` (default: the
        other side's address, i.e. spoofed)."""
        self._seq += 1
        source = src if src is not None else self.peer(to).address
        heapq.heappush(self._queue, (self.now + delay, self._seq, to, datagram, source))

    def deliver_now(self, batch: list[tuple[Endpoint, bytes, Address]]) -> None:
        """Hand several datagrams to their sessions at the same instant (one read batch),
        then collect the output."""
        for to, datagram, src in batch:
            to.session.receive_datagram(datagram, src, self.now)
            self.delivered += 1
        self.pump()

    def pump(self) -> None:
        """Collect every endpoint's output and events onto the wire."""
        for ep in (self.a, self.b):
            rules = self.rules[id(ep.session)]
            for d, dst in ep.session.datagrams_to_send(self.now):
                ep.sent.append(d)
                to = self.peer(ep)
                if not same_path(dst, to.address):
                    self.elsewhere.append((dst, d))
                    continue
                lost = (
                    self.rng.random() < rules.loss
                    or (rules.max_datagram is not None and len(d) > rules.max_datagram)
                    or (rules.drop is not None and rules.drop(d))
                )
                if lost:
                    self.dropped += 1
                    continue
                delay = rules.latency
                if rules.reorder and self.rng.random() < rules.reorder:
                    delay += rules.latency * self.rng.uniform(0, 3)
                self.inject(to, d, delay, src=ep.address)
            while (ev := ep.session.next_event()) is not None:
                ep.events.append(ev)

    def step(self, deadline: float) -> bool:
        """Advance to the next delivery or timer not after ``deadline``; False if none."""
        times = [t for t in (self.a.session.get_timer(), self.b.session.get_timer()) if t]
        next_timer = min(times) if times else None
        next_delivery = self._queue[0][0] if self._queue else None
        candidates = [t for t in (next_timer, next_delivery) if t is not None]
        if not candidates or min(candidates) > deadline:
            return False
        t = min(candidates)
        self.now = max(self.now, t)
        if next_delivery is not None and next_delivery <= t:
            _, _, to, d, src = heapq.heappop(self._queue)
            to.session.receive_datagram(d, src, self.now)
            self.delivered += 1
        else:
            for ep in (self.a, self.b):
                timer = ep.session.get_timer()
                if timer is not None and timer <= self.now:
                    ep.session.handle_timer(self.now)
        self.pump()
        return True

    def run(
        self,
        duration: float,
        until: Callable[[], bool] | None = None,
        max_steps: int = 2_000_000,
    ) -> None:
        deadline = self.now + duration
        for _ in range(max_steps):
            if until is not None and until():
                return
            if not self.step(deadline):
                self.now = max(self.now, deadline)
                return
        raise AssertionError("link did not settle within max_steps")

    def run_past_late_ends(self) -> None:
        """Let the late copies of both negotiation ENDs go by (``END_RESEND_DELAYS``), for
        a test that counts datagrams on a link that should be quiet."""
        self.run(max(END_RESEND_DELAYS) + 0.01)

    def run_until(self, cond: Callable[[], bool], timeout: float = 30.0) -> None:
        self.run(timeout, until=cond)
        assert cond(), f"condition not reached within {timeout} virtual seconds"
