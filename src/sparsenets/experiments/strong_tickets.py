"""Strong-lottery-ticket experiments from a YAML recipe: ``sparsenets slt RECIPE``.

Two experiments, picked by the recipe's ``experiment`` key:

- ``slt_attention``: approximate a random ``nn.MultiheadAttention`` by a subnetwork of a wider
  random attention (see :mod:`.slt_attention`), error against the source's hidden size.
- ``edgepopup``: on MNIST-1D, a trained dense MLP against edge-popup subnetworks of the same
  MLP at random (signed Kaiming constant) weights and lottery jackpots of its trained weights.

::

    name: slt_attention
    experiment: slt_attention
    seeds: [0, 1, 2]
    options: {dim: 8, heads: 2, multipliers: [1, 2, 4, 8, 16]}

Results go to ``runs/<name>/``: ``results.json``, ``report.md`` and, for attention, a plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console

from ..errors import ConfigError
from ..methods.edgepopup import edge_popup_, finalize_, lottery_jackpot_
from ..report import report
from ..utils import atomic
from .data import load_dataset
from ..models import build_model
from .slt_attention import SLTAttentionConfig, approximate, random_target
from .trainer import TrainConfig, Trainer, mix_seed

EXPERIMENTS = ("slt_attention", "edgepopup")


@dataclass
class EdgePopupConfig:
    """Dense training (``train``), then the subnetwork search over scores (``search``)."""

    hidden: list[int] = field(default_factory=lambda: [300, 100])
    density: float = 0.5
    init: str = "signed_constant"
    num_samples: int = 5000
    train: dict[str, Any] = field(default_factory=lambda: {
        "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "epochs": 40, "batch_size": 100, "schedule": "cosine"})
    search: dict[str, Any] = field(default_factory=lambda: {
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 40, "batch_size": 100, "schedule": "cosine"})


OPTIONS = {"slt_attention": SLTAttentionConfig, "edgepopup": EdgePopupConfig}


@dataclass
class StrongTicketRecipe:
    name: str
    experiment: str
    seeds: list[int]
    options: Any
    threads: int = 1

    @classmethod
    def load(cls, path: str | Path) -> StrongTicketRecipe:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping with name, experiment, seeds, options")
        unknown = sorted(set(data) - {"name", "description", "experiment", "seeds", "options", "threads"})
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; valid: name, description, experiment, seeds, "
                              f"options, threads")
        experiment = data.get("experiment")
        if experiment not in EXPERIMENTS:
            raise ConfigError(f"{path}: experiment must be one of {', '.join(EXPERIMENTS)}, got {experiment!r}")
        seeds = data.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ConfigError(f"{path}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
        option_class = OPTIONS[experiment]
        options = data.get("options") or {}
        valid = [f.name for f in dataclasses.fields(option_class)]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise ConfigError(f"{path}: unknown option(s) {bad} for {experiment}; valid: {', '.join(valid)}")
        recipe = cls(str(data.get("name", experiment)), experiment, seeds, option_class(**options),
                     int(data.get("threads", 1)))
        if experiment == "edgepopup":  # fail before anything runs
            TrainConfig.from_dict(recipe.options.train)
            TrainConfig.from_dict(recipe.options.search)
        return recipe


# ---- experiments -----------------------------------------------------------------------------


def run_slt_attention(recipe: StrongTicketRecipe, console: Console) -> list[dict[str, Any]]:
    config: SLTAttentionConfig = recipe.options
    rows = []
    for seed in recipe.seeds:
        target = random_target(config.dim, config.heads, mix_seed(seed, "target"))
        for multiplier in config.multipliers:
            started = time.perf_counter()
            source_seed = mix_seed(seed, "source", multiplier) % 2**31
            row = {"seed": seed, **approximate(target, multiplier, config, source_seed)}
            rows.append(row)
            console.print(f"  seed {seed}  hidden {row['hidden']:>4}  relative MSE {row['relative_mse']:.4f}  "
                          f"({time.perf_counter() - started:.1f} s)")
    return rows


def run_edgepopup(recipe: StrongTicketRecipe, console: Console) -> list[dict[str, Any]]:
    config: EdgePopupConfig = recipe.options
    data = load_dataset("mnist1d", num_samples=config.num_samples)
    train, search = TrainConfig.from_dict(config.train), TrainConfig.from_dict(config.search)

    def fresh(seed: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, "init"))
            return build_model("lenet_300_100", data.input_shape, data.num_classes, hidden=config.hidden)

    rows = []
    for seed in recipe.seeds:
        dense = fresh(seed)
        random_weights = fresh(seed)
        edge_popup_(random_weights, config.density, init=config.init, seed=mix_seed(seed, "edgepopup") % 2**31)
        jackpot = fresh(seed)  # gets the dense weights once they are trained
        for arm, model in (("dense", dense), ("edgepopup", random_weights), ("jackpot", jackpot)):
            started = time.perf_counter()
            if arm == "jackpot":
                model.load_state_dict(dense.state_dict())
                lottery_jackpot_(model, config.density)
            history = Trainer(model, data, train if arm == "dense" else search, seed=seed).fit()
            finalize_(model, as_masks=True)  # no-op on the dense network
            row = {"seed": seed, "arm": arm, "weights_kept": report(model).density,
                   "test_accuracy": history[-1]["test_accuracy"]}
            rows.append(row)
            console.print(f"  seed {seed}  {arm:<9}  {100 * row['weights_kept']:5.1f}% of weights  test accuracy "
                          f"{100 * row['test_accuracy']:5.1f}%  ({time.perf_counter() - started:.1f} s)")
    return rows


# ---- summaries -------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(experiment: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table of the means ± sample std over seeds."""
    key, value = ("hidden", "relative_mse") if experiment == "slt_attention" else ("arm", "test_accuracy")
    groups: dict[Any, list[float]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row[value])
    if experiment == "slt_attention":
        lines = ["| source hidden size | relative MSE (mean ± std) | min | max | seeds |", "|---|---|---|---|---|"]
        for hidden, errors in groups.items():
            mean, std = _mean_std(errors)
            lines.append(f"| {hidden} | {mean:.4f} ± {std:.4f} | {min(errors):.4f} | {max(errors):.4f} "
                         f"| {len(errors)} |")
    else:
        lines = ["| network | weights kept | test accuracy % (mean ± std) | seeds |", "|---|---|---|---|"]
        for arm, accuracy in groups.items():
            kept = statistics.fmean(r["weights_kept"] for r in rows if r["arm"] == arm)
            mean, std = _mean_std([100 * a for a in accuracy])
            lines.append(f"| {arm} | {100 * kept:.0f}% | {mean:.1f} ± {std:.1f} | {len(accuracy)} |")
    return "\n".join(lines) + "\n"


def plot_slt_attention(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    hidden = sorted({r["hidden"] for r in rows})
    axis.scatter([r["hidden"] for r in rows], [r["relative_mse"] for r in rows], s=14, color="tab:blue",
                 alpha=0.5, label="one seed")
    axis.plot(hidden, [statistics.fmean(r["relative_mse"] for r in rows if r["hidden"] == h) for h in hidden],
              "o-", color="tab:blue", label="mean over seeds")
    axis.set_yscale("log")
    axis.set_xscale("log", base=2)
    axis.set_xticks(hidden, [str(h) for h in hidden])
    axis.set_xlabel("source query/key/value hidden size")
    axis.set_ylabel("relative MSE to the target attention")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    atomic.write_with(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)


def run(recipe: StrongTicketRecipe, out: Path, console: Console) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        runner = run_slt_attention if recipe.experiment == "slt_attention" else run_edgepopup
        rows = runner(recipe, console)
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    table = summarise(recipe.experiment, rows)
    results = {"name": recipe.name, "experiment": recipe.experiment,
               "options": dataclasses.asdict(recipe.options), "rows": rows}
    atomic.write_json(out / "results.json", results)
    report = f"# {recipe.name}\n\n{table}"
    if recipe.experiment == "slt_attention":
        o = recipe.options
        plot_slt_attention(rows, out / "error_vs_hidden.png",
                           f"edge-popup in random attention: d={o.dim}, H={o.heads}, {100 * o.density:g}% kept")
        report += "\n![error vs hidden size](error_vs_hidden.png)\n"
    atomic.write_text(out / "report.md", report)
    console.print(table)
    console.print(f"results: {out}/results.json   report: {out}/report.md")
    return results


# ---- command line ----------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slt", help="strong lottery tickets: edge-popup on MNIST-1D, or SLTs inside attention",
        description="Run a strong-lottery-ticket recipe (experiment: slt_attention or edgepopup); "
                    "writes results.json, report.md and, for attention, a plot of error vs hidden size.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  sparsenets slt recipes/slt_attention.yaml       # SLTs inside attention, ~4 CPU minutes\n"
               "  sparsenets slt recipes/edgepopup_mnist1d.yaml   # edge-popup and jackpots on MNIST-1D\n")
    parser.add_argument("recipe", help="YAML recipe file")
    parser.add_argument("--out", help="output directory (default: runs/<recipe name>)")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    return run_command(args.recipe, args.out)


def run_command(recipe_path: str, out: str | None) -> int:
    """``sparsenets slt`` (and ``sparsenets run`` on a recipe with an ``experiment:`` key)."""
    console = Console()
    try:
        recipe = StrongTicketRecipe.load(recipe_path)
    except (ConfigError, TypeError, ValueError, yaml.YAMLError) as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        return 2
    run(recipe, Path(out or Path("runs") / recipe.name), console)
    return 0
