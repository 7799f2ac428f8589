"""The ``sparsenets`` command line.

Each feature area registers its own subcommands through ``add_commands(subparsers)`` in the
modules listed below, so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__

COMMAND_MODULES: tuple[str, ...] = ("sparsenets.experiments.commands", "sparsenets.bench", "sparsenets.cli.compress",
                                     "sparsenets.experiments.strong_tickets")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsenets",
        description="Find, train and run sparse neural networks on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"sparsenets {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
