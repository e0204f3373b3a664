"""The threaded resolver (issue 10 item 7): answers arrive only through ``post``, literals
need no thread, lookups are bounded in number and in time, and ``close`` stops it.

Real ``getaddrinfo`` is used only for literals and ``localhost``; failing, slow and hanging
DNS is an injected ``getaddrinfo``, so no test depends on (or sends) real DNS traffic.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from secureiod.endpoint import Address
from secureiod.resolver import Backoff, ThreadResolver, normalize_answers

WAIT = 5.0  # upper bound for anything that should happen "soon"


class Loop:
    """Stands in for the event loop: ``post`` queues, ``pump`` runs on the test thread."""

    def __init__(self) -> None:
        self.posted: queue.Queue[Callable[[float], None]] = queue.Queue()
        self.thread = threading.current_thread()
        self.resolvers: list[ThreadResolver] = []

    def post(self, callback: Callable[[float], None]) -> None:
        self.posted.put(callback)

    def pump(self, count: int = 1, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(count):
            self.posted.get(timeout=max(0.0, deadline - time.monotonic()))(0.0)

    def idle(self, wait: float = 0.2) -> bool:
        """Nothing is posted within ``wait`` seconds."""
        try:
            self.posted.get(timeout=wait)
        except queue.Empty:
            return True
        return False


class Answers:
    """A ResolveCallback that records what it got and on which thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Address] | None, str | None]] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, addresses: list[Address] | None, error: str | None) -> None:
        self.calls.append((addresses, error))
        self.threads.append(threading.current_thread())


def resolver_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("secureiod-resolver")]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown so that no fake lookup outlives its test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def loop(release: threading.Event) -> Iterator[Loop]:
    """The fake loop; at teardown every resolver made on it is closed and its threads
    must end (so no test leaves threads behind for the next one)."""
    lp = Loop()
    yield lp
    release.set()
    for r in lp.resolvers:
        r.close()
        assert r.wait_closed(WAIT)


def make(loop: Loop, **kwargs: object) -> ThreadResolver:
    r = ThreadResolver(loop.post, **kwargs)  # type: ignore[arg-type]
    loop.resolvers.append(r)
    return r


def gai(*addresses: str, port: int = 0) -> list[tuple]:
    """getaddrinfo-shaped answers for the given addresses."""
    out: list[tuple] = []
    for a in addresses:
        if ":" in a:
            out.append((socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (a, port, 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_DGRAM, 17, "", (a, port)))
    return out


# -- literals and localhost (real getaddrinfo) --------------------------------------------


@pytest.mark.parametrize(
    ("host", "family", "expected"),
    [
        ("198.18.0.1", socket.AF_INET, [("198.18.0.1", 5000)]),
        ("198.18.0.1", socket.AF_INET6, [("::ffff:198.18.0.1", 5000, 0, 0)]),
        ("fd00:5ec::1", socket.AF_INET6, [("fd00:5ec::1", 5000, 0, 0)]),
        ("::1", socket.AF_INET6, [("::1", 5000, 0, 0)]),
        ("::ffff:198.18.0.1", socket.AF_INET, [("198.18.0.1", 5000)]),
    ],
)
def test_literal_resolves_without_a_thread(
    loop: Loop, host: str, family: int, expected: list[Address]
) -> None:
    before = set(resolver_threads())
    r = make(loop)
    answers = Answers()
    r.resolve(host, 5000, family, answers)
    assert answers.calls == []  # never inside resolve(): only via post
    loop.pump()
    assert answers.calls == [(expected, None)]
    assert answers.threads == [loop.thread]
    assert set(resolver_threads()) <= before


def test_ipv6_literal_for_an_ipv4_socket_is_an_error(loop: Loop) -> None:
    r = make(loop)
    answers = Answers()
    r.resolve("fd00:5ec::1", 5000, socket.AF_INET, answers)
    loop.pump()
    [(addresses, error)] = answers.calls
    assert addresses is None
    assert error is not None and "fd00:5ec::1" in error and "\n" not in error
    r.close()


def test_localhost(loop: Loop) -> None:
    r = make(loop)
    v4, v6 = Answers(), Answers()
    r.resolve("localhost", 5000, socket.AF_INET, v4)
    r.resolve("localhost", 5000, socket.AF_INET6, v6)
    loop.pump(2)
    [(addresses4, error4)] = v4.calls
    assert error4 is None and addresses4 is not None
    assert ("127.0.0.1", 5000) in addresses4
    assert all(len(a) == 2 for a in addresses4)
    [(addresses6, error6)] = v6.calls
    assert error6 is None and addresses6 is not None
    assert all(len(a) == 4 for a in addresses6)
    assert {("::1", 5000, 0, 0), ("::ffff:127.0.0.1", 5000, 0, 0)} & set(addresses6)
    assert v4.threads == [loop.thread] and v6.threads == [loop.thread]
    r.close()
    assert r.wait_closed(WAIT)


# -- answer shaping -----------------------------------------------------------------------


def test_families_dedupe_and_order() -> None:
    infos = gai("198.18.0.7", "fd00:5ec::7", "198.18.0.7", "198.18.0.9", "fd00:5ec::7", port=9)
    assert normalize_answers(infos, socket.AF_INET6, 4000) == [
        ("::ffff:198.18.0.7", 4000, 0, 0),
        ("fd00:5ec::7", 4000, 0, 0),
        ("::ffff:198.18.0.9", 4000, 0, 0),
    ]
    assert normalize_answers(infos, socket.AF_INET, 4000) == [
        ("198.18.0.7", 4000),
        ("198.18.0.9", 4000),
    ]
    # A name with both an A record and the same address as a v4-mapped AAAA: one answer.
    both = gai("198.18.0.7", "::ffff:198.18.0.7")
    assert normalize_answers(both, socket.AF_INET6, 1) == [("::ffff:198.18.0.7", 1, 0, 0)]
    assert normalize_answers(both, socket.AF_INET, 1) == [("198.18.0.7", 1)]


def test_name_with_only_ipv6_answers_for_an_ipv4_socket(loop: Loop) -> None:
    r = make(loop, getaddrinfo=lambda *a: gai("fd00:5ec::2"))
    answers = Answers()
    r.resolve("v6only.example", 53, socket.AF_INET, answers)
    loop.pump()
    [(addresses, error)] = answers.calls
    assert addresses is None and error is not None and "v6only.example" in error
    r.close()


def test_ipv4_socket_asks_only_for_ipv4(loop: Loop) -> None:
    asked: list[int] = []

    def fake(host: str, port: int, family: int, *rest: object) -> list[tuple]:
        asked.append(family)
        return gai("198.18.0.3", "fd00:5ec::3")

    r = make(loop, getaddrinfo=fake)
    answers = Answers()
    r.resolve("peer.example", 7, socket.AF_INET, answers)
    r.resolve("peer.example", 7, socket.AF_INET6, answers)
    loop.pump(2)
    assert sorted(asked) == sorted([socket.AF_INET, socket.AF_UNSPEC])
    assert sorted(map(str, answers.calls)) == sorted(
        map(
            str,
            [
                ([("198.18.0.3", 7)], None),
                ([("::ffff:198.18.0.3", 7, 0, 0), ("fd00:5ec::3", 7, 0, 0)], None),
            ],
        )
    )
    r.close()


# -- failures, bounds, timeouts -----------------------------------------------------------


def test_a_name_that_does_not_resolve(loop: Loop) -> None:
    def fake(host: str, *rest: object) -> list[tuple]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    r = make(loop, getaddrinfo=fake)
    answers = Answers()
    r.resolve("nothing.invalid", 5000, socket.AF_INET6, answers)
    loop.pump()
    assert answers.calls == [(None, "cannot resolve 'nothing.invalid': Name or service not known")]
    assert answers.threads == [loop.thread]
    r.close()


@pytest.mark.parametrize("host", ["", "a" * 300 + ".example", "bad\0name", "a b", "a\nb"])
def test_hostile_names_are_refused_before_any_lookup(loop: Loop, host: str) -> None:
    asked: list[str] = []

    def fake(name: str, *rest: object) -> list[tuple]:
        asked.append(name)
        return gai("198.18.0.1")

    r = make(loop, getaddrinfo=fake)
    answers = Answers()
    r.resolve(host, 5000, socket.AF_INET, answers)
    loop.pump()
    [(addresses, error)] = answers.calls
    assert addresses is None
    assert error is not None and error.startswith("cannot resolve") and "\n" not in error
    assert len(error) < 200
    assert asked == []


def test_label_too_long_is_a_one_line_error(loop: Loop) -> None:
    r = make(loop)  # real getaddrinfo: IDNA encoding fails before any DNS query
    answers = Answers()
    r.resolve("x" * 64 + ".example", 5000, socket.AF_INET, answers)
    loop.pump()
    [(addresses, error)] = answers.calls
    assert addresses is None
    assert error is not None and error.startswith("cannot resolve 'xxx") and "\n" not in error


def test_results_arrive_only_through_post(loop: Loop, release: threading.Event) -> None:
    entered = threading.Event()

    def slow(host: str, port: int, *rest: object) -> list[tuple]:
        entered.set()
        release.wait(WAIT)
        return gai("198.18.0.5", port=port)

    r = make(loop, getaddrinfo=slow)
    answers = Answers()
    r.resolve("slow.example", 51820, socket.AF_INET, answers)
    assert entered.wait(WAIT)
    assert loop.idle()
    release.set()
    # The lookup finishes on a worker thread, but the callback waits for the loop.
    deadline = time.monotonic() + WAIT
    while r.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert answers.calls == []
    loop.pump()
    assert answers.calls == [([("198.18.0.5", 51820)], None)]
    assert answers.threads == [loop.thread]
    r.close()


def test_max_pending_bound(loop: Loop, release: threading.Event) -> None:
    started: list[str] = []

    def blocked(host: str, port: int, *rest: object) -> list[tuple]:
        started.append(host)
        release.wait(WAIT)
        return gai("198.18.0.6", port=port)

    r = make(loop, getaddrinfo=blocked, max_pending=3, workers=2, timeout=WAIT * 2)
    answers = Answers()
    for i in range(5):
        r.resolve(f"n{i}.example", 1, socket.AF_INET, answers)
    assert r.pending == 3
    loop.pump(2)  # the two over the bound are refused at once
    assert answers.calls == [
        (None, "cannot resolve 'n3.example': too many pending lookups (3; is DNS unreachable?)"),
        (None, "cannot resolve 'n4.example': too many pending lookups (3; is DNS unreachable?)"),
    ]
    assert len(started) <= 2  # only `workers` lookups run at a time
    release.set()
    loop.pump(3)
    assert answers.calls[2:] == [([("198.18.0.6", 1)], None)] * 3
    assert r.pending == 0
    r.close()
    assert r.wait_closed(WAIT)


def test_hanging_lookup_times_out_and_stays_counted(loop: Loop, release: threading.Event) -> None:
    def fake(host: str, port: int, *rest: object) -> list[tuple]:
        if host.startswith("hang"):
            release.wait(WAIT * 4)  # "forever", as far as this test is concerned
        return gai("198.18.0.8", port=port)

    before = set(resolver_threads())
    r = make(loop, getaddrinfo=fake, max_pending=2, workers=1, timeout=0.3)
    hung, ok, refused = Answers(), Answers(), Answers()
    t0 = time.monotonic()
    r.resolve("hang.example", 1, socket.AF_INET, hung)
    loop.pump()
    elapsed = time.monotonic() - t0
    assert hung.calls == [(None, "cannot resolve 'hang.example': no answer within 0.3s")]
    assert 0.25 <= elapsed < 3.0
    # The stuck thread was replaced: another lookup still goes through...
    r.resolve("fine.example", 2, socket.AF_INET, ok)
    loop.pump()
    assert ok.calls == [([("198.18.0.8", 2)], None)]
    # ... but it still counts as pending, so stuck threads are bounded by max_pending.
    assert r.pending == 1
    r.resolve("hang2.example", 3, socket.AF_INET, hung)
    r.resolve("third.example", 4, socket.AF_INET, refused)
    loop.pump(2)
    assert refused.calls == [
        (None, "cannot resolve 'third.example': too many pending lookups (2; is DNS unreachable?)")
    ]
    assert hung.calls[1] == (None, "cannot resolve 'hang2.example': no answer within 0.3s")
    assert len(set(resolver_threads()) - before) <= 2 + 1 + 1  # stuck + worker + watchdog
    # The late answer of a timed-out lookup is never delivered.
    release.set()
    deadline = time.monotonic() + WAIT
    while r.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.pending == 0
    assert loop.idle()
    assert len(hung.calls) == 2
    r.close()
    assert r.wait_closed(WAIT)


def test_queued_lookup_behind_a_stuck_one_times_out_too(
    loop: Loop, release: threading.Event
) -> None:
    def hang(host: str, *rest: object) -> list[tuple]:
        release.wait(WAIT * 4)
        return []

    r = make(loop, getaddrinfo=hang, workers=1, timeout=0.3, max_pending=4)
    answers = Answers()
    r.resolve("a.example", 1, socket.AF_INET, answers)
    time.sleep(0.05)
    r.resolve("b.example", 1, socket.AF_INET, answers)
    loop.pump(2)
    assert [e for _, e in answers.calls] == [
        "cannot resolve 'a.example': no answer within 0.3s",
        "cannot resolve 'b.example': no answer within 0.3s",
    ]
    r.close()


def test_close_stops_workers_and_drops_outstanding_answers(
    loop: Loop, release: threading.Event
) -> None:
    entered = threading.Event()

    def slow(host: str, port: int, *rest: object) -> list[tuple]:
        entered.set()
        release.wait(WAIT)
        return gai("198.18.0.4", port=port)

    before = set(resolver_threads())
    r = make(loop, getaddrinfo=slow, workers=2)
    answers = Answers()
    r.resolve("a.example", 1, socket.AF_INET, answers)  # running
    r.resolve("b.example", 1, socket.AF_INET, answers)  # running (second worker)
    r.resolve("c.example", 1, socket.AF_INET, answers)  # queued
    r.resolve("198.18.0.1", 1, socket.AF_INET, answers)  # literal: already posted
    assert entered.wait(WAIT)
    mine = set(resolver_threads()) - before
    assert len(mine) == 3  # two workers and the watchdog
    r.close()
    release.set()
    assert r.wait_closed(WAIT)
    assert not any(t.is_alive() for t in mine)
    while not loop.posted.empty():
        loop.pump()
    assert answers.calls == []  # nothing outstanding ran, not even the posted literal
    r.resolve("d.example", 1, socket.AF_INET, answers)  # after close: ignored, no thread
    assert loop.idle()
    assert set(resolver_threads()) <= before
    r.close()  # idempotent


def test_bad_parameters_are_refused(loop: Loop) -> None:
    with pytest.raises(ValueError):
        make(loop, max_pending=0)
    with pytest.raises(ValueError):
        make(loop, timeout=0)


# -- backoff ------------------------------------------------------------------------------


def test_backoff_doubles_to_the_maximum_and_resets() -> None:
    b = Backoff()
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    b.reset()
    assert b.next_delay() == 1
    c = Backoff(initial=0.5, maximum=3)
    assert [c.next_delay() for _ in range(5)] == [0.5, 1, 2, 3, 3]


def test_backoff_jitter_comes_from_the_injected_random() -> None:
    draws = iter([0.0, 1.0, 0.5, 0.25])
    b = Backoff(jitter=0.2, random=lambda: next(draws))
    assert [b.next_delay() for _ in range(4)] == pytest.approx([1.0, 1.6, 3.6, 7.6])
    rng_b = Backoff(jitter=1.0)
    assert all(0 <= rng_b.next_delay() <= 30 for _ in range(50))


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=0)
    with pytest.raises(ValueError):
        Backoff(initial=5, maximum=1)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)
