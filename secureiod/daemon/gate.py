"""One run of an expensive command for everyone who asked, spaced out in time.

``secureioctl reload`` re-reads and applies the whole config: a quarter of a second of the
event loop with a thousand peers, during which no packet moves. Clients pipelining reloads
(or a SIGHUP loop) must not turn that into a loop that does nothing else, so a
``CommandGate`` stands between the requests and the work:

* at most one run is queued at a time: every request that arrives while it waits shares
  its result (each still gets an answer computed after it asked, so nothing is stale);
* two runs start at least ``min_interval`` seconds apart and, when a run took longer
  than ``free_cost``, the loop has ``cost_factor`` times its duration to itself before the
  next, so even a command that grows expensive with the config (``peers``, ``metrics``)
  takes at most about half of the loop's time (a cheap run is not spaced: repeating it at
  once costs nothing);
* a request that comes too soon waits for its turn; it is never refused.

Runs happen in a loop timer, so the caller's callback sees the result later (never from
inside ``request``). The cost is measured with ``cost_clock`` (real time by default), the
schedule uses the loop's ``now``: a virtual-time loop drives it in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ..control import ControlError, shorten
from ..logs import RateLimitedLog
from .ports import LoopPort, TimerHandle

__all__ = ["CommandGate", "GateOutcome"]

logger = logging.getLogger(__name__)

Job = Callable[[float], Any]
MAX_SPACING: Final = 60.0
"""However slow one run was, the next may start this many seconds later at the latest."""
FREE_COST: Final = 0.002
"""Seconds a run may take without spacing the next one by its cost."""


@dataclass(frozen=True, slots=True)
class GateOutcome:
    """What one run produced: its result, or the exception it raised."""

    now: float
    """The loop time the run started at."""
    result: Any = None
    error: Exception | None = None


Done = Callable[[GateOutcome], None]


class CommandGate:
    """Serialises, coalesces and spaces the runs of ``job(now)`` (see the module doc)."""

    def __init__(
        self,
        loop: LoopPort,
        job: Job,
        *,
        name: str,
        min_interval: float = 0.0,
        cost_factor: float = 1.0,
        free_cost: float = FREE_COST,
        cost_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if min(min_interval, cost_factor, free_cost) < 0:
            raise ValueError("CommandGate: min_interval, cost_factor, free_cost must be >= 0")
        self.name = name
        self.min_interval = min_interval
        self.cost_factor = cost_factor
        self.free_cost = free_cost
        self.runs = 0
        self.requests = 0
        self.last_cost = 0.0
        self._loop = loop
        self._job = job
        self._cost_clock = cost_clock
        self._waiters: list[Done] = []
        self._timer: TimerHandle | None = None
        self._next_at: float | None = None
        self._log = RateLimitedLog(logger, interval=30.0, max_keys=16, max_lines=8)

    @property
    def queued(self) -> bool:
        """A run is waiting for its time."""
        return self._timer is not None

    @property
    def next_at(self) -> float | None:
        """The earliest loop time the next run may start (None: at once)."""
        return self._next_at

    def request(self, now: float, done: Done | None = None) -> None:
        """Ask for a run; ``done(outcome)`` is called (on the loop) when it has happened.
        Joins the queued run if there is one, else queues one for as soon as allowed."""
        self.requests += 1
        if done is not None:
            self._waiters.append(done)
        if self._timer is None:
            when = now if self._next_at is None else max(now, self._next_at)
            self._timer = self._loop.call_at(when, self._run)

    def close(self) -> None:
        """Cancel a queued run; its waiters get no answer (their connections are closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiters = []

    def _run(self, now: float) -> None:
        self._timer = None
        waiters, self._waiters = self._waiters, []
        self.runs += 1
        clock = self._cost_clock
        started = clock()
        try:
            outcome = GateOutcome(now, result=self._job(now))
        except Exception as exc:  # handed to every waiter; a bug is reported below
            outcome = GateOutcome(now, error=exc)
        cost = max(0.0, clock() - started)
        self.last_cost = cost
        # the pause after a costly run is counted from its end (``now`` is its start)
        pause = cost + self.cost_factor * cost if cost > self.free_cost else 0.0
        self._next_at = now + min(MAX_SPACING, max(self.min_interval, pause))
        error = outcome.error
        if error is not None and not waiters and not isinstance(error, ControlError):
            # nobody to tell (a SIGHUP): a refusal was logged by whoever refused, a bug not
            self._log.log(
                now,
                type(error).__name__,
                logging.ERROR,
                "%s failed: %s: %s",
                self.name,
                type(error).__name__,
                shorten(error),
            )
        for done in waiters:
            try:
                done(outcome)
            except Exception as exc:  # one broken waiter must not cost the others their answer
                self._log.log(
                    now,
                    ("waiter", type(exc).__name__),
                    logging.ERROR,
                    "%s: delivering the result failed: %s: %s",
                    self.name,
                    type(exc).__name__,
                    shorten(exc),
                )
