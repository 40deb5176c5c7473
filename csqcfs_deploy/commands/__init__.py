"""One module per CLI command; each has ``register(subparsers)``."""

from . import convert, demo, export, report, run, train, verify

COMMANDS = (train, convert, run, export, verify, report, demo)
