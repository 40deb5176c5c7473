"""The command-line interface: ``csqcfs-deploy <command> ...``."""

from csqcfs_deploy.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
