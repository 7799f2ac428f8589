"""``sparse_training``: sparse from initialisation, with a fixed mask (``static``), SET's random
regrowth (``set``) or RigL's gradient regrowth (``rigl``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from ...errors import ConfigError
from ...methods import SET, DynamicSparse, RigL, StaticSparse
from ..schema import Fraction, PositiveInt
from ..trainer import mix_seed
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense
from .oneshot import targets

if TYPE_CHECKING:
    from ..recipe import Recipe

Algorithm = Literal["static", "set", "rigl"]
DST_ALGORITHMS: tuple[Algorithm, ...] = ("static", "set", "rigl")
REWIRING: dict[str, type[DynamicSparse]] = {"set": SET, "rigl": RigL}  # the algorithms that rewire the mask


class SparseTrainingOptions(Options):
    """Train each of ``algorithms`` from a sparse initialisation at each of ``sparsities`` (the
    sparsity section gives the initial mask: criterion, allocation, pattern); SET and RigL rewire
    every ``update_every`` steps until epoch ``end_epoch`` (default: 3/4 of training), dropping
    ``drop_fraction`` of each layer's weights (RigL: decayed on a cosine)."""

    algorithms: Annotated[list[Algorithm], Field(min_length=1)] = list(DST_ALGORITHMS)
    sparsities: list[Fraction] | None = None
    update_every: PositiveInt = 100
    drop_fraction: Fraction = 0.3
    end_epoch: PositiveInt | None = None

    def resolve(self, recipe: Recipe) -> None:
        self.sparsities = targets(self.sparsities, recipe.sparsity)
        if self.end_epoch is None:
            self.end_epoch = max(1, (3 * recipe.train.epochs) // 4)
        if self.end_epoch > recipe.train.epochs:
            raise ConfigError(f"end_epoch {self.end_epoch} is after the last epoch ({recipe.train.epochs})")


@register_protocol("sparse_training")
class SparseTrainingProtocol(Protocol):
    Options = SparseTrainingOptions
    arms = (DENSE, Arm("rigl", "RigL", color="tab:purple"), Arm("set", "SET", color="tab:olive"),
            Arm("static", "static sparse", "static", "tab:gray"))

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, arm, i, t) for i, t in enumerate(options["sparsities"], 1)
                                  for arm in options["algorithms"])]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        # the same initial mask for every algorithm of a seed and sparsity: they differ only in rewiring
        config = dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target, seed=mix_seed(job.seed, "mask"))
        if job.arm == "static":
            method = StaticSparse(model, config, data=ctx.calibration(job.seed))
        else:
            method = REWIRING[job.arm](
                model, config, update_every=options["update_every"], drop_fraction=options["drop_fraction"],
                end_step=options["end_epoch"] * ctx.steps_per_epoch, data=ctx.calibration(job.seed))
        return Outcome(model, ctx.train(model, job, hooks=[method]))
