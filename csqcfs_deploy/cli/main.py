"""Command-line entry point: ``csqcfs-deploy <command> ...``.

Every user-caused error is a :class:`~csqcfs_deploy.errors.CsqcfsError`; it is
printed as one line ``error: ...`` on stderr and mapped to its exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from csqcfs_deploy import __version__
from csqcfs_deploy.cli.commands import COMMANDS
from csqcfs_deploy.errors import CsqcfsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csqcfs-deploy",
        description="Fold, quantize, export and verify CS-QCFS spiking networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except CsqcfsError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
