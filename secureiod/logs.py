"""Logging: where lines go (the journal, stderr) and how many the network can cause.

``setup_daemon_logging`` sends the daemon's lines to the journal when stderr is connected to
it, else to stderr; ``setup_cli_logging`` gives command-line tools the ``prog: message``
shape on stderr.

Log lines the network can trigger, with a bounded volume:

A peer that roams every 20 ms, or an attacker replaying datagrams from ever new addresses,
must not be able to fill the journal: each such line goes through a ``RateLimitedLog``,
which lets one line per key (a peer, a reason) through per interval and reports how many
were held back on the next one. Memory is bounded too: the key table keeps the
``max_keys`` most recently used keys, and at most ``max_lines`` lines (over all keys) are
written per interval, so keys an attacker makes up cannot grow either the table or the log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Final, TextIO

__all__ = ["RateLimitedLog", "setup_cli_logging", "setup_daemon_logging"]

logger = logging.getLogger(__name__)


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


# --- where lines go --------------------------------------------------------------------------

SYSLOG_IDENTIFIER: Final = "secureiod"
_HANDLER_NAME: Final = "secureiod"


_SYSLOG_PRIORITY: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4))


class _PriorityPrefixFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes (sd-daemon(3)) for stderr that is connected to the
    journal when systemd-python is missing: journald strips them and keeps the levels."""

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for lvl, p in _SYSLOG_PRIORITY if record.levelno >= lvl), None)
        if priority is None:
            priority = 6 if record.levelno >= logging.INFO else 7
        return f"<{priority}>{super().format(record)}"


def _stderr_on_journal(environ: Mapping[str, str]) -> bool:
    """systemd's documented check: ``JOURNAL_STREAM`` is ``st_dev:st_ino`` of the stream it
    connected, so a matching fd 2 was not redirected since (systemd.exec(5))."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    try:
        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    except Exception as exc:  # any failure here just means "use stderr"
        logger.debug("cannot create a journal handler: %s", exc)
        return None
    return handler


def _parse_level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelNamesMapping().get(level.strip().upper())
    if value is None:
        raise ValueError(f"unknown log level {level!r}")
    return value


def setup_daemon_logging(level: int | str, *, force_stderr: bool = False) -> str:
    """Send the root logger to the journal when stderr is connected to it, else to stderr.

    Returns ``"journal"`` or ``"stderr"``. Native journal entries keep the level as
    PRIORITY and the logger name as a field; plain stderr gets a compact line with a
    timestamp. Calling it again replaces the handler it installed before and leaves any
    other handler alone.
    """
    numeric = _parse_level(level)
    on_journal = _stderr_on_journal(os.environ)
    handler = None if force_stderr or not on_journal else _journal_handler()
    kind = "journal"
    if handler is None:
        kind = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        if on_journal and not force_stderr:
            handler.setFormatter(_PriorityPrefixFormatter("%(name)s: %(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter(
                    "%(asctime)s.%(msecs)03d %(levelname).1s %(name)s: %(message)s",
                    datefmt="%H:%M:%S",
                )
            )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    return kind


class _Formatter(logging.Formatter):
    """``prog: message`` for information, ``prog: warning: message`` for problems: the
    conventional shape of a command-line tool's stderr."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self._prog = prog

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        line = f"{self._prog}: {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_cli_logging(
    prog: str,
    verbose: int,
    quiet: bool,
    *,
    informative: tuple[str, ...] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure the root logger for a command.

    By default only warnings are shown, plus INFO from the ``informative`` loggers (e.g. the
    session's state changes, which a user of a test tool wants to see); ``-v`` shows all
    INFO, ``-vv`` DEBUG, ``-q`` warnings only.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(prog))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if verbose >= 2:
        root.setLevel(logging.DEBUG)
    elif verbose == 1:
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.WARNING)
        if not quiet:
            for name in informative:
                logging.getLogger(name).setLevel(logging.INFO)
