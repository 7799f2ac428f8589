"""``oneshot``: the trained dense network pruned once to each target, then fine-tuned."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...config import SparsityConfig
from ...methods import OneShot
from ..schema import Fraction, PositiveFloat, PositiveInt
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, register_protocol
from .dense import train_dense

if TYPE_CHECKING:
    from ..recipe import Recipe

ONESHOT = Arm("oneshot", "one-shot", color="tab:blue")


class OneShotOptions(Options):
    """``sparsities``: targets, one level each (default: the sparsity section's); fine-tuning
    runs ``finetune_epochs`` at ``finetune_lr`` (default: the training lr) on the train schedule."""

    sparsities: list[Fraction] | None = None
    finetune_epochs: PositiveInt = 5
    finetune_lr: PositiveFloat | None = None

    def resolve(self, recipe: Recipe) -> None:
        self.sparsities = targets(self.sparsities, recipe.sparsity)


def targets(sparsities: list[float] | None, config: SparsityConfig) -> list[float]:
    """The levels' targets: the given ones, or the sparsity section's; each must suit its pattern."""
    chosen = [config.target_sparsity] if sparsities is None else list(sparsities)
    for target in chosen:
        dataclasses.replace(config, sparsity=target)  # raises if the pattern fixes another sparsity
    return chosen


def finetune(model, job: Job, ctx: Context) -> Outcome:
    """Fine-tune a pruned network for ``finetune_epochs`` at ``finetune_lr`` (the arm's history)."""
    options = ctx.recipe.method
    train = dataclasses.replace(ctx.recipe.train, epochs=options["finetune_epochs"],
                                lr=options["finetune_lr"] or ctx.recipe.train.lr)
    return Outcome(model, ctx.train(model, job, config=train))


def prune_dense(job: Job, ctx: Context) -> Outcome:
    """The ``oneshot`` arm: the seed's trained dense network pruned to the job's target, fine-tuned."""
    model = ctx.restore(job.parent_key)
    OneShot(model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
            data=ctx.calibration(job.seed)).apply()
    return finetune(model, job, ctx)


@register_protocol("oneshot")
class OneShotProtocol(Protocol):
    Options = OneShotOptions
    arms = (DENSE, ONESHOT)

    def jobs(self, recipe: Recipe) -> list[Job]:
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"),
            *(Job(seed, "oneshot", i, t, parent=Job(seed, "dense").key)
              for i, t in enumerate(recipe.method["sparsities"], 1))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        return train_dense(job, ctx) if job.arm == "dense" else prune_dense(job, ctx)
