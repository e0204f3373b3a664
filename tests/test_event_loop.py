"""The event loop survives a failing callback (issue 10, review).

A bug, or an input nobody foresaw, raising inside one reader, writer, timer or pending
callback used to end ``EventLoop.run`` and with it the tunnel. Now the loop counts it,
logs one rate-limited line and carries on. Real ``EventLoop``, real sockets.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest

from secureiod.daemon.loop import EventLoop


def run_until(loop: EventLoop, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert thread.is_alive(), "EventLoop.run returned: a callback's exception ended it"
            assert time.monotonic() < deadline, "condition not reached in time"
            time.sleep(0.005)
    finally:
        loop.stop()
        thread.join(5)
    assert not thread.is_alive()


def loop_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "secureiod.daemon.loop"]


def test_every_kind_of_callback_may_fail_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="secureiod.daemon.loop")
    loop = EventLoop()
    a, b = socket.socketpair()
    a.setblocking(False)
    trace: list[str] = []

    def bad_reader(now: float) -> None:
        a.recv(4096)
        trace.append("reader")
        raise RuntimeError("a bug in a reader")

    def bad_writer(now: float) -> None:
        loop.remove_writer(a.fileno())
        trace.append("writer")
        raise KeyError("a bug in a writer")

    def bad_timer(now: float) -> None:
        trace.append("timer")
        raise ValueError("a bug in a timer")

    def bad_pending(now: float) -> None:
        trace.append("pending")
        raise ZeroDivisionError("a bug in a pending callback")

    wakeups = [0]

    def after_wakeup(now: float) -> None:
        wakeups[0] += 1
        if wakeups[0] == 1:
            raise OSError("a bug after a wake-up")

    loop.add_reader(a.fileno(), bad_reader)
    loop.add_writer(a.fileno(), bad_writer)
    now = loop.clock()
    loop.call_at(now, bad_timer)
    loop.call_at(now + 0.05, lambda now: trace.append("later timer"))
    loop.call_soon_threadsafe(bad_pending)
    loop.call_soon_threadsafe(lambda now: trace.append("next pending"))
    b.send(b"x")
    thread = threading.Thread(target=loop.run, args=(after_wakeup,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while "later timer" not in trace or trace.count("reader") < 2:
            assert thread.is_alive(), "EventLoop.run returned"
            assert time.monotonic() < deadline, trace
            if trace.count("reader") == 1:
                b.send(b"y")  # the reader is still registered and still served
            time.sleep(0.01)
    finally:
        loop.stop()
        thread.join(5)
    assert not thread.is_alive()
    for step in ("writer", "timer", "pending", "next pending", "later timer"):
        assert step in trace, (step, trace)
    # writer, timer, pending, every reader call, and after_wakeup once
    assert loop.callback_failures == 3 + trace.count("reader") + 1
    messages = [r.getMessage() for r in loop_records(caplog)]
    assert all(r.exc_info is None and r.levelno == logging.ERROR for r in loop_records(caplog))
    assert all("\n" not in m for m in messages)
    reader_lines = [m for m in messages if "bad_reader" in m]
    assert len(reader_lines) == 1, messages  # the second failure: same key, held back
    assert reader_lines[0].startswith(
        "event loop: test_every_kind_of_callback_may_fail_and_the_loop_goes_on.<locals>."
        "bad_reader failed: RuntimeError: a bug in a reader (at test_event_loop.py:"
    )
    assert reader_lines[0].endswith("); carrying on")
    for text in ("KeyError: 'a bug in a writer'", "ValueError: a bug in a timer"):
        assert any(text in m for m in messages), messages
    assert any("ZeroDivisionError" in m for m in messages)
    assert any("after_wakeup failed: OSError" in m for m in messages)
    a.close()
    b.close()
    loop.close()


def test_a_callback_failing_on_every_wakeup_logs_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A level-triggered reader that raises before reading fails on every wake-up: the
    failures are all counted, the log gets one line, and timers still run."""
    caplog.set_level(logging.DEBUG, logger="secureiod.daemon.loop")
    loop = EventLoop()
    a, b = socket.socketpair()
    b.send(b"never read")
    ticks: list[float] = []

    def tick(now: float) -> None:
        ticks.append(now)
        loop.call_at(now + 0.01, tick)

    def broken(now: float) -> None:
        raise IndexError("always")

    loop.add_reader(a.fileno(), broken)
    loop.call_at(loop.clock(), tick)
    run_until(loop, lambda: loop.callback_failures > 1000 and len(ticks) > 10)
    assert len(loop_records(caplog)) == 1
    a.close()
    b.close()
    loop.close()


def test_keyboard_interrupt_still_ends_the_loop() -> None:
    """Only ``Exception``s are survived: Ctrl-C in the foreground still stops the daemon."""
    loop = EventLoop()

    def interrupt(now: float) -> None:
        raise KeyboardInterrupt

    loop.call_at(loop.clock(), interrupt)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    loop.close()
