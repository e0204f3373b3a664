"""Log lines the network can trigger, with a bounded volume.

A peer that roams every 20 ms, or an attacker replaying datagrams from ever new addresses,
must not be able to fill the journal: each such line goes through a ``RateLimitedLog``,
which lets one line per key (a peer, a reason) through per interval and reports how many
were held back on the next one. Memory is bounded too: the key table keeps the
``max_keys`` most recently used keys, and at most ``max_lines`` lines (over all keys) are
written per interval, so keys an attacker makes up cannot grow either the table or the log.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RateLimitedLog"]


class _Entry:
    __slots__ = ("last", "suppressed")

    def __init__(self, last: float) -> None:
        self.last = last
        self.suppressed = 0


class RateLimitedLog:
    """One line per key per ``interval`` seconds of the caller's clock (``now``).

    A line emitted after some were suppressed ends with
    `` (N similar suppressed in the last Xs)``, X being the time since that key's previous
    line. Over all keys, at most ``max_lines`` lines go out per interval; lines held back by
    that limit are summed up in one line when the next interval starts (on the next call).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 30.0,
        max_keys: int = 4096,
        max_lines: int = 256,
    ) -> None:
        if not interval > 0 or max_keys < 1 or max_lines < 1:
            raise ValueError("RateLimitedLog needs interval > 0, max_keys >= 1, max_lines >= 1")
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._window_start: float | None = None
        self._window_lines = 0
        self._over_budget = 0
        self._over_budget_level = logging.NOTSET

    def __len__(self) -> int:
        """Keys currently remembered (never more than ``max_keys``)."""
        return len(self._entries)

    def log(self, now: float, key: Hashable, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` had a line less than ``interval``
        ago; True when a line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            entries.move_to_end(key)
            if now - entry.last < self.interval:
                entry.suppressed += 1
                return False
        if not self._take_budget(now, level):
            return False
        if entry is None:
            if len(entries) >= self.max_keys:
                entries.popitem(last=False)
            entries[key] = _Entry(now)
            self.logger.log(level, msg, *args, stacklevel=2)
            return True
        if entry.suppressed:
            # The suffix holds no '%', so it is safe whether or not msg is %-formatted.
            msg = (
                f"{msg} ({entry.suppressed} similar suppressed in the last {now - entry.last:.0f}s)"
            )
        entry.last = now
        entry.suppressed = 0
        self.logger.log(level, msg, *args, stacklevel=2)
        return True

    def _take_budget(self, now: float, level: int) -> bool:
        """The global line budget of the current interval; starts a new interval (and
        reports what the old one held back) when due."""
        start = self._window_start
        if start is None or now - start >= self.interval:
            if self._over_budget:
                self.logger.log(
                    self._over_budget_level,
                    "%d log lines suppressed in the last %.0fs (limit %d lines per %.0fs)",
                    self._over_budget,
                    now - start if start is not None else 0.0,
                    self.max_lines,
                    self.interval,
                    stacklevel=3,
                )
            self._window_start = now
            self._window_lines = 0
            self._over_budget = 0
            self._over_budget_level = logging.NOTSET
        if self._window_lines >= self.max_lines:
            self._over_budget += 1
            self._over_budget_level = max(self._over_budget_level, level)
            return False
        self._window_lines += 1
        return True
