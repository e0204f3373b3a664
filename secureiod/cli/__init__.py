"""Command-line front ends (``secureioctl``; the daemon's own entry point lives elsewhere).

What every command shares lives here: the error type for mistakes a user can fix (printed
as one line, exit status 2, never a traceback), an argument parser that reports its errors
the same way, and the logging setup that sends diagnostics to stderr so that stdout stays
clean for data.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import NoReturn, TextIO

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "CliError",
    "add_logging_arguments",
    "setup_logging",
    "stdout_closed",
]

EXIT_OK = 0
EXIT_FAILURE = 1
"""The command ran but did not achieve what was asked (timeout, session closed)."""
EXIT_USAGE = 2
"""Bad arguments or unusable input files: fix the command line and retry."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, what a shell reports for a command killed by it)."""
EXIT_BROKEN_PIPE = 141
"""Whoever read our stdout went away (128 + SIGPIPE, as for a C tool killed by it)."""


class CliError(Exception):
    """A problem with the user's input; its message is the whole report: one line that names
    the thing and how to fix it."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (plus a pointer to --help) instead of a usage
    block, so that a script's log shows the actual problem."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def stdout_closed() -> int:
    """The reader of stdout went away (``secureioctl peers | head -1``): stop quietly.

    Writes to stdout then fail with ``BrokenPipeError``, and so would the interpreter's
    final flush of what is still buffered (printing "Exception ignored ..."); pointing
    the descriptor at /dev/null lets that flush succeed. Returns the exit status.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("diagnostics (on stderr)")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more detail: -v shows all informational messages, -vv debug",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only warnings and errors (no state changes)",
    )


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


def setup_logging(
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
