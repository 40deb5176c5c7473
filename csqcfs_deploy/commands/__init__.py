"""One module per CLI command; each has ``register(subparsers)``."""

from . import convert, train

COMMANDS = (train, convert)
