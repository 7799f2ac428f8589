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

if TYPE_CHECKING:
    from .runner import RunDir

ARMS = ("dense", "imp", "oneshot", "gradual", "rigl", "set", "static", "blkrew", "srste", "pgf", "dropout", "sparsedrop",
        "reinit", "random")
LABELS = {"dense": "dense", "imp": "IMP ticket", "oneshot": "one-shot", "gradual": "gradual",
          "reinit": "reinit control", "random": "random-prune control",
          "rigl": "RigL", "set": "SET", "static": "static sparse", "blkrew": "BLK-REW",
          "srste": "SR-STE", "pgf": "progressive gradient flow", "dropout": "nn.Dropout", "sparsedrop": "SparseDrop"}
SHORT = {"dense": "dense", "imp": "IMP", "oneshot": "one-shot", "gradual": "gradual", "reinit": "reinit",
         "random": "random", "rigl": "RigL", "set": "SET",
         "static": "static", "blkrew": "BLK-REW", "srste": "SR-STE", "pgf": "PGF",
         "dropout": "Dropout", "sparsedrop": "SparseDrop"}


def aggregate(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (arm, level): accuracy mean, sample std, min and max over seeds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["level"]), []).append(row)
    out = []
    for (arm, level), members in sorted(groups.items(), key=lambda item: (item[0][1], ARMS.index(item[0][0]))):
        accuracy = [m["test_accuracy"] for m in members]
        out.append({
            "arm": arm, "level": level, "seeds": len(members), "target_sparsity": members[0]["target_sparsity"],
            "remaining": statistics.fmean(m["remaining"] for m in members),
            "accuracy_mean": statistics.fmean(accuracy),
            "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
            "accuracy_min": min(accuracy), "accuracy_max": max(accuracy),
        })
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a sparsenets run directory?")
    return json.loads(path.read_text())


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    mean = 100 * entry["accuracy_mean"]
    return f"{mean:.1f} ± {100 * entry['accuracy_std']:.1f}" if entry["seeds"] > 1 else f"{mean:.1f}"


def pivot(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per level, one accuracy column (percent) per arm."""
    entries = results["summary"]
    arms = [arm for arm in ARMS if any(e["arm"] == arm for e in entries)]
    header = ["level", "remaining %", *(SHORT[a] for a in arms)]
    rows = []
    for level in sorted({e["level"] for e in entries}):
        at_level = {e["arm"]: e for e in entries if e["level"] == level}
        main = next(at_level[a] for a in ARMS if a in at_level)
        rows.append([str(level), f"{100 * main['remaining']:.2f}", *(_cell(at_level.get(a)) for a in arms)])
    return header, rows


def findings(results: dict[str, Any]) -> list[str]:
    """For lottery runs, the two claims of the lottery ticket hypothesis, checked on the means."""
    entries = results["summary"]
    by = {(e["arm"], e["level"]): e for e in entries}
    dense = by.get(("dense", 0))
    tickets = [e for e in entries if e["arm"] == "imp"]
    if results.get("method") != "lottery" or dense is None or not tickets:
        return []
    lines = []
    sparse = [e for e in tickets if e["remaining"] <= 0.20]
    if sparse:
        matching = [e for e in sparse if e["accuracy_mean"] >= dense["accuracy_mean"]]
        best = max(sparse, key=lambda e: e["accuracy_mean"])
        lines.append(f"IMP tickets at <= 20% of the weights: {len(matching)} of {len(sparse)} levels reach the dense "
                     f"accuracy ({_cell(dense)}%); best {_cell(best)}% at {100 * best['remaining']:.1f}% of the weights.")
    for ticket in tickets:
        reinit = by.get(("reinit", ticket["level"]))
        if ticket["remaining"] <= 0.07 and reinit is not None:
            gap = 100 * (ticket["accuracy_mean"] - reinit["accuracy_mean"])
            lines.append(f"At {100 * ticket['remaining']:.1f}% of the weights: IMP {_cell(ticket)}% vs reinit "
                         f"{_cell(reinit)}%, a gap of {gap:+.1f} points.")
    return lines


def print_summary(results: dict[str, Any], console: Console) -> None:
    header, rows = pivot(results)
    seeds = max((e["seeds"] for e in results["summary"]), default=0)
    title = f"{results['name']}: test accuracy (%), mean ± std over {seeds} seed(s)"
    if not results.get("complete", False):
        title += " (incomplete run)"
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in findings(results):
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
    for (arm, level), members in sorted(groups.items(), key=lambda item: (item[0][1], ARMS.index(item[0][0]))):
        cells = [f"{statistics.fmean(m.get(n, float('nan')) for m in members):.3f}" for n in names]
        lines.append(f"| {SHORT[arm]} | {level} | " + " | ".join(cells) + " |")
    return lines


def write_report(run_dir: RunDir, results: dict[str, Any], plot_files: list[Path]) -> None:
    header, rows = pivot(results)
    lines = [f"# {results['name']}", ""]
    recipe_text = run_dir.recipe_file.read_text() if run_dir.recipe_file.exists() else ""
    seeds = max((e["seeds"] for e in results["summary"]), default=0)
    intro = (f"Method `{results['method']}`. Test accuracy (%), mean ± sample standard deviation over "
             f"{seeds} seed(s); *remaining* is the percentage of weights kept in all prunable layers.")
    if results["method"] == "lottery":
        intro += (" IMP: lottery tickets; reinit: a ticket's mask on a fresh initialisation; random: a random "
                  "mask with the ticket's per-layer densities.")
    if not results.get("complete"):
        intro += " **The run is incomplete.**"
    lines += [intro, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if found := findings(results):
        lines += ["", "## Findings", "", *(f"- {line}" for line in found)]
    lines += activation_table(results)
    if plot_files:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir.path).as_posix()})" for p in plot_files]
    lines += ["", "## Reproduce", "", "```bash", f"sparsenets run {run_dir.recipe_file} --out NEW_RUN_DIR", "```",
              "", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    atomic.write_text(run_dir.report_file, "\n".join(lines))
