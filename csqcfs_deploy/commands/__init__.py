"""One module per CLI command; each has ``register(subparsers)``."""

from . import convert, export, run, train

COMMANDS = (train, convert, run, export)
