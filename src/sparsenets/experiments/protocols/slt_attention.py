"""``slt_attention``: strong lottery tickets inside multi-head attention (see
:mod:`sparsenets.experiments.slt_attention`): the relative MSE of an edge-popup subnetwork of a
random source attention to a random target, against the source's hidden size. No data set, model,
training or sparsity section: the options say everything."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from ..slt_attention import SLTAttentionConfig, random_target, search
from ..trainer import mix_seed
from .base import Context, Job, Options, Outcome, Protocol, register_protocol
from .edgepopup import EDGEPOPUP

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console

    from ..recipe import Recipe


class SLTAttentionOptions(Options, SLTAttentionConfig):
    """:class:`~sparsenets.experiments.slt_attention.SLTAttentionConfig`'s fields."""


@register_protocol("slt_attention")
class SLTAttentionProtocol(Protocol):
    Options = SLTAttentionOptions
    arms = (EDGEPOPUP,)
    sections = ()
    metric = ("relative_mse", "relative_mse")

    def jobs(self, recipe: Recipe) -> list[Job]:
        target = 1.0 - recipe.method["density"]
        return [Job(seed, "edgepopup", multiplier, target)
                for seed in recipe.seeds for multiplier in recipe.method["multipliers"]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        config = SLTAttentionConfig(**ctx.recipe.options("method"))
        target = random_target(config.dim, config.heads, mix_seed(job.seed, "target"))
        source, stats = search(target, job.level, config, mix_seed(job.seed, "source", job.level) % 2**31)
        return Outcome(source, [{"step": config.steps, **stats}])

    def result(self, job: Job, outcome: Outcome, ctx: Context) -> dict[str, Any]:
        stats = {k: v for k, v in outcome.history[-1].items() if k != "step"}
        return {"key": job.key, "seed": job.seed, "arm": job.arm, "level": job.level,
                "target_sparsity": job.target, "remaining": 1.0 - job.target, **stats}

    def describe(self, row: dict[str, Any]) -> str:
        return f"hidden {row['hidden']:>4}   relative MSE {row['relative_mse']:.4f}"

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        lines = ["Relative MSE E‖f_src − f_tgt‖² / E‖f_tgt‖² of the edge-popup subnetwork on fresh inputs "
                 "(1.0 is what the zero function gets), mean ± sample std over seeds.", ""]
        lines += ["| source hidden size | relative MSE (mean ± std) | min | max | seeds |", "|---|---|---|---|---|"]
        for hidden, errors in _by_hidden(results).items():
            mean, std = statistics.fmean(errors), statistics.stdev(errors) if len(errors) > 1 else 0.0
            lines.append(f"| {hidden} | {mean:.4f} ± {std:.4f} | {min(errors):.4f} | {max(errors):.4f} "
                         f"| {len(errors)} |")
        return lines

    def plots(self) -> dict[str, Any]:
        return {"error_vs_hidden.png": lambda results, history: error_vs_hidden(results)}

    def print_summary(self, results: dict[str, Any], console: Console) -> None:
        from rich.table import Table

        table = Table("source hidden size", "relative MSE (mean)", "min", "max", "seeds",
                      title=f"{results['name']}: edge-popup in random attention"
                            + ("" if results.get("complete") else " (incomplete run)"))
        for hidden, errors in _by_hidden(results).items():
            table.add_row(str(hidden), f"{statistics.fmean(errors):.4f}", f"{min(errors):.4f}",
                          f"{max(errors):.4f}", str(len(errors)))
        console.print(table)


def _by_hidden(results: dict[str, Any]) -> dict[int, list[float]]:
    groups: dict[int, list[float]] = {}
    for row in sorted(results["jobs"], key=lambda r: r["hidden"]):
        groups.setdefault(row["hidden"], []).append(row["relative_mse"])
    return groups


def error_vs_hidden(results: dict[str, Any]) -> Figure | None:
    """Relative MSE against the source's hidden size, every seed and the mean, on log-log axes."""
    from matplotlib.figure import Figure

    groups = _by_hidden(results)
    if not groups:
        return None
    rows = results["jobs"]
    figure = Figure(figsize=(6, 4))
    axis = figure.add_subplot()
    hidden = list(groups)
    axis.scatter([r["hidden"] for r in rows], [r["relative_mse"] for r in rows], s=14, color="tab:blue",
                 alpha=0.5, label="one seed")
    axis.plot(hidden, [statistics.fmean(e) for e in groups.values()], "o-", color="tab:blue", label="mean over seeds")
    axis.set_yscale("log")
    axis.set_xscale("log", base=2)
    axis.set_xticks(hidden, [str(h) for h in hidden])
    axis.set_xlabel("source query/key/value hidden size")
    axis.set_ylabel("relative MSE to the target attention")
    dim = rows[0]["hidden"] // rows[0]["multiplier"]
    axis.set_title(f"edge-popup in random attention: d={dim}, {100 * rows[0]['remaining']:g}% kept", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure
