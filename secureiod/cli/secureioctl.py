"""``secureioctl``: the control and test tool, one subcommand per module.

To add a subcommand, write a module with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int`` and list it in ``_subcommands``. ``run`` raises ``CliError`` for
anything the user must fix; ``main`` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from . import EXIT_INTERRUPTED, ArgumentParser, CliError, ctl, stdout_closed

__all__ = ["PROG", "build_parser", "main"]

PROG = "secureioctl"


def _subcommands() -> tuple[ModuleType | ctl.Subcommand, ...]:
    from . import cat

    return (cat, *ctl.ALL)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Control and test tool for secureiod and secureio sessions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _subcommands():
        sub_parser = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit
    status. Usage errors and ``CliError`` become one line on stderr and status 2 (or the
    error's own status); Ctrl-C and a closed stdout end quietly (130, 141)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args._run
    try:
        status = run(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return status
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
