"""``sparsenets run RECIPE.yaml``: run, resume or reprint an experiment in its run directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import RecipeError
from ..experiments.protocols import PROTOCOLS
from ..experiments.recipe import Recipe, load_recipe
from ..experiments.runner import run_recipe

_FORMAT = argparse.RawDescriptionHelpFormatter


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", formatter_class=_FORMAT, help="run an experiment from a YAML recipe (resumable)",
        description="Run the experiment a YAML recipe describes: data, model, training, method "
                    f"({', '.join(PROTOCOLS)}) and sparsity config. Results, checkpoints, "
                    "plots and report.md go to the run directory; rerunning the same command "
                    "resumes an interrupted run, or reprints the summary of a finished one (its "
                    "results.json and metrics.jsonl rebuilt from the checkpoints). One run at a time "
                    "works in a directory: a second one fails at once, naming the first.",
        epilog="examples:\n  sparsenets run recipes/lth_mnist1d.yaml\n"
               "  sparsenets run recipes/oneshot_mnist1d.yaml --out runs/oneshot\n"
               "  sparsenets run recipes/slt_attention.yaml      # strong lottery tickets in attention\n\n"
               "recipe sections: name, description, seeds, threads, data, model, train, method, sparsity;\n"
               "see docs/experiments.md and the recipes/ directory.")
    run.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file")
    run.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    add_device_option(run)
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not Path(args.recipe).is_file():
        raise RecipeError(f"recipe file {args.recipe!r} not found")
    execute(load_recipe(args.recipe), args.out, args.device)
    return 0


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="DEVICE",
                        help="cpu, cuda, cuda:N or auto (CUDA if available); overrides the recipe's train.device. "
                             "A run directory may resume on another device")


def execute(recipe: Recipe, out: str | None, device: str | None = None) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (default ``runs/<name>``) on ``device`` (default: the recipe's);
    returns its results."""
    return run_recipe(recipe, out or Path("runs") / recipe.name, Console(), device=device)
