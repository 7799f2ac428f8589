"""``nm_training``: N:M training from scratch, SR-STE (``srste``) or progressive gradient flow (``pgf``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator

from ...errors import ConfigError
from ...methods.nm_training import SRSTE, ProgressiveNM
from ...patterns import Pattern, parse_pattern
from ..schema import NonNegativeFloat, PositiveInt
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense

if TYPE_CHECKING:
    from ..recipe import Recipe

NMAlgorithm = Literal["srste", "pgf"]
NM_ALGORITHMS: tuple[NMAlgorithm, ...] = ("srste", "pgf")


class NMTrainingOptions(Options):
    """Train each of ``algorithms`` at each N:M of ``patterns`` (one level each; default: the sparsity
    section's). ``srste``: SR-STE with refined decay ``srste_decay``; ``pgf``: progressive gradient
    flow, pruned weights scaled from 1 to 0 by epoch ``decay_epoch`` (default: half of training)
    while the structure steps through ``structure_stages`` n:M (n doubling per stage, e.g. 4:16 →
    2:16 → 1:16; 1 = straight to N:M). Masks are recomputed from |w| every ``update_every`` steps."""

    algorithms: Annotated[list[NMAlgorithm], Field(min_length=1)] = list(NM_ALGORITHMS)
    patterns: Annotated[list[str], Field(min_length=1)] | None = None
    srste_decay: NonNegativeFloat = 2e-4
    decay_epoch: PositiveInt | None = None
    structure_stages: PositiveInt = 3
    update_every: PositiveInt = 1

    @field_validator("patterns")
    @classmethod
    def _nm(cls, patterns: list[str] | None) -> list[str] | None:
        if patterns is None:
            return None
        parsed = [parse_pattern(p) for p in patterns]  # a PatternError (a ValueError) names the bad one
        if any(p.n_m is None for p in parsed):
            raise ValueError("must be N:M patterns such as ['1:8', '1:16']")
        return [p.name for p in parsed]

    def resolve(self, recipe: Recipe) -> None:
        if self.patterns is None:
            pattern = parse_pattern(recipe.sparsity.pattern)  # a Pattern already (SparsityConfig parses it)
            if pattern.n_m is None:
                raise ConfigError(f"patterns: give N:M patterns, or an N:M sparsity.pattern (not {pattern})")
            self.patterns = [pattern.name]
        if self.decay_epoch is None:  # measured best of 1/4, 1/2, 3/4 at 1:16 (docs/nm_training.md)
            self.decay_epoch = max(1, recipe.train.epochs // 2)
        if self.decay_epoch > recipe.train.epochs:
            raise ConfigError(f"decay_epoch {self.decay_epoch} is after the last epoch ({recipe.train.epochs})")


@register_protocol("nm_training")
class NMTrainingProtocol(Protocol):
    Options = NMTrainingOptions
    arms = (DENSE, Arm("srste", "SR-STE", color="tab:pink"), Arm("pgf", "progressive gradient flow", "PGF", "tab:cyan"))

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        targets = [1.0 - n / m for n, m in map(n_m_of, options["patterns"])]
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, arm, i, t) for i, t in enumerate(targets, 1)
                                  for arm in options["algorithms"])]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        options = ctx.recipe.method
        pattern = parse_pattern(options["patterns"][job.level - 1])
        config = dataclasses.replace(ctx.recipe.sparsity, pattern=pattern, sparsity=job.target)
        model = ctx.new_model(init_seed(job.seed))
        method: SRSTE | ProgressiveNM
        if job.arm == "srste":
            method = SRSTE(model, config, decay=options["srste_decay"], update_every=options["update_every"])
        else:
            total = ctx.recipe.train.epochs * ctx.steps_per_epoch
            n, m = n_m_of(pattern)
            stages = [n * 2 ** k for k in reversed(range(options["structure_stages"]))]
            method = ProgressiveNM(model, config, total_steps=total,
                                   decay_end=options["decay_epoch"] / ctx.recipe.train.epochs,
                                   structure=[s for s in stages if s < m], update_every=options["update_every"])
        history = ctx.train(model, job, hooks=[method])
        method.finalize()
        return Outcome(model, history)


def n_m_of(pattern: str | Pattern) -> tuple[int, int]:
    """``(N, M)`` of an N:M pattern (the options hold N:M patterns only)."""
    n_m = parse_pattern(pattern).n_m
    if n_m is None:
        raise ConfigError(f"{pattern} is not an N:M pattern")
    return n_m
