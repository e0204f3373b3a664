"""Rate-limited logging (issue 10 item 8): a flood on one key is one line plus a count, the
key table and the total line count stay bounded, and levels are honoured."""

from __future__ import annotations

import logging

import pytest

from secureiod.logs import RateLimitedLog

NAME = "secureiod.test.ratelimit"


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger=NAME)
    return logging.getLogger(NAME)


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == NAME]


def test_flood_on_one_key_is_one_line_then_a_count(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    rl = RateLimitedLog(logger, interval=30.0)
    emitted = 0
    for i in range(10_000):  # 10,000 calls over 10 s of virtual time
        emitted += rl.log(i * 0.001, "peer-a", logging.INFO, "peer %s roamed to %s", "a", i)
    assert emitted == 1
    assert [r.getMessage() for r in lines(caplog)] == ["peer a roamed to 0"]

    # Still inside the interval: nothing.
    assert not rl.log(29.9, "peer-a", logging.INFO, "peer %s roamed to %s", "a", "x")
    # The next line after the interval carries the count of what was held back.
    assert rl.log(30.0, "peer-a", logging.INFO, "peer %s roamed to %s", "a", "y")
    last = lines(caplog)[-1].getMessage()
    assert last == "peer a roamed to y (10000 similar suppressed in the last 30s)"
    # ... and the count starts again from zero.
    assert rl.log(61.0, "peer-a", logging.INFO, "quiet %s", "again")
    assert lines(caplog)[-1].getMessage() == "quiet again"
    assert len(lines(caplog)) == 3


def test_keys_are_independent(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logger, interval=30.0)
    assert rl.log(0.0, ("peer", "a"), logging.WARNING, "a")
    assert rl.log(0.0, ("peer", "b"), logging.WARNING, "b")
    assert not rl.log(1.0, ("peer", "a"), logging.WARNING, "a")
    assert [r.getMessage() for r in lines(caplog)] == ["a", "b"]


def test_percent_in_a_message_without_args(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    rl = RateLimitedLog(logger, interval=1.0)
    rl.log(0.0, "k", logging.INFO, "100% loss")
    rl.log(0.5, "k", logging.INFO, "100% loss")
    rl.log(2.0, "k", logging.INFO, "100% loss")
    assert [r.getMessage() for r in lines(caplog)] == [
        "100% loss",
        "100% loss (1 similar suppressed in the last 2s)",
    ]


def test_key_table_is_bounded(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logger, interval=30.0, max_keys=64, max_lines=1_000_000)
    for i in range(20_000):  # attacker-chosen keys, e.g. spoofed source addresses
        rl.log(i * 0.0001, ("198.18.0.1", i), logging.INFO, "refused datagram from %s", i)
        assert len(rl) <= 64
    assert len(rl) == 64
    # The most recently used keys are the ones kept.
    assert not rl.log(2.5, ("198.18.0.1", 19_999), logging.INFO, "again")


def test_recently_used_key_survives_eviction(logger: logging.Logger) -> None:
    rl = RateLimitedLog(logger, interval=30.0, max_keys=4)
    emitted = int(rl.log(0.0, "peer", logging.INFO, "peer line"))
    for i in range(100):
        rl.log(0.01 * i, i, logging.INFO, "noise")
        emitted += rl.log(0.01 * i, "peer", logging.INFO, "peer line")  # keeps "peer" fresh
    assert emitted == 1  # never evicted, so never let through again within the interval
    assert len(rl) == 4


def test_total_lines_per_interval_are_bounded(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    rl = RateLimitedLog(logger, interval=30.0, max_lines=10)
    for i in range(1000):
        rl.log(i * 0.01, i, logging.INFO, "distinct key %d", i)
    assert len(lines(caplog)) == 10
    # The next interval's first call reports what the limit held back.
    assert rl.log(31.0, "new", logging.INFO, "fresh")
    messages = [r.getMessage() for r in lines(caplog)]
    assert messages[-2] == "990 log lines suppressed in the last 31s (limit 10 lines per 30s)"
    assert messages[-1] == "fresh"


def test_levels_are_honoured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    rl = RateLimitedLog(logging.getLogger(NAME), interval=30.0)
    assert rl.log(0.0, "w", logging.WARNING, "warn line")
    assert rl.log(0.0, "e", logging.ERROR, "error line")
    assert rl.log(0.0, "i", logging.INFO, "info line")
    # Below the logger's level: not written, and it does not use up the key's interval.
    assert not rl.log(0.0, "d", logging.DEBUG, "debug line")
    records = lines(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "warn line"),
        (logging.ERROR, "error line"),
        (logging.INFO, "info line"),
    ]
    # The record points at the caller, not at logs.py.
    assert all(r.pathname == __file__ for r in records)
    assert rl.log(0.0, "d", logging.WARNING, "now loud enough")


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger(NAME), interval=0)
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger(NAME), max_keys=0)
