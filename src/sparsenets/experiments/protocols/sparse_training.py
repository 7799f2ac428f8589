"""``sparse_training``: sparse from initialisation, with a fixed mask (``static``), SET's random
regrowth (``set``) or RigL's gradient regrowth (``rigl``), each in one or both of the methods'
modes: ``masked`` (dense compute under masks; arms ``static``, ``set``, ``rigl``) and ``fast``
(block patterns: block-sparse layers that compute only their kept blocks; arms ``static_fast``,
``set_fast``, ``rigl_fast``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

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
Mode = Literal["masked", "fast"]
DST_ALGORITHMS: tuple[Algorithm, ...] = ("static", "set", "rigl")
REWIRING: dict[str, type[DynamicSparse]] = {"set": SET, "rigl": RigL}  # the algorithms that rewire the mask
FAST_SUFFIX = "_fast"


def arm_name(algorithm: str, mode: str) -> str:
    """A job's arm: the algorithm's name in masked mode (as before modes existed), ``<name>_fast`` in fast mode."""
    return algorithm + FAST_SUFFIX if mode == "fast" else algorithm


def algorithm_and_mode(arm: str) -> tuple[str, str]:
    """The inverse of :func:`arm_name`."""
    if arm.endswith(FAST_SUFFIX):
        return arm.removesuffix(FAST_SUFFIX), "fast"
    return arm, "masked"


class SparseTrainingOptions(Options):
    """Train each of ``algorithms`` from a sparse initialisation at each of ``sparsities`` (the
    sparsity section gives the initial mask: criterion, allocation, pattern) in each of ``modes``
    (default ``[masked]``; ``fast`` needs a ``block:RxC`` pattern); SET and RigL rewire every
    ``update_every`` steps until epoch ``end_epoch`` (default: 3/4 of training), dropping
    ``drop_fraction`` of each layer's weights (RigL: decayed on a cosine)."""

    algorithms: Annotated[list[Algorithm], Field(min_length=1)] = list(DST_ALGORITHMS)
    # None is [masked]: left unresolved so that the run directories of recipes written before modes
    # existed (no ``modes`` in their recipe.yaml) still match their recipe
    modes: Annotated[list[Mode], Field(min_length=1)] | None = None
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
        modes = self.modes or ["masked"]
        if len(set(modes)) != len(modes):
            raise ConfigError(f"modes {modes} name a mode twice")
        if "fast" in modes:
            config = recipe.sparsity
            patterns = [("sparsity.pattern", config.target_pattern)]
            patterns += [(f"sparsity.overrides[{glob!r}].pattern", override["pattern"])
                         for glob, override in config.overrides.items() if "pattern" in override]
            for where, pattern in patterns:
                if pattern.block_shape is None:
                    raise ConfigError(f"modes: fast trains block-sparse layers and needs a block:RxC pattern, "
                                      f"but {where} is {str(pattern)!r}; use a block pattern or modes: [masked]")


@register_protocol("sparse_training")
class SparseTrainingProtocol(Protocol):
    Options = SparseTrainingOptions
    arms = (DENSE, Arm("rigl", "RigL", color="tab:purple"), Arm("set", "SET", color="tab:olive"),
            Arm("static", "static sparse", "static", "tab:gray"),
            Arm("rigl_fast", "RigL (fast)", color="mediumvioletred", linestyle="--"),
            Arm("set_fast", "SET (fast)", color="darkgoldenrod", linestyle="--"),
            Arm("static_fast", "static sparse (fast)", "static (fast)", "tab:brown", linestyle="--"))

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, arm_name(algorithm, mode), i, t)
                                  for i, t in enumerate(options["sparsities"], 1)
                                  for mode in options["modes"] or ["masked"] for algorithm in options["algorithms"])]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        options = ctx.recipe.method
        algorithm, mode = algorithm_and_mode(job.arm)
        model = ctx.new_model(init_seed(job.seed))
        # the same initial mask for every algorithm and mode of a seed and sparsity: they differ only in
        # rewiring (and, between modes, in how the kept weights are stored and computed)
        config = dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target, seed=mix_seed(job.seed, "mask"))
        if algorithm == "static":
            method = StaticSparse(model, config, data=ctx.calibration(job.seed), mode=mode)
        else:
            method = REWIRING[algorithm](
                model, config, update_every=options["update_every"], drop_fraction=options["drop_fraction"],
                end_step=options["end_epoch"] * ctx.steps_per_epoch, data=ctx.calibration(job.seed), mode=mode)
        return Outcome(model, ctx.train(model, job, hooks=[method]))

    def plots(self) -> dict[str, Any]:
        from .. import plots

        arms = [a.name for a in self.arms]
        return {**plots.accuracy_plots(self),
                "accuracy_vs_time.png": lambda results, history: plots.accuracy_vs_time(results, history, arms)}
