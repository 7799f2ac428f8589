"""``blkrew``: trained with BLK-REW's reweighted group-lasso penalty, pruned to each target, fine-tuned;
against ``oneshot``, the dense network pruned the same way."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ...methods import BlockReweighted
from ..schema import PositiveFloat, PositiveInt
from .base import DENSE, Arm, Context, Job, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense
from .oneshot import ONESHOT, OneShotOptions, finetune, prune_dense

if TYPE_CHECKING:
    from ..recipe import Recipe


class BlockReweightedOptions(OneShotOptions):
    """Train ``train.epochs`` with BLK-REW's penalty (λ = ``strength``, ε = ``eps``, reweighting refreshed
    every ``refresh_every`` updates; ``decoupled``: as a proximal step after each update, see
    :class:`~sparsenets.methods.BlockReweighted`), prune to each of ``sparsities``, fine-tune
    ``finetune_epochs`` at ``finetune_lr``. The ``oneshot`` arm prunes the dense network instead: same
    epochs, same pruning."""

    strength: PositiveFloat = 1e-4
    refresh_every: PositiveInt = 100
    eps: PositiveFloat = 1e-3
    decoupled: bool = False


@register_protocol("blkrew")
class BlockReweightedProtocol(Protocol):
    Options = BlockReweightedOptions
    arms = (DENSE, ONESHOT, Arm("blkrew", "BLK-REW", color="tab:brown"))

    def jobs(self, recipe: Recipe) -> list[Job]:
        targets = recipe.method["sparsities"]
        dense = [Job(seed, "dense") for seed in recipe.seeds]
        return [job for seed, parent in zip(recipe.seeds, dense) for job in [
            parent, *(Job(seed, arm, i, t, parent=parent.key if arm == "oneshot" else None)
                      for i, t in enumerate(targets, 1) for arm in ("blkrew", "oneshot"))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        if job.arm == "oneshot":
            return prune_dense(job, ctx)
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        method = BlockReweighted(model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
                                 strength=options["strength"], refresh_every=options["refresh_every"],
                                 eps=options["eps"], decoupled=options["decoupled"], data=ctx.calibration(job.seed))
        ctx.train(model, job, hooks=[method])
        method.apply()
        return finetune(model, job, ctx)  # like the one-shot arm, the history is the fine-tuning's
