"""Command-line front ends (``secureioctl``; the daemon's own entry point lives elsewhere).

What every command shares lives here: the error type for mistakes a user can fix (printed
as one line, exit status 2, never a traceback), an argument parser that reports its errors
the same way. (Their logging setup is ``secureiod.logs.setup_cli_logging``: diagnostics on
stderr, so that stdout stays clean for data.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import NoReturn

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "CliError",
    "add_logging_arguments",
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
