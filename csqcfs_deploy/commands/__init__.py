"""One module per CLI command; each has ``register(subparsers)``."""

from . import convert, export, report, run, train, verify

COMMANDS = (train, convert, run, export, report, verify)
