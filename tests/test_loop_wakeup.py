"""What one wake-up of the event loop costs and serves (issue 13): ``epoll`` directly,
one clock read per wake-up, no spinning on timers, and the descriptor corner cases that
``selectors`` used to handle for us (hang-ups, descriptors closed before removal, numbers
reused). Real ``EventLoop``, real sockets, bounded in time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from secureiod.daemon.loop import EventLoop


class CountingClock:
    """``time.monotonic`` that counts its reads (thread-safe enough: one reader thread)."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return time.monotonic()


def serve(
    loop: EventLoop,
    condition: Callable[[], bool],
    after_wakeup: Callable[[float], None] | None = None,
    timeout: float = 5.0,
) -> None:
    thread = threading.Thread(target=loop.run, args=(after_wakeup,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert thread.is_alive(), "EventLoop.run returned"
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.002)
    finally:
        loop.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_a_wakeup_without_timers_reads_the_clock_once_and_shares_now() -> None:
    """Readers, due timers and ``after_wakeup`` see one ``now``, read once after the wait."""
    clock = CountingClock()
    loop = EventLoop(clock=clock)
    a, b = socket.socketpair()
    a.setblocking(False)
    seen: list[tuple[str, float]] = []

    def reader(now: float) -> None:
        a.recv(1)
        seen.append(("reader", now))

    loop.add_reader(a.fileno(), reader)
    b.send(b"x")  # ready before run starts: the first wait returns at once
    serve(loop, lambda: len(seen) >= 2, lambda now: seen.append(("after", now)))
    assert seen[0][0] == "reader" and seen[1][0] == "after"
    assert seen[0][1] == seen[1][1], seen
    # one wake-up served the byte; the stop's wake-up may follow: one read each
    assert clock.reads <= loop.wakeups, (clock.reads, loop.wakeups)
    a.close()
    b.close()
    loop.close()


def test_a_due_timer_gets_the_wakeups_now_and_a_later_one_does_not_spin_the_loop() -> None:
    loop = EventLoop()
    fired: list[float] = []
    start = loop.clock()
    # deliberately not on a millisecond boundary: a timeout rounded down would spin
    loop.call_at(start + 0.0503, fired.append)
    serve(loop, lambda: bool(fired))
    assert fired[0] >= start + 0.0503
    assert loop.wakeups <= 4, f"{loop.wakeups} wake-ups for one timer 50 ms away"
    loop.close()


def test_a_hang_up_wakes_the_reader() -> None:
    """EPOLLHUP without EPOLLIN data still reaches the reader, which then sees EOF."""
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    eof: list[bytes] = []

    def reader(now: float) -> None:
        eof.append(a.recv(16))
        loop.remove_reader(a.fileno())

    loop.add_reader(a.fileno(), reader)
    b.close()
    serve(loop, lambda: bool(eof))
    assert eof == [b""]
    a.close()
    loop.close()


def test_a_descriptor_closed_before_removal_and_its_number_reused() -> None:
    """Closing first and removing after must not raise; a new descriptor under the same
    number is registered afresh and served."""
    loop = EventLoop()
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_reader(fd, lambda now: None)
    a.close()
    loop.remove_reader(fd)  # already gone from the epoll set with the file
    c, d = socket.socketpair()
    c.setblocking(False)
    got: list[bytes] = []
    loop.add_reader(c.fileno(), lambda now: got.append(c.recv(16)))
    d.send(b"after")
    serve(loop, lambda: bool(got))
    assert got[0] == b"after"
    for s in (b, c, d):
        s.close()
    loop.close()


def test_reader_and_writer_on_one_descriptor_and_a_flood_does_not_starve_another() -> None:
    """A reader that leaves data behind (a per-wake-up budget) is called again on every
    wake-up, and the other descriptors are still served alongside it."""
    loop = EventLoop()
    flood_r, flood_w = socket.socketpair()
    quiet_r, quiet_w = socket.socketpair()
    for s in (flood_r, quiet_r):
        s.setblocking(False)
    flood_w.send(b"f" * 4096)
    counts = {"flood": 0, "quiet": 0, "writable": 0}

    def flood(now: float) -> None:
        flood_r.recv(1)  # a budget of one byte per wake-up: stays readable
        counts["flood"] += 1

    def quiet(now: float) -> None:
        quiet_r.recv(16)
        counts["quiet"] += 1

    def writable(now: float) -> None:
        counts["writable"] += 1
        loop.remove_writer(quiet_r.fileno())

    loop.add_reader(flood_r.fileno(), flood)
    loop.add_reader(quiet_r.fileno(), quiet)
    loop.add_writer(quiet_r.fileno(), writable)
    quiet_w.send(b"q")
    serve(loop, lambda: counts["quiet"] >= 1 and counts["writable"] >= 1 and counts["flood"] >= 3)
    assert counts["quiet"] == 1 and counts["writable"] == 1
    for s in (flood_r, flood_w, quiet_r, quiet_w):
        s.close()
    loop.close()
