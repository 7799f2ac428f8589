"""Commands that need the ``experiments`` extra say so, instead of failing with a traceback.

``pip install sparsenets`` gives the core (sparsify, train in your loop, compress, save/load)
and the ``compress`` command; ``demo``, ``run`` and ``report`` need the experiment stack
from ``pip install 'sparsenets[experiments]'``. Two ways to use this module:

* in a command handler, before importing the experiment stack::

      def _run(args):
          require_experiments()
          from ..experiments.runner import run_recipe
          ...

* in :func:`sparsenets.cli.build_parser`, ``add_commands(commands, name)`` in place of
  ``importlib.import_module(name).add_commands(commands)``: a command module that can't be
  imported without the extra still lists its command, which then prints :data:`MESSAGE`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Any, NoReturn

# Top-level modules of the `experiments` extra (see pyproject.toml).
EXPERIMENT_MODULES: tuple[str, ...] = ("rich", "matplotlib", "mnist1d", "sklearn", "pydantic")

# The commands of the modules that need the extra, for listing them when it is missing.
EXPERIMENT_COMMANDS: dict[str, tuple[str, ...]] = {
    "sparsenets.cli.demo": ("demo",),
    "sparsenets.cli.run": ("run",),
    "sparsenets.cli.report": ("report",),
}

MESSAGE = "error: this command needs the experiment extra: pip install 'sparsenets[experiments]'"
EXIT_STATUS = 2  # bad input: the fix is on the user's side (install the extra)


def missing_experiment_modules(*modules: str) -> list[str]:
    """Those of ``modules`` (default: all of :data:`EXPERIMENT_MODULES`) that can't be found."""
    missing = []
    for name in modules or EXPERIMENT_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def is_missing_extra(err: ImportError) -> bool:
    """Whether ``err`` is the import of an experiment-stack module failing."""
    return (err.name or "").split(".")[0] in EXPERIMENT_MODULES


def fail() -> NoReturn:
    print(MESSAGE, file=sys.stderr)
    raise SystemExit(EXIT_STATUS)


def require_experiments(*modules: str) -> None:
    """Exit with :data:`MESSAGE` unless the experiment extra (or those of its ``modules``) is installed.

    ``require_experiments("rich")`` for a command that needs only ``rich``.
    """
    if missing_experiment_modules(*modules):
        fail()


def _unavailable(args: argparse.Namespace) -> int:
    fail()


class _Unavailable(argparse.Action):
    """Takes whatever follows the command (``--help`` included) and prints :data:`MESSAGE`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        fail()


def add_commands(subparsers: argparse._SubParsersAction, module_name: str) -> None:
    """``module_name``'s ``add_commands(subparsers)``; without the extra, stand-ins that say what to install."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if module_name not in EXPERIMENT_COMMANDS or not is_missing_extra(err):
            raise
        for command in EXPERIMENT_COMMANDS[module_name]:
            stand_in = subparsers.add_parser(command, add_help=False, prefix_chars="\0",
                                             help="(needs: pip install 'sparsenets[experiments]')")
            stand_in.add_argument("arguments", nargs="*", action=_Unavailable)
            stand_in.set_defaults(func=_unavailable)
        return
    module.add_commands(subparsers)
