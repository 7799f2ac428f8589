"""``gradual``: trained from scratch while pruning on Zhu & Gupta's cubic schedule."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...errors import ConfigError
from ...methods import GradualMagnitudePruning
from ..schema import Fraction, NonNegativeInt, PositiveInt, Sparsity
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense
from .oneshot import targets

if TYPE_CHECKING:
    from ..recipe import Recipe


class GradualOptions(Options):
    """Prune every ``every_steps`` updates from epoch ``start_epoch`` to ``end_epoch`` (by the end of
    that epoch; default ¾ of training), from ``initial_sparsity`` to each target in ``sparsities``."""

    sparsities: list[Fraction] | None = None
    initial_sparsity: Sparsity = 0.0
    start_epoch: NonNegativeInt = 0
    end_epoch: PositiveInt | None = None
    every_steps: PositiveInt = 10

    def resolve(self, recipe: Recipe) -> None:
        self.sparsities = targets(self.sparsities, recipe.sparsity)
        epochs = recipe.train.epochs
        if self.end_epoch is None:
            self.end_epoch = max(1, (3 * epochs) // 4)
        if self.end_epoch > epochs:
            raise ConfigError(f"end_epoch {self.end_epoch} is after the last epoch ({epochs})")
        if self.end_epoch < self.start_epoch:
            raise ConfigError(f"end_epoch {self.end_epoch} is before start_epoch {self.start_epoch}")
        if self.initial_sparsity >= min(self.sparsities):
            raise ConfigError(f"initial_sparsity must be below the smallest target {min(self.sparsities):g}, "
                              f"got {self.initial_sparsity!r}")


@register_protocol("gradual")
class GradualProtocol(Protocol):
    Options = GradualOptions
    arms = (DENSE, Arm("gradual", "gradual", color="tab:green"))

    def jobs(self, recipe: Recipe) -> list[Job]:
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, "gradual", i, t) for i, t in enumerate(recipe.method["sparsities"], 1))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        options, per_epoch = ctx.recipe.method, ctx.steps_per_epoch
        model = ctx.new_model(init_seed(job.seed))
        method = GradualMagnitudePruning(
            model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
            start=options["start_epoch"] * per_epoch, end=options["end_epoch"] * per_epoch,
            frequency=options["every_steps"], initial_sparsity=options["initial_sparsity"],
            data=ctx.calibration(job.seed))
        return Outcome(model, ctx.train(model, job, hooks=[method]))
