"""``dense``: the unpruned network (level 0), the reference for every method."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Context, Job, Outcome, Protocol, init_seed, register_protocol

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_protocol("dense")
class Dense(Protocol):
    def jobs(self, recipe: Recipe) -> list[Job]:
        return [Job(seed, "dense") for seed in recipe.seeds]

    def run(self, job: Job, ctx: Context) -> Outcome:
        return train_dense(job, ctx)


def train_dense(job: Job, ctx: Context) -> Outcome:
    """The dense arm every protocol shares: θ0 of the seed, trained on the train section."""
    model = ctx.new_model(init_seed(job.seed))
    return Outcome(model, ctx.train(model, job))
