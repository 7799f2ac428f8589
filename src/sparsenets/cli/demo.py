"""``sparsenets demo``: lottery tickets on MNIST-1D, end to end, then the winning ticket compressed."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..experiments.recipe import load_recipe
from ..experiments.rundir import RunDir
from .run import add_device_option, execute

# A lottery-ticket experiment on MNIST-1D sized for a couple of CPU minutes.
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


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="lottery tickets on MNIST-1D, end to end, in about a CPU minute",
        description="Train LeNet-300-100 on MNIST-1D dense, find lottery tickets by iterative magnitude "
                    "pruning (IMP), train the two controls (same mask re-initialised; random mask of the "
                    "same per-layer densities), then print a summary table and write plots and report.md.",
        epilog="examples:\n  sparsenets demo\n  sparsenets demo --out /tmp/demo\n\n"
               "Interrupt it any time: the same command resumes from the last finished network.\n"
               "The recipe it runs is recipes/lottery_demo.yaml; print it with --show-recipe.")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--show-recipe", action="store_true", help="print the demo's recipe and exit")
    add_device_option(demo)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.show_recipe:
        print(DEMO_RECIPE, end="")
        return 0
    recipe = load_recipe(DEMO_RECIPE)
    results = execute(recipe, args.out, args.device)
    from ..experiments.deploy import compress_winning_ticket  # the kernels load only when needed

    with RunDir(args.out).locked() as run_dir:  # it writes ticket.safetensors into the run directory
        compress_winning_ticket(run_dir, recipe, results, Console())
    return 0
