"""``sparsenets report RUN_DIR``: the summary of a run directory, its derived files brought up to date.

With the directory to itself (its lock free), report rebuilds results.json and metrics.jsonl
from the checkpoints (when recipe.yaml is there) and writes missing plots and report.md.
While a run holds the directory, or if it is not writable, report only reads: it prints
results.json as it stands and writes nothing, so it never races the run's own writes.
"""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from ..errors import RunDirError
from ..experiments import summary
from ..experiments.protocols import PROTOCOLS
from ..experiments.recipe import load_recipe
from ..experiments.rundir import RunDir
from ..experiments.runner import finish


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", formatter_class=argparse.RawDescriptionHelpFormatter, help="print the summary of a run directory",
        description="Print the summary table of a run directory, after rebuilding its results.json and "
                    "metrics.jsonl from the checkpoints; write its plots and report.md if they are "
                    "missing (or always, with --regenerate). While a run is working in the directory, "
                    "only print its results so far.",
        epilog="examples:\n  sparsenets report runs/demo\n  sparsenets report runs/lth_mnist1d --regenerate")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'sparsenets run' or 'demo'")
    report.add_argument("--regenerate", action="store_true", help="redraw the plots and rewrite report.md")
    report.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    run_dir, console = RunDir(args.run_dir), Console()
    if not run_dir.results_file.exists():  # checked first: report leaves no .lock in a stranger's directory
        raise RunDirError(f"{run_dir.path} has no results.json: not a sparsenets run directory, or no network "
                          f"finished yet")
    busy = _busy(run_dir)
    if busy:
        console.print(f"{run_dir.path} is {busy}; its results.json as it stands, nothing rewritten:", soft_wrap=True)
        summary.print_summary(run_dir.read_results(), console)
        return 0
    try:
        rebuilt = _rebuild(run_dir)
        run_dir.read_results()  # without a recipe to rebuild from, a damaged results.json stops here
        finish(run_dir, console, regenerate=args.regenerate or rebuilt)
    finally:
        run_dir.unlock()
    return 0


def _busy(run_dir: RunDir) -> str | None:
    """Why report may only read the directory, or None once it holds the lock."""
    if not os.access(run_dir.path, os.W_OK):  # someone else's finished run, a read-only mount
        return "not writable"
    holder = run_dir.try_lock()
    return None if holder is None else f"in use by {holder}"


def _rebuild(run_dir: RunDir) -> bool:
    """Rebuild results.json and metrics.jsonl from the checkpoints; whether they changed."""
    if not run_dir.recipe_file.exists():
        return False
    recipe = load_recipe(run_dir.recipe_file)
    jobs = PROTOCOLS[recipe.method["name"]].jobs(recipe)
    return run_dir.write_logs(recipe, jobs, run_dir.completed(jobs))
