"""One module per CLI command; each has ``register(subparsers)``."""

from csqcfs_deploy.cli.commands import convert, demo, export, report, run, sweep, train, verify

COMMANDS = (train, convert, run, sweep, export, verify, report, demo)
