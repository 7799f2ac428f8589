"""The ``sparsenets`` command line.

Each feature area registers its own subcommands through ``add_commands(subparsers)`` in the
modules listed below, so this file stays a table of contents.

Exit status: 0 success; 2 bad input, fix what you asked for (arguments, the recipe, the run
directory: another recipe's, in use, a damaged file in it); 1 the system failed, fix the
machine and rerun (disk full, permission denied, I/O error); 130 interrupted. Commands raise
:class:`SparsenetsError` or ``OSError`` and :func:`main` prints one ``error:`` line naming
the file; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import SparsenetsError
from . import _extras

COMMAND_MODULES: tuple[str, ...] = ("sparsenets.cli.demo", "sparsenets.cli.run", "sparsenets.cli.report",
                                     "sparsenets.cli.bench", "sparsenets.cli.compress", "sparsenets.cli.prune",
                                     "sparsenets.cli.quantize")
BAD_INPUT, SYSTEM_ERROR, INTERRUPTED = 2, 1, 130

_EPILOG = """\
examples:
  sparsenets demo                              # lottery tickets on MNIST-1D, a couple of CPU minutes
  sparsenets run recipes/lth_mnist1d.yaml      # any recipe; rerun the same command to resume
  sparsenets report runs/demo                  # the summary of a run directory
  sparsenets prune ./llama --pattern 2:4 --out ./llama-2of4   # SparseGPT on a Hugging Face checkpoint
  sparsenets quantize ./llama --bits 4 --out ./llama-int4      # GPTQ on a Hugging Face checkpoint
  sparsenets COMMAND --help                    # each command's options and examples

exit status: 0 success, 1 system error (disk full, permission denied),
2 bad input (arguments, recipe, run directory), 130 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsenets", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Find, train and run sparse neural networks on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"sparsenets {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        _extras.add_commands(commands, name)  # without the experiment extra: stand-ins naming it
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except SparsenetsError as err:
        return _error(str(err), BAD_INPUT)
    except OSError as err:
        return _error(_describe(err), SYSTEM_ERROR)


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _describe(err: OSError) -> str:
    """``path: reason``, the way other command-line tools report a failed file operation."""
    if err.filename is None or err.strerror is None:
        return str(err)
    both = f"{err.filename} -> {err.filename2}" if err.filename2 is not None else str(err.filename)
    return f"{both}: {err.strerror}"


if __name__ == "__main__":
    sys.exit(main())
