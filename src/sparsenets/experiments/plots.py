"""Plots of a run directory: accuracy vs weights remaining, training curves, per-layer density,
accuracy vs training time.

Built from ``results.json`` and ``metrics.jsonl`` alone, so ``sparsenets report`` can redraw
them. Uses matplotlib's object API (no pyplot), so no display or global state is involved.
Which plots a run gets is its protocol's choice (``Protocol.plots``); these are the defaults.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..utils import atomic
from .protocols import Protocol, arm

if TYPE_CHECKING:
    from .rundir import RunDir

Maker = Callable[[dict[str, Any], list[dict[str, Any]]], Any]  # (results, metrics rows) → Figure or None


def accuracy_plots(protocol: Protocol) -> dict[str, Maker]:
    """The default plots of an accuracy-vs-sparsity protocol, its arms in its order."""
    arms = [a.name for a in protocol.arms]
    return {"accuracy_vs_remaining.png": lambda results, history: accuracy_vs_remaining(results, arms),
            "training_curves.png": lambda results, history: training_curves(results, history, arms),
            "layer_density.png": lambda results, history: layer_density(results, arms)}


def write_all(run_dir: RunDir, results: dict[str, Any], makers: dict[str, Maker],
              only_missing: bool = False) -> list[Path]:
    """Write every plot that has data; returns their paths."""
    history = _read_metrics(run_dir.metrics_file)
    written = []
    for name, make in makers.items():
        path = run_dir.plots / name
        if not (only_missing and path.exists()):
            figure = make(results, history)
            if figure is None:
                continue
            atomic.write_with(path, partial(figure.savefig, format="png", dpi=120, bbox_inches="tight"))
        written.append(path)
    return written


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log_percent(axis: Any) -> None:
    """Log scale labelled 1%, 2%, 5%, 10%, ... on one axis (``ax.xaxis`` or ``ax.yaxis``)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
    axis.set_minor_formatter(NullFormatter())


def _remaining_axis(axis: Any) -> None:
    axis.set_xscale("log")
    axis.invert_xaxis()  # more pruning to the right
    _log_percent(axis.xaxis)
    axis.set_xlabel("weights remaining")


def accuracy_vs_remaining(results: dict[str, Any], arms: list[str]) -> Figure | None:
    """Mean test accuracy per level with ± std error bars (the seed spread), dense as a band."""
    entries = results["summary"]
    if not entries or all(e["remaining"] == 1.0 for e in entries):  # nothing pruned (e.g. dropout runs)
        return None
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot()
    levels = sorted({e["remaining"] for e in entries if e["arm"] != "dense"})
    for e in (e for e in entries if e["arm"] == "dense"):
        mean, std = 100 * e["accuracy_mean"], 100 * e["accuracy_std"]
        dense = arm("dense")
        axis.axhline(mean, color=dense.color, linestyle="--", label=f"{dense.label} ({mean:.1f}%)")
        if std > 0 and levels:
            axis.axhspan(mean - std, mean + std, color=dense.color, alpha=0.08)
    for name in (a for a in arms if a != "dense"):
        points = sorted((e for e in entries if e["arm"] == name), key=lambda e: -e["remaining"])
        if points:
            axis.errorbar([p["remaining"] for p in points], [100 * p["accuracy_mean"] for p in points],
                          yerr=[100 * p["accuracy_std"] for p in points], marker="o", markersize=4, capsize=3,
                          color=arm(name).color, linestyle=arm(name).linestyle, label=arm(name).label)
    if levels:
        _remaining_axis(axis)
    axis.set_ylabel("test accuracy (%)")
    seeds = max(e["seeds"] for e in entries)
    axis.set_title(f"{results['name']}: mean ± std over {seeds} seed(s)")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    return figure


def training_curves(results: dict[str, Any], history: list[dict[str, Any]], order: list[str]) -> Figure | None:
    """Test accuracy against training step, one line per level (mean over seeds), one panel per arm."""
    arms = [a for a in order if a != "dense" and any(h["arm"] == a for h in history)] or ["dense"]
    if not history:
        return None
    if all(h["level"] == 0 for h in history):
        return _arm_curves(history, order)
    remaining = {(e["arm"], e["level"]): e["remaining"] for e in results["summary"]}
    figure = Figure(figsize=(4.5 * len(arms), 4))
    axes = figure.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for axis, name in zip(axes, arms):
        curves: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for h in history:
            if h["arm"] in (name, "dense"):
                curves[h["level"]][h["step"]].append(100 * h["test_accuracy"])
        levels = sorted(curves)
        for i, level in enumerate(levels):
            steps = sorted(curves[level])
            color = "black" if level == 0 else _viridis(i / max(len(levels) - 1, 1))
            share = remaining.get((name, level), remaining.get(("dense", level), 1.0))
            axis.plot(steps, [statistics.fmean(curves[level][s]) for s in steps], color=color, linewidth=1.2,
                      label=f"{100 * share:.1f}%" if level else "dense")
        axis.set_title(arm(name).label)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        if len(levels) <= 14:
            axis.legend(fontsize=7, title="weights left", title_fontsize=7, ncol=2)
    axes[0].set_ylabel("test accuracy (%)")
    return figure


def _arm_curves(history: list[dict[str, Any]], order: list[str]) -> Figure:
    """One panel, one line per arm: for runs whose arms all train the full network."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot()
    for name in (a for a in order if any(h["arm"] == a for h in history)):
        curve: dict[int, list[float]] = defaultdict(list)
        for h in history:
            if h["arm"] == name:
                curve[h["step"]].append(100 * h["test_accuracy"])
        steps = sorted(curve)
        dropout_run = name == "dense" and any(h["arm"] == "dropout" for h in history)
        axis.plot(steps, [statistics.fmean(curve[s]) for s in steps], color=arm(name).color, linewidth=1.2,
                  linestyle=arm(name).linestyle, label="no dropout" if dropout_run else arm(name).label)
    axis.set_xlabel("training step")
    axis.set_ylabel("test accuracy (%), mean over seeds")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def accuracy_vs_time(results: dict[str, Any], history: list[dict[str, Any]], order: list[str]) -> Figure | None:
    """Test accuracy against training wall-clock seconds (evaluations excluded), one line per arm, one
    panel per sparsity level; dense in every panel. Each point is the mean over seeds of one evaluation
    (seconds and accuracy), the band the seeds' min-max accuracy. None for runs without ``seconds``
    (those written before it was measured)."""
    timed = [h for h in history if "seconds" in h]
    if not timed:
        return None
    targets = {(r["arm"], r["level"]): r["target_sparsity"] for r in results["jobs"]}
    levels = sorted({h["level"] for h in timed if h["arm"] != "dense"}) or [0]
    figure = Figure(figsize=(6.5 * len(levels), 4.5))
    axes = figure.subplots(1, len(levels), sharey=True, squeeze=False)[0]
    names = [a for a in order if any(h["arm"] == a for h in timed)]
    names += sorted({h["arm"] for h in timed} - set(names))  # arms of an older or newer protocol version
    for axis, level in zip(axes, levels):
        for name in names:
            # step → the seeds' (seconds, accuracy) at that evaluation
            points: dict[int, list[tuple[float, float]]] = defaultdict(list)
            for h in timed:
                if h["arm"] == name and (h["level"] == level or name == "dense"):
                    points[h["step"]].append((h["seconds"], 100 * h["test_accuracy"]))
            if not points:
                continue
            steps = sorted(points)
            seconds = [statistics.fmean(t for t, _ in points[s]) for s in steps]
            accuracy = [statistics.fmean(a for _, a in points[s]) for s in steps]
            look = arm(name)
            axis.plot(seconds, accuracy, color=look.color, linestyle=look.linestyle, linewidth=1.2,
                      label=f"{look.label} ({accuracy[-1]:.1f}%, {seconds[-1]:.1f} s)")
            if any(len(points[s]) > 1 for s in steps):
                axis.fill_between(seconds, [min(a for _, a in points[s]) for s in steps],
                                  [max(a for _, a in points[s]) for s in steps], color=look.color, alpha=0.12,
                                  linewidth=0)
        target = next((t for (a, lv), t in targets.items() if lv == level and a != "dense"), None)
        axis.set_title(f"{results['name']}: {100 * target:g}% sparsity" if target is not None else results["name"])
        axis.set_xlabel("training time (s, evaluations excluded)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    seeds = len({h["seed"] for h in timed})
    axes[0].set_ylabel(f"test accuracy (%), mean over {seeds} seed(s)")
    return figure


def _viridis(x: float) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 * x)


def layer_density(results: dict[str, Any], order: list[str]) -> Figure | None:
    """Each layer's density against the whole network's, for the first sparse arm (mean over seeds)."""
    name = next((a for a in order if arm(a).sparse and any(r["arm"] == a for r in results["jobs"])), None)
    if name is None:
        return None
    per_level: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in results["jobs"]:
        if row["arm"] in (name, "dense"):
            per_level[row["level"]].append(row)
    levels = sorted(per_level)
    overall = [statistics.fmean(r["remaining"] for r in per_level[level]) for level in levels]
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot()
    for layer in per_level[levels[0]][0]["layers"]:
        density = [statistics.fmean(r["layers"][layer] for r in per_level[level]) for level in levels]
        axis.plot(overall, density, marker="o", markersize=3, label=layer)
    _remaining_axis(axis)
    axis.set_yscale("log")
    _log_percent(axis.yaxis)
    axis.set_ylabel("layer density (weights kept)")
    axis.set_title(f"{results['name']}: per-layer density, {arm(name).label}")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7, ncol=2)
    return figure
