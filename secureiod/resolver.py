"""Resolving peer endpoint names without ever blocking the daemon's event loop.

``getaddrinfo`` may wait on DNS for tens of seconds and cannot be interrupted, so lookups
run on a few worker threads and their answers come back to the loop through ``post`` (the
loop's ``call_soon_threadsafe``): a callback never runs on a resolver thread, and never
re-entrantly inside ``resolve``. A lookup that outlives ``timeout`` is answered with an
error and its thread is written off (a fresh worker takes its place); the thread stays
counted as pending until ``getaddrinfo`` finally returns, so ``max_pending`` also bounds
how many threads a black-holed DNS server can pin.

``Backoff`` is the retry schedule the daemon uses for names that do not resolve.
``prefetch`` resolves the peers' names once at start, blocking for a bounded time, before
the daemon installs anything (a full tunnel's rules) that could capture the lookups.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .endpoint import Address

__all__ = ["Backoff", "ResolveCallback", "ThreadResolver", "normalize_answers", "prefetch"]

logger = logging.getLogger(__name__)

ResolveCallback = Callable[[list[Address] | None, str | None], None]
Post = Callable[[Callable[[float], None]], None]


@dataclass(eq=False)
class _Job:
    host: str
    port: int
    family: int
    callback: ResolveCallback
    deadline: float
    started: bool = False
    timed_out: bool = False


def normalize_answers(infos: list[tuple], family: int, port: int) -> list[Address]:
    """Turn ``getaddrinfo`` answers into the sockaddrs a socket of ``family`` can send to.

    An AF_INET6 socket may be dual-stack, so IPv4 answers become v4-mapped addresses
    (written the way ``recvfrom`` reports them, which keeps endpoint comparisons exact); an
    AF_INET socket cannot use IPv6 answers, except v4-mapped ones, which are unmapped.
    Duplicates (one per socket type or protocol, or a name listing an address twice) go;
    the order stays ``getaddrinfo``'s, which already ranks by RFC 6724 preference.
    """
    out: list[Address] = []
    seen: set[Address] = set()
    for info in infos:
        fam, sockaddr = info[0], info[4]
        addr: Address
        if fam == socket.AF_INET:
            host = sockaddr[0]
            addr = (f"::ffff:{host}", port, 0, 0) if family == socket.AF_INET6 else (host, port)
        elif fam == socket.AF_INET6:
            host = sockaddr[0]
            if family == socket.AF_INET:
                try:
                    mapped = ipaddress.IPv6Address(host).ipv4_mapped
                except ValueError:
                    mapped = None
                if mapped is None:
                    continue
                addr = (str(mapped), port)
            else:
                addr = (host, port, 0, int(sockaddr[3]) if len(sockaddr) > 3 else 0)
        else:
            continue
        if addr not in seen:
            seen.add(addr)
            out.append(addr)
    return out


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _show(host: str) -> str:
    """A host name for a one-line message: quoted, and cut if absurdly long."""
    return repr(host if len(host) <= 80 else host[:77] + "...")


class ThreadResolver:
    """``ResolverPort`` on a small pool of threads; see the module docstring."""

    def __init__(
        self,
        post: Post,
        *,
        max_pending: int = 256,
        workers: int = 2,
        timeout: float = 10.0,
        getaddrinfo: Callable[..., list] | None = None,
    ) -> None:
        if max_pending < 1 or workers < 1 or not timeout > 0:
            raise ValueError("max_pending and workers must be >= 1 and timeout > 0")
        self._post = post
        self._max_pending = max_pending
        self._workers = workers
        self._timeout = timeout
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for jobs
        self._watch = threading.Condition(self._lock)  # the watchdog waits here for deadlines
        self._queue: deque[_Job] = deque()
        # Jobs not answered yet, in submission (= deadline) order; dict keeps the order.
        self._unanswered: dict[_Job, None] = {}
        self._pending = 0  # queued + inside getaddrinfo (including written-off threads)
        self._live_workers = 0
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        # Injectable for tests (slow, failing or hanging DNS); looked up per call otherwise.
        self._getaddrinfo = getaddrinfo

    @property
    def pending(self) -> int:
        """Lookups queued or inside getaddrinfo, stuck ones included."""
        with self._lock:
            return self._pending

    # -- the port ------------------------------------------------------------------------

    def resolve(self, host: str, port: int, family: int, callback: ResolveCallback) -> None:
        """Start a lookup; the answer is posted to the loop later, whatever happens."""
        if _is_literal(host):
            # A numeric host never touches DNS: no thread, but still answered via post so
            # the caller never sees its callback run inside this call.
            addresses, error = self._lookup(host, port, family, socket.AI_NUMERICHOST)
            self._deliver(callback, addresses, error)
            return
        with self._lock:
            if self._closed:
                return
            if self._pending >= self._max_pending:
                error = (
                    f"cannot resolve {_show(host)}: too many pending lookups "
                    f"({self._max_pending}; is DNS unreachable?)"
                )
                job = None
            else:
                error = None
                job = _Job(host, port, family, callback, time.monotonic() + self._timeout)
                self._pending += 1
                self._queue.append(job)
                self._unanswered[job] = None
                if not self._started:
                    self._start_locked()
                self._work.notify()
                self._watch.notify()
        if job is None:
            self._deliver(callback, None, error)

    def close(self) -> None:
        """Stop the workers; answers not yet delivered (even ones already posted) are
        dropped. Does not wait: a thread inside getaddrinfo ends when that returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending -= len(self._queue)
            self._queue.clear()
            self._unanswered.clear()
            self._work.notify_all()
            self._watch.notify_all()

    def wait_closed(self, timeout: float) -> bool:
        """After ``close``: wait up to ``timeout`` seconds for every thread to end (tests
        and orderly shutdown); True when none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # -- internals -----------------------------------------------------------------------

    def _start_locked(self) -> None:
        self._started = True
        for _ in range(self._workers):
            self._spawn_worker_locked()
        self._spawn_locked(self._watchdog, "secureiod-resolver-watchdog")

    def _spawn_worker_locked(self) -> None:
        self._live_workers += 1
        self._spawn_locked(self._worker, "secureiod-resolver")

    def _spawn_locked(self, target: Callable[[], None], name: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work.wait()
                if self._closed:
                    self._live_workers -= 1
                    return
                job = self._queue.popleft()
                job.started = True
            addresses, error = self._lookup(job.host, job.port, job.family, 0)
            with self._lock:
                self._pending -= 1
                if job.timed_out:
                    # Written off by the watchdog, which started a replacement: leave.
                    return
                if self._closed:
                    self._live_workers -= 1
                    return
                del self._unanswered[job]
                self._watch.notify()
            self._deliver(job.callback, addresses, error)

    def _watchdog(self) -> None:
        while True:
            expired: list[_Job] = []
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                while self._unanswered:
                    job = next(iter(self._unanswered))
                    if job.deadline > now:
                        break
                    del self._unanswered[job]
                    job.timed_out = True
                    expired.append(job)
                    if job.started:
                        # Its thread is stuck in getaddrinfo; keep the pool at strength.
                        # The stuck one stays in _pending until it returns.
                        self._live_workers -= 1
                        self._spawn_worker_locked()
                    else:
                        self._queue.remove(job)
                        self._pending -= 1
                if not expired:
                    wait = next(iter(self._unanswered)).deadline - now if self._unanswered else None
                    self._watch.wait(wait)
                    continue
            for job in expired:
                self._deliver(
                    job.callback,
                    None,
                    f"cannot resolve {_show(job.host)}: no answer within {self._timeout:g}s",
                )

    def _lookup(
        self, host: str, port: int, family: int, flags: int
    ) -> tuple[list[Address] | None, str | None]:
        """getaddrinfo plus normalisation; every failure becomes one line of text."""
        shown = _show(host)
        if not host:
            return None, "cannot resolve an empty host name"
        if len(host) > 253 or not host.isprintable() or any(c.isspace() for c in host):
            # Refused here rather than by getaddrinfo, which silently cuts a name at a NUL
            # and would then ask DNS about the part before it.
            return None, f"cannot resolve {shown}: not a valid host name"
        numeric = bool(flags & socket.AI_NUMERICHOST)
        # An IPv4 socket asks for A records only; a literal is parsed whatever its family so
        # that a v4-mapped one can still be unmapped. Literals never use the injected
        # getaddrinfo: parsing one cannot block.
        query_family = (
            socket.AF_INET if family == socket.AF_INET and not numeric else socket.AF_UNSPEC
        )
        getaddrinfo = socket.getaddrinfo if numeric else self._getaddrinfo or socket.getaddrinfo
        try:
            infos = getaddrinfo(host, port, query_family, socket.SOCK_DGRAM, 0, flags)
        except socket.gaierror as exc:
            return None, f"cannot resolve {shown}: {exc.strerror or exc}"
        except (OSError, UnicodeError, ValueError, OverflowError, TypeError) as exc:
            return None, f"cannot resolve {shown}: {exc}".splitlines()[0]
        addresses = normalize_answers(infos, family, port)
        if not addresses:
            kind = "IPv4 " if family == socket.AF_INET else ""
            return None, f"cannot resolve {shown}: no {kind}address"
        return addresses, None

    def _deliver(
        self, callback: ResolveCallback, addresses: list[Address] | None, error: str | None
    ) -> None:
        def run(_now: float) -> None:
            if not self._closed:
                callback(addresses, error)

        try:
            self._post(run)
        except Exception as exc:  # a loop already gone must not kill a resolver thread
            logger.debug("resolver: cannot post an answer: %s", exc)


@dataclass
class Backoff:
    """Retry delays for a name that does not resolve: ``initial`` doubling up to
    ``maximum``. With ``jitter`` (a fraction in 0..1) each delay is shortened by up to that
    fraction, drawn from ``random`` (injectable, so tests are deterministic), so that many
    peers behind one failed DNS server do not retry in lock-step; a delay never exceeds
    ``maximum``."""

    initial: float = 1.0
    maximum: float = 30.0
    jitter: float = 0.0
    random: Callable[[], float] = field(default=random.random, repr=False)
    _current: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("Backoff needs 0 < initial <= maximum")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("Backoff jitter is a fraction in 0..1")
        self._current = self.initial

    def next_delay(self) -> float:
        delay = self._current
        self._current = min(self.maximum, self._current * 2)
        if self.jitter:
            delay *= 1.0 - self.jitter * self.random()
        return delay

    def reset(self) -> None:
        self._current = self.initial


def prefetch(
    names: Iterable[tuple[str, int]],
    family: int,
    *,
    budget: float = 5.0,
    workers: int = 4,
    getaddrinfo: Callable[..., list] | None = None,
) -> dict[tuple[str, int], list[Address] | str]:
    """Resolve every (host, port) of ``names`` at once, in parallel, waiting at most
    ``budget`` seconds in all: each gets its addresses, or one line saying why not (a name
    still unanswered at the end says so). Blocks: for the start, before the event loop."""
    wanted = list(dict.fromkeys(names))
    results: dict[tuple[str, int], list[Address] | str] = {}
    if not wanted:
        return results
    answers: queue.SimpleQueue[Callable[[float], None]] = queue.SimpleQueue()
    resolver = ThreadResolver(
        answers.put,
        max_pending=len(wanted),
        workers=min(workers, len(wanted)),
        timeout=budget,
        getaddrinfo=getaddrinfo,
    )

    def answer(key: tuple[str, int]) -> ResolveCallback:
        def store(addresses: list[Address] | None, error: str | None) -> None:
            results[key] = addresses if addresses else error or f"cannot resolve {_show(key[0])}"

        return store

    deadline = time.monotonic() + budget
    try:
        for host, port in wanted:
            resolver.resolve(host, port, family, answer((host, port)))
        while len(results) < len(wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                run = answers.get(timeout=left)
            except queue.Empty:
                break
            run(time.monotonic())
    finally:
        resolver.close()
    for host, port in wanted:
        results.setdefault(
            (host, port), f"cannot resolve {_show(host)}: no answer within {budget:g}s"
        )
    return results
