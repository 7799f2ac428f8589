"""Summaries of a run: per-level means over seeds, as a terminal table, markdown and findings."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..utils import atomic
from .protocols import ARMS, PROTOCOLS, Protocol, arm

if TYPE_CHECKING:
    from .rundir import RunDir


def protocol_of(results: dict[str, Any]) -> Protocol:
    """The protocol that wrote ``results`` (the base defaults for an unknown one)."""
    return PROTOCOLS.get(results.get("method", ""), Protocol())


def _metrics() -> dict[str, str]:
    """Result key → summary prefix, for every registered protocol's headline metric."""
    return dict(p.metric for p in PROTOCOLS.values())


def _order(name: str) -> int:
    return list(ARMS).index(name) if name in ARMS else len(ARMS)


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (arm, level): the headline metric's mean, sample std, min and max over seeds
    (``accuracy_mean``, ... for accuracy), the mean share of weights remaining."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["level"]), []).append(row)
    out = []
    for (name, level), members in sorted(groups.items(), key=lambda item: (item[0][1], _order(item[0][0]))):
        entry = {"arm": name, "level": level, "seeds": len(members), "target_sparsity": members[0]["target_sparsity"],
                 "remaining": statistics.fmean(m["remaining"] for m in members)}
        for key, prefix in _metrics().items():
            if all(key in m for m in members):
                entry.update(_spread(prefix, [m[key] for m in members]))
        out.append(entry)
    return out


def _spread(prefix: str, values: list[float]) -> dict[str, float]:
    return {f"{prefix}_mean": statistics.fmean(values),
            f"{prefix}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            f"{prefix}_min": min(values), f"{prefix}_max": max(values)}


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a sparsenets run directory?")
    return json.loads(path.read_text())


def cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    mean = 100 * entry["accuracy_mean"]
    return f"{mean:.1f} ± {100 * entry['accuracy_std']:.1f}" if entry["seeds"] > 1 else f"{mean:.1f}"


def pivot(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per level, one accuracy column (percent) per arm."""
    entries = results["summary"]
    arms = sorted({e["arm"] for e in entries}, key=_order)
    header = ["level", "remaining %", *(arm(a).column for a in arms)]
    rows = []
    for level in sorted({e["level"] for e in entries}):
        at_level = {e["arm"]: e for e in entries if e["level"] == level}
        main = next(at_level[a] for a in arms if a in at_level)
        rows.append([str(level), f"{100 * main['remaining']:.2f}", *(cell(at_level.get(a)) for a in arms)])
    return header, rows


def print_summary(results: dict[str, Any], console: Console) -> None:
    """The run's summary on the terminal, as its protocol prints it."""
    protocol_of(results).print_summary(results, console)


def print_accuracy(results: dict[str, Any], console: Console, protocol: Protocol) -> None:
    """The default summary: the accuracy pivot table, then the protocol's findings."""
    header, rows = pivot(results)
    seeds = max((e["seeds"] for e in results["summary"]), default=0)
    title = f"{results['name']}: test accuracy (%), mean ± std over {seeds} seed(s)"
    if not results.get("complete", False):
        title += " (incomplete run)"
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in protocol.findings(results):
        console.print(line)


def activation_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: the nonzero fraction of each activation's outputs on test inputs, per arm and level."""
    rows = [r for r in results["jobs"] if r.get("activations")]
    if not rows:
        return []
    names = list(rows[0]["activations"])
    groups: dict[tuple[str, int], list[dict[str, float]]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["level"]), []).append(r["activations"])
    lines = ["", "## Activation density", "",
             "Fraction of nonzero outputs of each activation module on 1000 test inputs, mean over seeds.", "",
             "| arm | level | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for (name, level), members in sorted(groups.items(), key=lambda item: (item[0][1], _order(item[0][0]))):
        cells = [f"{statistics.fmean(m.get(n, float('nan')) for m in members):.3f}" for n in names]
        lines.append(f"| {arm(name).column} | {level} | " + " | ".join(cells) + " |")
    return lines


def accuracy_report(results: dict[str, Any], protocol: Protocol) -> list[str]:
    """The default report body: accuracy per level and arm, the protocol's findings, activation densities."""
    header, rows = pivot(results)
    seeds = max((e["seeds"] for e in results["summary"]), default=0)
    intro = (f"Method `{results['method']}`. Test accuracy (%), mean ± sample standard deviation over "
             f"{seeds} seed(s); *remaining* is the percentage of weights kept in all prunable layers.")
    if protocol.legend:
        intro += " " + protocol.legend
    if not results.get("complete"):
        intro += " **The run is incomplete.**"
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if found := protocol.findings(results):
        lines += ["", "## Findings", "", *(f"- {line}" for line in found)]
    return lines + activation_table(results)


def write_report(run_dir: RunDir, results: dict[str, Any], body: list[str], plot_files: list[Path]) -> None:
    """report.md: the title, ``body`` (the protocol's tables and findings), the plots, the recipe."""
    lines = [f"# {results['name']}", ""]
    recipe_text = run_dir.recipe_file.read_text() if run_dir.recipe_file.exists() else ""
    if not results.get("complete") and not any("incomplete" in line for line in body):
        lines += ["**The run is incomplete.**", ""]
    lines += body
    if plot_files:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir.path).as_posix()})" for p in plot_files]
    lines += ["", "## Reproduce", "", "```bash", f"sparsenets run {run_dir.recipe_file} --out NEW_RUN_DIR", "```",
              "", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    atomic.write_text(run_dir.report_file, "\n".join(lines))
