"""The run directory: one experiment's files, guarded against mixing experiments.

::

    recipe.yaml          the resolved recipe (every default written out)
    checkpoints/*.pt     one per completed job: weights, masks, history, result
    metrics.jsonl        one line per evaluation of every completed job
    results.json         per-job results and the per-level summary ("complete": true at the end)
    plots/*.png, report.md

The checkpoints are the truth; the other files are rebuilt from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from ..errors import RunDirError
from ..utils import atomic
from . import summary

if TYPE_CHECKING:
    from .protocols import Job
    from .recipe import Recipe


class RunDir:
    """The files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe_file = self.path / "recipe.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.results_file = self.path / "results.json"
        self.report_file = self.path / "report.md"
        self.checkpoints = self.path / "checkpoints"
        self.plots = self.path / "plots"

    def checkpoint(self, key: str) -> Path:
        return self.checkpoints / f"{key}.pt"

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuse a directory that holds a different experiment."""
        if not self.recipe_file.exists():
            if self.path.exists() and any(not p.name.startswith(atomic.TEMP_PREFIX) for p in self.path.iterdir()):
                raise RunDirError(f"{self.path} is not empty and holds no recipe.yaml; "
                                  f"choose another output directory (--out)")
            return
        saved = yaml.safe_load(self.recipe_file.read_text())
        differences = _differences(saved, recipe.to_dict())
        if differences:
            shown = "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
            raise RunDirError(f"{self.path} holds a run of a different recipe ({shown}); use another "
                              f"--out directory, or delete {self.path} to start over")

    def start(self, recipe: Recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(self.path)
        if not self.recipe_file.exists():
            atomic.write_text(self.recipe_file, recipe.to_yaml())

    def load_checkpoint(self, key: str) -> dict[str, Any]:
        return torch.load(self.checkpoint(key), map_location="cpu", weights_only=True)

    def completed(self, jobs: list[Job]) -> dict[str, dict[str, Any]]:
        """Records (history and result) of the jobs that have a checkpoint."""
        done = {}
        for job in jobs:
            if self.checkpoint(job.key).exists():
                checkpoint = self.load_checkpoint(job.key)
                done[job.key] = {"history": checkpoint["history"], "result": checkpoint["result"]}
        return done

    def write_logs(self, recipe: Recipe, jobs: list[Job], done: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Rewrite metrics.jsonl and results.json from the completed jobs, in job order."""
        finished = [job for job in jobs if job.key in done]
        atomic.write_jsonl(self.metrics_file, [
            {"job": job.key, "seed": job.seed, "arm": job.arm, "level": job.level, **row}
            for job in finished for row in done[job.key]["history"]])
        rows = [done[job.key]["result"] for job in finished]
        results = {"name": recipe.name, "method": recipe.method["name"], "complete": len(finished) == len(jobs),
                   "jobs": rows, "summary": summary.aggregate(rows)}
        atomic.write_json(self.results_file, results)
        return results


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if old == new else [f"{where}: {old!r} in the directory, {new!r} now"]
