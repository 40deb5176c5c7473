"""Command-line entry point: ``csqcfs-deploy <command> ...``.

Every user-caused error is a :class:`~csqcfs_deploy.errors.CsqcfsError`; it is
printed as one line ``error: ...`` on stderr and mapped to its exit code. So are
the parser's own complaints (a bad option value: exit 8, like :class:`UsageError`).
Anything else is a bug: one line ``error: internal error: ...`` and exit 1; the
traceback only with ``CSQCFS_DEBUG=1`` in the environment. Live progress bars are
cleared first, so that the error line is a line of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from tqdm import tqdm

from csqcfs_deploy import __version__
from csqcfs_deploy.cli.commands import COMMANDS
from csqcfs_deploy.errors import CsqcfsError, UsageError
from csqcfs_deploy.interrupts import Terminated, signals_as_exceptions

#: Set (to anything but "" or "0") to get the traceback of an internal error.
DEBUG_ENV = "CSQCFS_DEBUG"
#: The longest message of an internal error that is printed (its repr may be huge).
INTERNAL_MESSAGE_CHARS = 300
INTERNAL_EXIT_CODE = 1


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line, exit 8 (UsageError's);
    its sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(UsageError.exit_code, f"error: {self.prog}: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="csqcfs-deploy",
        description="Fold, quantize, export and verify CS-QCFS spiking networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def clear_progress_bars() -> None:
    """Close every live tqdm bar without leaving it on screen: a command that fails
    inside a loop leaves its bar open, and the error would be glued to it."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        with contextlib.suppress(ValueError, OSError):  # its stream is already closed
            bar.close()


def print_error(message: str, exit_code: int) -> int:
    """Clear the progress bars, print ``error: <message>`` as one line on stderr and
    return ``exit_code``."""
    clear_progress_bars()
    text = " ".join(message.split())
    print(f"error: {text}", file=sys.stderr)
    return exit_code


def debug_enabled() -> bool:
    """Whether ``CSQCFS_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def print_internal_error(exc: Exception) -> int:
    """The safety net for a bug: one line naming the exception, exit 1 (the traceback
    before it only with ``CSQCFS_DEBUG=1``)."""
    clear_progress_bars()
    if debug_enabled():
        traceback.print_exception(exc)
    detail = " ".join(str(exc).split())
    if len(detail) > INTERNAL_MESSAGE_CHARS:
        detail = detail[:INTERNAL_MESSAGE_CHARS] + "..."
    name = type(exc).__name__ + (f": {detail}" if detail else "")
    return print_error(f"internal error: {name} (please report; rerun with {DEBUG_ENV}=1 "
                       "for the traceback)", INTERNAL_EXIT_CODE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with signals_as_exceptions():  # SIGTERM/SIGHUP unwind, so temp files are removed
            return int(args.func(args))
    except CsqcfsError as exc:
        return print_error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return print_error("interrupted", 130)
    except Terminated as exc:
        return print_error(str(exc), exc.exit_code)
    except Exception as exc:  # a bug: still one line for the user, never a traceback
        return print_internal_error(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
