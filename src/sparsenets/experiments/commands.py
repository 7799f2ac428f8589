"""``sparsenets demo``, ``sparsenets run RECIPE`` and ``sparsenets report RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from rich.console import Console

from ..errors import ConfigError
from .protocols import PROTOCOLS
from .recipe import load_recipe
from ..errors import RunDirError
from .rundir import RunDir
from .runner import finish, run_recipe
from .summary import load_results

# The demo: a lottery-ticket experiment on MNIST-1D sized for a couple of CPU minutes.
# recipes/lottery_demo.yaml holds the same text (a test keeps them equal).
DEMO_RECIPE = """\
name: lottery_demo
description: >-
  Lottery tickets on MNIST-1D in a couple of CPU minutes: LeNet-300-100, iterative magnitude
  pruning (36% of the remaining weights per level) with late rewinding to update 40, and
  both controls, over two seeds.
seeds: [0, 1]
threads: 1
data: {name: mnist1d}
model: {name: lenet_300_100}
train: {optimizer: sgd, lr: 0.2, momentum: 0.9, epochs: 20, batch_size: 100, schedule: cosine}
method: {name: lottery, prune_fraction: 0.36, rewind_step: 40, controls: [reinit, random]}
sparsity: {sparsity: 0.94, pattern: unstructured, criterion: magnitude, allocation: global}
"""

_FORMAT = argparse.RawDescriptionHelpFormatter


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", formatter_class=_FORMAT, help="lottery tickets on MNIST-1D, end to end, in about a CPU minute",
        description="Train LeNet-300-100 on MNIST-1D dense, find lottery tickets by iterative magnitude "
                    "pruning (IMP), train the two controls (same mask re-initialised; random mask of the "
                    "same per-layer densities), then print a summary table and write plots and report.md.",
        epilog="examples:\n  sparsenets demo\n  sparsenets demo --out /tmp/demo\n\n"
               "Interrupt it any time: the same command resumes from the last finished network.\n"
               "The recipe it runs is recipes/lottery_demo.yaml; print it with --show-recipe.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--show-recipe", action="store_true", help="print the demo's recipe and exit")
    demo.set_defaults(func=_demo)

    run = subparsers.add_parser(
        "run", formatter_class=_FORMAT, help="run an experiment from a YAML recipe (resumable)",
        description="Run the experiment a YAML recipe describes: data, model, training, method "
                    f"({', '.join(PROTOCOLS)}) and sparsity config. Results, checkpoints, "
                    "plots and report.md go to the run directory; rerunning the same command "
                    "resumes an interrupted run, or reprints the summary of a finished one.",
        epilog="examples:\n  sparsenets run recipes/lth_mnist1d.yaml\n"
               "  sparsenets run recipes/oneshot_mnist1d.yaml --out runs/oneshot\n"
               "  sparsenets run recipes/slt_attention.yaml      # strong lottery tickets in attention\n\n"
               "recipe sections: name, description, seeds, threads, data, model, train, method, sparsity;\n"
               "see docs/experiments.md and the recipes/ directory.")
    run.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file")
    run.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    run.set_defaults(func=_run)

    report = subparsers.add_parser(
        "report", formatter_class=_FORMAT, help="print the summary of a run directory",
        description="Print the summary table of a run directory; write its plots and report.md if "
                    "they are missing (or always, with --regenerate).",
        epilog="examples:\n  sparsenets report runs/demo\n  sparsenets report runs/lth_mnist1d --regenerate")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'sparsenets run' or 'demo'")
    report.add_argument("--regenerate", action="store_true", help="redraw the plots and rewrite report.md")
    report.set_defaults(func=_report)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    if args.show_recipe:
        print(DEMO_RECIPE, end="")
        return 0
    code = _execute(DEMO_RECIPE, args.out)
    if code == 0:
        from .deploy import compress_winning_ticket  # the kernels load only when needed

        run_dir = RunDir(args.out)
        compress_winning_ticket(run_dir, load_recipe(DEMO_RECIPE), load_results(run_dir.results_file), Console())
    return code


def _run(args: argparse.Namespace) -> int:
    if not Path(args.recipe).is_file():
        return _fail(f"recipe file {args.recipe!r} not found")
    if _is_strong_ticket_recipe(args.recipe):  # edge-popup / SLT-in-attention experiments
        from .strong_tickets import run_command

        return run_command(args.recipe, args.out)
    return _execute(args.recipe, args.out)


def _is_strong_ticket_recipe(path: str) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False  # load_recipe reports it
    return isinstance(data, dict) and "experiment" in data


def _execute(source: str, out: str | None) -> int:
    try:
        recipe = load_recipe(source)
        run_recipe(recipe, out or Path("runs") / recipe.name, Console())
    except (ConfigError, RunDirError) as err:
        return _fail(str(err))
    return 0


def _report(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if not run_dir.results_file.exists():
        return _fail(f"{args.run_dir} has no results.json: not a sparsenets run directory, or no network "
                     f"finished yet")
    finish(run_dir, Console(), regenerate=args.regenerate)
    return 0
