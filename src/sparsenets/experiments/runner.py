"""Run a recipe into a run directory, resumably.

A run directory holds::

    recipe.yaml          the resolved recipe (every default written out)
    checkpoints/*.pt     one per completed job: weights, masks, history, result
    metrics.jsonl        one line per evaluation of every completed job
    results.json         per-job results and the per-level summary ("complete": true at the end)
    plots/*.png, report.md

Every file is written atomically, and the checkpoints are the truth: on a rerun the jobs
with a checkpoint are skipped and ``metrics.jsonl``/``results.json`` are rebuilt from them,
so a run killed at any point resumes where it stopped and ends with the same results as an
uninterrupted run. That holds because every random choice is a function of the recipe's
seed and the job (initialisation, data order, masks, dropout): nothing depends on what ran
before in the same process, so no RNG state needs carrying over.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from .. import batches as B
from ..activations import activation_density
from ..errors import ConfigError
from ..methods import apply_masks, copy_masks, rewind_, snapshot
from ..models import build_model
from ..report import report
from ..targets import find_units
from ..utils import atomic
from . import plots, summary
from .data import Dataset, load_dataset
from .devices import check_precision, resolve_device
from .protocols import PROTOCOLS, Job, Outcome, Protocol
from .recipe import Recipe, RecipeError
from .rundir import RunDir
from .trainer import TrainConfig, Trainer, batches, mix_seed

CHECKPOINT_FORMAT = 1
CALIBRATION_BATCHES = 8
PROBE_SAMPLES = 1000  # test inputs on which each trained network's activation densities are measured



class RunContext:
    """What protocols use to build, restore and train models (see ``protocols.Context``).

    ``data`` is None for a protocol that uses no data set (its recipe has no data section).
    Models live on ``device`` (initialised on the CPU, so every device starts from the same
    weights); checkpoints hold CPU tensors.
    """

    def __init__(self, recipe: Recipe, data: Dataset | None, run_dir: RunDir, progress: Progress | None = None,
                 device: torch.device | None = None) -> None:
        self.recipe, self.data, self.run_dir, self.progress = recipe, data, run_dir, progress
        self.device = device or torch.device("cpu")
        self.steps_per_epoch = 0
        if data is not None and recipe.train is not None:
            self.steps_per_epoch = -(-len(data.y_train) // recipe.train.batch_size)

    @property
    def dataset(self) -> Dataset:
        """``data``, for what needs it: building, calibrating, training and measuring models."""
        if self.data is None:
            raise RuntimeError(f"method {self.recipe.method['name']!r} uses no data set")
        return self.data

    def new_model(self, init_seed: int) -> nn.Module:
        return self._cpu_model(init_seed).to(self.device)

    def _cpu_model(self, init_seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return build_model(self.recipe.model["name"], self.dataset.input_shape, self.dataset.num_classes,
                               **self.recipe.options("model"))

    def restore(self, key: str) -> nn.Module:
        checkpoint = self.run_dir.load_checkpoint(key)
        model = apply_masks(self._cpu_model(0), checkpoint["masks"])
        return rewind_(model, checkpoint["weights"]).to(self.device)

    def calibration(self, seed: int) -> list:
        """A few training batches for criteria that score with data (snip, grasp, taylor, wanda)."""
        found = itertools.islice(batches(self.dataset, self.recipe.train.batch_size, seed), CALIBRATION_BATCHES)
        return [B.to_device(batch, self.device) for batch in found]

    def extra(self, key: str) -> dict[str, Any]:
        return B.to_device(self.run_dir.load_checkpoint(key)["extra"], self.device)

    def train(self, model: nn.Module, job: Job, hooks: Sequence[Any] = (), start_step: int = 0,
              config: TrainConfig | None = None) -> list[dict[str, float]]:
        config = dataclasses.replace(config or self.recipe.train, device=str(self.device))  # the run's device
        trainer = Trainer(model, self.dataset, config, seed=job.seed, hooks=hooks)
        progress = self.progress
        if progress is None:
            return trainer.fit(start_step)
        task = progress.add_task(f"  {job.key}", total=trainer.total_steps - start_step)
        trainer.on_step = lambda step: progress.advance(task)
        try:
            return trainer.fit(start_step)
        finally:
            progress.remove_task(task)

    def result_row(self, job: Job, outcome: Outcome) -> dict[str, Any]:
        """The default result of a job: densities, final accuracy and losses, activation densities."""
        probe = self.dataset.x_test[:PROBE_SAMPLES].to(self.device)
        return result_row(job, outcome.model, outcome.history, probe)

    def check(self, protocol: Protocol) -> None:
        """Fail before anything is written if the model can't be built, can't take the sparsity config,
        or the protocol's own checks fail."""
        if self.recipe.model is not None:
            try:
                model = self.new_model(0)
            except ValueError as err:  # options the model's own code refuses (a bad cell, a patch that doesn't fit)
                raise RecipeError(f"model: {err}") from None
            if self.recipe.sparsity is not None:
                try:
                    find_units(model, self.recipe.sparsity)
                except (ValueError, ConfigError) as err:
                    raise RecipeError(f"sparsity: {err}") from None
        try:
            protocol.check(self)
        except ConfigError as err:
            raise RecipeError(str(err)) from None


def result_row(job: Job, model: nn.Module, history: list[dict[str, float]], probe: Tensor) -> dict[str, Any]:
    """One trained network's numbers; ``probe`` (test inputs) measures its activation densities."""
    table = report(model)
    final = history[-1]
    return {"key": job.key, "seed": job.seed, "arm": job.arm, "level": job.level, "target_sparsity": job.target,
            "remaining": table.density, "test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"],
            "train_loss": final["train_loss"], "layers": {row.name: row.density for row in table.rows},
            "activations": activation_density(model, [probe])}


def load_data(recipe: Recipe) -> Dataset | None:
    """The recipe's data set (None when its protocol uses none); options the data code refuses are recipe errors."""
    if recipe.data is None:
        return None
    try:
        return load_dataset(recipe.data["name"], **recipe.options("data"))
    except (ValueError, ConfigError) as err:
        raise RecipeError(f"data: {err}") from None


def run_device(recipe: Recipe, device: str | None = None) -> torch.device:
    """The device ``recipe`` trains on (``device`` overrides its ``train.device``); a recipe error
    naming it when this machine doesn't have it, or the precision can't run on it."""
    train = recipe.train
    name = device or (train.device if train is not None else "cpu")
    where = "--device" if device else "train.device"
    try:
        resolved = resolve_device(name)
    except (ConfigError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None
    try:
        if train is not None:
            check_precision(train.precision, resolved)
    except ConfigError as err:
        raise RecipeError(f"train.precision: {err}") from None
    return resolved


def run_recipe(recipe: Recipe, out: str | Path, console: Console | None = None,
               device: str | None = None) -> dict[str, Any]:
    """Run (or resume, or just summarise) ``recipe`` in ``out``; returns results.json's content.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) overrides the recipe's ``train.device``.
    """
    resolved = run_device(recipe, device)  # before anything is written
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    run_dir = RunDir(out)
    try:
        return _run(recipe, run_dir, console or Console(), resolved)
    finally:
        run_dir.unlock()  # taken by run_dir.start()
        torch.set_num_threads(threads)


def _run(recipe: Recipe, run_dir: RunDir, console: Console, device: torch.device) -> dict[str, Any]:
    run_dir.check_recipe(recipe)
    protocol = PROTOCOLS[recipe.method["name"]]
    context = RunContext(recipe, load_data(recipe), run_dir, device=device)
    context.check(protocol)
    jobs = protocol.jobs(recipe)
    run_dir.start(recipe)
    done = run_dir.completed(jobs)
    rebuilt = run_dir.write_logs(recipe, jobs, done)  # a kill or an edit may have left them stale
    if len(done) == len(jobs):
        note = " (results rebuilt from its checkpoints)" if rebuilt else ""
        console.print(f"[bold]{run_dir.path}[/] is complete{note}; its summary:")
        return finish(run_dir, console, regenerate=rebuilt)
    resumed = len(done)
    if done:
        console.print(f"resuming {run_dir.path}: {len(done)} of {len(jobs)} networks already trained",
                      soft_wrap=True)
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as progress:
        context.progress = progress
        overall = progress.add_task(f"{recipe.name}: networks", total=len(jobs), completed=len(done))
        for job in jobs:
            if job.key in done:
                continue
            job_started = time.perf_counter()
            torch.manual_seed(mix_seed(job.seed, job.key))  # anything random inside training (dropout)
            outcome = protocol.run(job, context)
            done[job.key] = _save(run_dir, job, outcome, protocol.result(job, outcome, context))
            run_dir.write_logs(recipe, jobs, done)
            progress.advance(overall)
            console.print(f"  {job.key:<22} {protocol.describe(done[job.key]['result'])}   "
                          f"({time.perf_counter() - job_started:.1f} s)", soft_wrap=True)
    console.print(f"trained {len(jobs) - resumed} networks in {time.perf_counter() - started:.0f} s")
    return finish(run_dir, console, regenerate=True)


def _save(run_dir: RunDir, job: Job, outcome: Outcome, result: dict[str, Any]) -> dict[str, Any]:
    record = {"history": outcome.history, "result": result}
    cpu = torch.device("cpu")  # a checkpoint written on any device loads on every machine
    atomic.torch_save(run_dir.checkpoint(job.key), {
        "format": CHECKPOINT_FORMAT, "job": dataclasses.asdict(job),
        "weights": B.to_device(snapshot(outcome.model), cpu), "masks": B.to_device(copy_masks(outcome.model), cpu),
        "extra": B.to_device(outcome.extra, cpu), **record})
    return record


def finish(run_dir: RunDir, console: Console, regenerate: bool = False) -> dict[str, Any]:
    """Write plots and report.md (when missing, or always with ``regenerate``) and print the summary,
    each as the run's protocol says."""
    results = summary.load_results(run_dir.results_file)
    protocol = summary.protocol_of(results)
    plot_files = plots.write_all(run_dir, results, protocol.plots(), only_missing=not regenerate)
    if regenerate or not run_dir.report_file.exists():
        summary.write_report(run_dir, results, protocol.report_lines(results), plot_files)
    protocol.print_summary(results, console)
    console.print(f"plots: {run_dir.plots}/   report: {run_dir.report_file}", soft_wrap=True)
    return results

