"""One module per CLI command; each has ``register(subparsers)``."""

from . import convert, run, train

COMMANDS = (train, convert, run)
