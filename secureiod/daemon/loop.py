"""The daemon's event loop: one thread, level-triggered epoll, a timer heap.

Why not asyncio: the data path wants one wake-up to drain whole batches from the TUN and
UDP descriptors with no task, future or callback-handle allocation per packet, and the
loop's own overhead is a good part of a lone ping's latency. This loop is the minimum
that serves readers, writers, timers and wake-ups from other threads (the resolver) and
from signal handlers.

Every callback gets ``now`` (monotonic seconds, read once per wake-up, after the wait),
so the parts of the daemon never read a clock themselves and tests can drive them with a
virtual one.

A callback that raises is a bug or an input nobody foresaw; either way it must not take the
tunnel down with it. The loop counts it (``callback_failures``), logs one rate-limited line
naming the callback, the exception and where it was raised, and carries on with the next
callback. A loop that stops serving altogether is systemd's watchdog's business.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import select
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ..control import shorten
from ..logs import RateLimitedLog

logger = logging.getLogger(__name__)

Callback = Callable[[float], None]
MAX_WAIT: Final = 3600.0
FAILURE_LOG_INTERVAL: Final = 30.0
"""Seconds between two log lines about the same failing callback."""
_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_READ_READY: Final = ~select.EPOLLOUT
"""Anything but "writable" serves the reader: data, and also HUP/ERR, which a read reports."""
_WRITE_READY: Final = ~select.EPOLLIN
"""Anything but "readable" serves the writer (as ``selectors`` maps HUP/ERR to both)."""


class SystemClock:
    """The real clocks (``ClockPort``): monotonic seconds for timers, wall-clock
    nanoseconds for session ids."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall_ns(self) -> int:
        return time.time_ns()


class Timer:
    """A scheduled callback; ``cancel`` is O(1) (the heap entry is skipped later)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class EventLoop:
    """Readers and writers on file descriptors, timers, and thread-safe wake-ups.

    It talks to ``select.epoll`` directly rather than through ``selectors``: a wake-up
    then costs one ``epoll_wait`` and a dictionary lookup per ready descriptor, with no
    selector key objects, no ``(key, events)`` list and no mask translation, which is
    measurable on a lone packet (issue 13). Level-triggered, so a reader that leaves data
    behind (a per-wake-up budget) is woken again at once, and a descriptor that stays
    ready cannot starve the others: epoll hands out ready descriptors round-robin."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._epoll = select.epoll()
        self._registered: dict[int, int] = {}
        """fd -> the epoll mask it is registered with."""
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timers: list[Timer] = []
        self._pending: deque[Callback] = deque()
        self._running = False
        self._wait: Callable[[float, int], list[tuple[int, int]]] | None = None
        self._after_wait: Callback | None = None
        self.callback_failures = 0
        """Callbacks that raised (each logged, rate-limited, and survived)."""
        self.wakeups = 0
        """Returns from ``epoll_wait``: what idling costs, for tests and measurements."""
        self._failure_log = RateLimitedLog(
            logger, interval=FAILURE_LOG_INTERVAL, max_keys=64, max_lines=16
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_fd = self._wake_r.fileno()
        self._epoll.register(self._wake_fd, _IN)
        self._registered[self._wake_fd] = _IN

    def fileno(self) -> int:
        """The epoll descriptor (for ``use_waiter``'s C waiter)."""
        return self._epoll.fileno()

    def use_waiter(
        self, wait: Callable[[float, int], list[tuple[int, int]]], after_wait: Callback
    ) -> None:
        """Wait with ``wait(timeout, maxevents)`` instead of ``epoll.poll`` on ``fileno()``
        (same arguments and result; the daemon's C lone-packet hop, ``lone.py``, which may
        send a packet itself while it waits), and call ``after_wait(now)`` after every
        wait, before any callback: it takes in what the waiter did meanwhile."""
        self._wait = wait
        self._after_wait = after_wait

    # -- registration -------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def _update(self, fd: int) -> None:
        events = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        old = self._registered.get(fd)
        ep = self._epoll
        try:
            if events and old is None:
                try:
                    ep.register(fd, events)
                except FileExistsError:  # a reused number whose old file is still open
                    ep.modify(fd, events)
                self._registered[fd] = events
            elif events and old != events:
                try:
                    ep.modify(fd, events)
                except FileNotFoundError:  # closed and reopened under the same number
                    ep.register(fd, events)
                self._registered[fd] = events
            elif not events and old is not None:
                del self._registered[fd]
                # a descriptor closed before it was removed has left the set already
                with contextlib.suppress(OSError):
                    ep.unregister(fd)
        except (ValueError, OSError) as exc:  # a descriptor already closed
            logger.debug("loop: fd %d: %s", fd, exc)
            self._readers.pop(fd, None)
            self._writers.pop(fd, None)
            self._registered.pop(fd, None)
            with contextlib.suppress(ValueError, OSError):
                ep.unregister(fd)

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """From any thread or a signal handler: run ``callback`` on the loop soon."""
        self._pending.append(callback)  # deque.append is atomic: no lock a signal could deadlock on
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- running ------------------------------------------------------------------------

    def stop(self) -> None:
        """Safe from a signal handler or another thread."""
        self._running = False
        self._wake()

    def run(self, after_wakeup: Callback | None = None) -> None:
        """Serve until ``stop``. ``after_wakeup(now)`` runs once after every wake-up's
        callbacks and timers: the daemon flushes what they produced there, so small
        packets of one wake-up share a datagram. A callback that raises is logged and
        counted (``callback_failures``); the loop goes on with the next one.

        One clock read per wake-up, right after the wait: every callback, due timer and
        ``after_wakeup`` of that wake-up sees the same ``now`` (a timer that falls due
        while they run is served on the next pass, which does not sleep). A second read
        before the wait, only when a timer is pending, sizes the sleep."""
        self._running = True
        poll = self._wait if self._wait is not None else self._epoll.poll
        after_wait = self._after_wait
        registered = self._registered
        wake_fd = self._wake_fd
        clock = self.clock
        readers, writers = self._readers, self._writers
        timers = self._timers
        pending = self._pending
        while self._running:
            if pending:
                timeout = 0.0
            elif timers and not timers[0].cancelled:  # the usual case, without a call
                timeout = min(MAX_WAIT, max(0.0, timers[0].when - clock()))
            elif timers:
                timeout = self._timeout(clock())
            else:
                timeout = MAX_WAIT
            ready = poll(timeout, len(registered))
            self.wakeups += 1
            now = clock()
            if after_wait is not None:
                try:
                    after_wait(now)
                except Exception as exc:
                    self._failed(after_wait, exc, now)
            for fd, events in ready:
                if events & _READ_READY:
                    cb = readers.get(fd)
                    if cb is not None:
                        try:
                            cb(now)
                        except Exception as exc:
                            self._failed(cb, exc, now)
                    elif fd == wake_fd:
                        self._drain_wake()
                if events & _WRITE_READY:
                    cb = writers.get(fd)
                    if cb is not None:
                        try:
                            cb(now)
                        except Exception as exc:
                            self._failed(cb, exc, now)
            if pending:
                self._run_pending(now)
            if timers and timers[0].when <= now:
                self._run_timers(now)
            if after_wakeup is not None:
                try:
                    after_wakeup(now)
                except Exception as exc:
                    self._failed(after_wakeup, exc, now)

    def _failed(self, callback: Callable[..., object], exc: Exception, now: float) -> None:
        """One line per failing callback and exception type per ``FAILURE_LOG_INTERVAL``:
        what failed and where, never a traceback per packet."""
        self.callback_failures += 1
        name = _callback_name(callback)
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self._failure_log.log(
            now,
            (name, type(exc).__name__, where),
            logging.ERROR,
            "event loop: %s failed: %s: %s (at %s); carrying on",
            name,
            type(exc).__name__,
            shorten(exc),
            where,
        )

    def _timeout(self, now: float) -> float:
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        if not timers:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, timers[0].when - now))

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    def _run_pending(self, now: float) -> None:
        pending = self._pending
        for _ in range(len(pending)):
            cb = pending.popleft()
            try:
                cb(now)
            except Exception as exc:
                self._failed(cb, exc, now)

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0].when <= now:
            timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                try:
                    timer.callback(now)
                except Exception as exc:
                    self._failed(timer.callback, exc, now)

    def close(self) -> None:
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()


def _callback_name(callback: Callable[..., object]) -> str:
    """``Class.method`` or ``function`` (through ``functools.partial``)."""
    func = getattr(callback, "func", callback)
    return str(getattr(func, "__qualname__", None) or type(func).__name__)
