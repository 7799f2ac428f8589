"""Protocols: which networks an experiment trains, for each method, as a list of jobs.

A job trains one network (one seed, one arm, one level) and may start from the checkpoint
of an earlier job; the runner runs jobs in order, checkpoints each one and skips those
already done, so every protocol is resumable for free. Arms:

- ``dense``: the unpruned network (level 0), the reference for every method.
- ``oneshot``: the trained dense network pruned once to each target, then fine-tuned.
- ``gradual``: trained from scratch while pruning on Zhu & Gupta's cubic schedule.
- ``imp``: lottery-ticket level l, pruned from level l−1 and rewound to θ_k.
- ``reinit``: level l's mask on a fresh random initialisation (control).
- ``random``: a random mask with level l's per-layer densities, from θ_k (control).
- ``blkrew``: trained with BLK-REW's reweighted group-lasso penalty, pruned to each target, fine-tuned.
- ``static``, ``set``, ``rigl``: sparse from initialisation at level l's sparsity, with a fixed mask,
  SET's random regrowth or RigL's gradient regrowth.
- ``srste``, ``pgf``: N:M training from scratch, SR-STE or progressive gradient flow.
- ``dropout``, ``sparsedrop``: the dense network trained with ``nn.Dropout`` or SparseDrop on the
  inputs of its hidden layers (against ``dense``, trained without).

Every job trains on the same data order (a function of the seed), so arms and levels
differ only in what they are meant to differ in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SparsityConfig
from ..errors import ConfigError
from ..methods import (BlockReweighted, GradualMagnitudePruning, LotteryTicket, OneShot, RigL, SET,
                       StaticSparse, random_prune,
                       reinitialize, rewind_)
from ..methods.lottery import level_configs
from ..layers.sparse_drop import hidden_linears, sparse_drop_
from ..methods.nm_training import SRSTE, ProgressiveNM
from ..patterns import NM, parse_pattern
from .trainer import TrainConfig, mix_seed

if TYPE_CHECKING:
    from .recipe import Recipe

CONTROLS = ("reinit", "random")


@dataclass(frozen=True)
class Job:
    seed: int
    arm: str
    level: int = 0
    target: float = 0.0  # nominal sparsity of the level
    parent: str | None = None  # key of the job whose checkpoint this one starts from

    @property
    def key(self) -> str:
        return f"seed{self.seed}-{self.arm}" + (f"-{self.level:02d}" if self.arm != "dense" else "")


@dataclass
class Outcome:
    model: nn.Module
    history: list[dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)  # saved with the checkpoint (e.g. θ_k)


class Context(Protocol):
    """What the runner offers a protocol."""

    recipe: Recipe
    steps_per_epoch: int

    def new_model(self, init_seed: int) -> nn.Module: ...
    def restore(self, key: str) -> nn.Module: ...
    def extra(self, key: str) -> dict[str, Any]: ...
    def calibration(self, seed: int) -> list: ...
    def train(self, model: nn.Module, job: Job, hooks: list = ..., start_step: int = 0,
              config: TrainConfig | None = None) -> list[dict[str, float]]: ...


def init_seed(seed: int) -> int:
    """The seed of θ0 for an experiment seed."""
    return mix_seed(seed, "init")


def _fraction_list(value: Any, key: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1 for v in values):
        raise ConfigError(f"{key} must be a list of sparsities in (0, 1), got {value!r}")
    return [float(v) for v in values]


def _int_at_least(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


# ---- dense -----------------------------------------------------------------------------------------


@dataclass
class DenseOptions:
    def validate(self, recipe: Recipe) -> None:
        pass


class Dense:
    Options = DenseOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        return [Job(seed, "dense") for seed in recipe.seeds]

    def run(self, job: Job, ctx: Context) -> Outcome:
        model = ctx.new_model(init_seed(job.seed))
        return Outcome(model, ctx.train(model, job))


# ---- one-shot ------------------------------------------------------------------------------------


@dataclass
class OneShotOptions:
    """``sparsities``: targets, one level each (default: the sparsity section's); fine-tuning
    runs ``finetune_epochs`` at ``finetune_lr`` (default: the training lr) on the train schedule."""

    sparsities: list[float] | None = None
    finetune_epochs: int = 5
    finetune_lr: float | None = None

    def validate(self, recipe: Recipe) -> None:
        self.sparsities = _targets(self.sparsities, recipe.sparsity)
        _int_at_least(self.finetune_epochs, "finetune_epochs", 1)
        if self.finetune_lr is not None and (isinstance(self.finetune_lr, bool) or
                                             not isinstance(self.finetune_lr, (int, float)) or self.finetune_lr <= 0):
            raise ConfigError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")


def _targets(sparsities: list[float] | None, config: SparsityConfig) -> list[float]:
    targets = [config.sparsity] if sparsities is None else _fraction_list(sparsities, "sparsities")
    for target in targets:
        dataclasses.replace(config, sparsity=target)  # raises if the pattern fixes another sparsity
    return targets


class OneShotProtocol:
    Options = OneShotOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        targets = recipe.method["sparsities"]
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"),
            *(Job(seed, "oneshot", i, t, parent=Job(seed, "dense").key) for i, t in enumerate(targets, 1))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return Dense().run(job, ctx)
        options = ctx.recipe.method
        model = ctx.restore(job.parent)
        OneShot(model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
                data=ctx.calibration(job.seed)).apply()
        train = dataclasses.replace(ctx.recipe.train, epochs=options["finetune_epochs"],
                                    lr=options["finetune_lr"] or ctx.recipe.train.lr)
        return Outcome(model, ctx.train(model, job, config=train))


# ---- gradual -------------------------------------------------------------------------------------


@dataclass
class GradualOptions:
    """Prune every ``every_steps`` updates from epoch ``start_epoch`` to ``end_epoch`` (by the end of
    that epoch), from ``initial_sparsity`` to each target in ``sparsities``."""

    sparsities: list[float] | None = None
    initial_sparsity: float = 0.0
    start_epoch: int = 0
    end_epoch: int | None = None
    every_steps: int = 10

    def validate(self, recipe: Recipe) -> None:
        self.sparsities = _targets(self.sparsities, recipe.sparsity)
        epochs = recipe.train.epochs
        if self.end_epoch is None:
            self.end_epoch = max(1, (3 * epochs) // 4)
        _int_at_least(self.start_epoch, "start_epoch", 0)
        _int_at_least(self.end_epoch, "end_epoch", self.start_epoch)
        if self.end_epoch > epochs:
            raise ConfigError(f"end_epoch {self.end_epoch} is after the last epoch ({epochs})")
        _int_at_least(self.every_steps, "every_steps", 1)
        if not 0.0 <= self.initial_sparsity < min(self.sparsities):
            raise ConfigError(f"initial_sparsity must be in [0, {min(self.sparsities):g}), got {self.initial_sparsity!r}")


class GradualProtocol:
    Options = GradualOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        targets = recipe.method["sparsities"]
        return [job for seed in recipe.seeds
                for job in [Job(seed, "dense"), *(Job(seed, "gradual", i, t) for i, t in enumerate(targets, 1))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return Dense().run(job, ctx)
        options, per_epoch = ctx.recipe.method, ctx.steps_per_epoch
        model = ctx.new_model(init_seed(job.seed))
        method = GradualMagnitudePruning(
            model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
            start=options["start_epoch"] * per_epoch, end=options["end_epoch"] * per_epoch,
            frequency=options["every_steps"], initial_sparsity=options["initial_sparsity"],
            data=ctx.calibration(job.seed))
        return Outcome(model, ctx.train(model, job, hooks=[method]))


# ---- lottery tickets -------------------------------------------------------------------------------


@dataclass
class LotteryOptions:
    """Prune ``prune_fraction`` of the remaining weights per level until the sparsity section's
    target; rewind to update ``rewind_step`` (0: θ0); train the ``controls`` at every
    ``controls_every``-th level and at the last."""

    prune_fraction: float = 0.2
    rewind_step: int = 0
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    controls_every: int = 1

    def validate(self, recipe: Recipe) -> None:
        if isinstance(self.prune_fraction, bool) or not isinstance(self.prune_fraction, (int, float)) \
                or not 0 < self.prune_fraction < 1:
            raise ConfigError(f"prune_fraction must be in (0, 1), got {self.prune_fraction!r}")
        _int_at_least(self.rewind_step, "rewind_step", 0)
        _int_at_least(self.controls_every, "controls_every", 1)
        unknown = [c for c in self.controls if c not in CONTROLS]
        if not isinstance(self.controls, list) or unknown:
            raise ConfigError(f"controls must be a list drawn from {list(CONTROLS)}, got {self.controls!r}")


class LotteryProtocol:
    Options = LotteryOptions

    @staticmethod
    def levels(recipe: Recipe) -> list[SparsityConfig]:
        return level_configs(recipe.sparsity, recipe.method["prune_fraction"])

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        levels = self.levels(recipe)
        jobs = []
        for seed in recipe.seeds:
            previous = Job(seed, "dense")
            jobs.append(previous)
            for level, config in enumerate(levels, start=1):
                ticket = Job(seed, "imp", level, config.sparsity, parent=previous.key)
                jobs.append(ticket)
                if level % options["controls_every"] == 0 or level == len(levels):
                    jobs += [Job(seed, arm, level, config.sparsity, parent=ticket.key) for arm in options["controls"]]
                previous = ticket
        return jobs

    def run(self, job: Job, ctx: Context) -> Outcome:
        options = ctx.recipe.method
        levels = self.levels(ctx.recipe)
        rewind_step = options["rewind_step"]

        def ticket_of(model: nn.Module, level: int, rewind_point: dict[str, Tensor] | None = None) -> LotteryTicket:
            return LotteryTicket(model, ctx.recipe.sparsity, options["prune_fraction"], rewind_step,
                                 data=ctx.calibration(job.seed), rewind_point=rewind_point, level=level)

        if job.arm == "dense":
            model = ctx.new_model(init_seed(job.seed))
            ticket = ticket_of(model, 0)
            history = ctx.train(model, job, hooks=[ticket])
            return Outcome(model, history, extra={"rewind_point": ticket.rewind_point})
        rewind_point = ctx.extra(Job(job.seed, "dense").key)["rewind_point"]
        if job.arm == "imp":
            model = ctx.restore(job.parent)
            ticket_of(model, job.level - 1, rewind_point).next_level()
        elif job.arm == "reinit":
            model = reinitialize(ctx.restore(job.parent), ctx.new_model(mix_seed(job.seed, "reinit", job.level)))
        else:
            model = rewind_(ctx.new_model(init_seed(job.seed)), rewind_point)
            random_prune(model, ctx.restore(job.parent), levels[job.level - 1],
                         seed=mix_seed(job.seed, "random", job.level))
        return Outcome(model, ctx.train(model, job, start_step=rewind_step))


# ---- sparse training from scratch ---------------------------------------------------------------


DST_ALGORITHMS = {"static": StaticSparse, "set": SET, "rigl": RigL}


@dataclass
class SparseTrainingOptions:
    """Train each of ``algorithms`` from a sparse initialisation at each of ``sparsities`` (the
    sparsity section gives the initial mask: criterion, allocation, pattern); SET and RigL rewire
    every ``update_every`` steps until epoch ``end_epoch`` (default: 3/4 of training), dropping
    ``drop_fraction`` of each layer's weights (RigL: decayed on a cosine)."""

    algorithms: list[str] = field(default_factory=lambda: list(DST_ALGORITHMS))
    sparsities: list[float] | None = None
    update_every: int = 100
    drop_fraction: float = 0.3
    end_epoch: int | None = None

    def validate(self, recipe: Recipe) -> None:
        self.sparsities = _targets(self.sparsities, recipe.sparsity)
        if not isinstance(self.algorithms, list) or not self.algorithms or \
                any(a not in DST_ALGORITHMS for a in self.algorithms):
            raise ConfigError(f"algorithms must be a list drawn from {list(DST_ALGORITHMS)}, got {self.algorithms!r}")
        _int_at_least(self.update_every, "update_every", 1)
        if isinstance(self.drop_fraction, bool) or not isinstance(self.drop_fraction, (int, float)) \
                or not 0 < self.drop_fraction < 1:
            raise ConfigError(f"drop_fraction must be in (0, 1), got {self.drop_fraction!r}")
        if self.end_epoch is None:
            self.end_epoch = max(1, (3 * recipe.train.epochs) // 4)
        _int_at_least(self.end_epoch, "end_epoch", 1)
        if self.end_epoch > recipe.train.epochs:
            raise ConfigError(f"end_epoch {self.end_epoch} is after the last epoch ({recipe.train.epochs})")


class SparseTrainingProtocol:
    Options = SparseTrainingOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, arm, i, t) for i, t in enumerate(options["sparsities"], 1)
                                  for arm in options["algorithms"])]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return Dense().run(job, ctx)
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        # the same initial mask for every algorithm of a seed and sparsity: they differ only in rewiring
        config = dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target, seed=mix_seed(job.seed, "mask"))
        if job.arm == "static":
            method = StaticSparse(model, config, data=ctx.calibration(job.seed))
        else:
            method = DST_ALGORITHMS[job.arm](
                model, config, update_every=options["update_every"], drop_fraction=options["drop_fraction"],
                end_step=options["end_epoch"] * ctx.steps_per_epoch, data=ctx.calibration(job.seed))
        return Outcome(model, ctx.train(model, job, hooks=[method]))


# ---- BLK-REW ---------------------------------------------------------------------------------------


@dataclass
class BlockReweightedOptions:
    """Train ``train.epochs`` with BLK-REW's penalty (λ = ``strength``, ε = ``eps``, reweighting refreshed
    every ``refresh_every`` updates; ``decoupled``: as a proximal step after each update, see
    :class:`~sparsenets.methods.BlockReweighted`), prune to each of ``sparsities``, fine-tune
    ``finetune_epochs`` at ``finetune_lr``. The ``oneshot`` arm prunes the dense network instead: same epochs, same pruning."""

    sparsities: list[float] | None = None
    strength: float = 1e-4
    refresh_every: int = 100
    eps: float = 1e-3
    finetune_epochs: int = 5
    finetune_lr: float | None = None
    decoupled: bool = False

    def validate(self, recipe: Recipe) -> None:
        OneShotOptions.validate(self, recipe)  # sparsities, finetune_epochs, finetune_lr
        if not isinstance(self.decoupled, bool):
            raise ConfigError(f"decoupled must be true or false, got {self.decoupled!r}")
        for key in ("strength", "eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        _int_at_least(self.refresh_every, "refresh_every", 1)


class BlockReweightedProtocol:
    Options = BlockReweightedOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        targets = recipe.method["sparsities"]
        dense = [Job(seed, "dense") for seed in recipe.seeds]
        return [job for seed, parent in zip(recipe.seeds, dense) for job in [
            parent, *(Job(seed, arm, i, t, parent=parent.key if arm == "oneshot" else None)
                      for i, t in enumerate(targets, 1) for arm in ("blkrew", "oneshot"))]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm in ("dense", "oneshot"):
            return OneShotProtocol().run(job, ctx)
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        method = BlockReweighted(model, dataclasses.replace(ctx.recipe.sparsity, sparsity=job.target),
                                 strength=options["strength"], refresh_every=options["refresh_every"],
                                 eps=options["eps"], decoupled=options["decoupled"], data=ctx.calibration(job.seed))
        ctx.train(model, job, hooks=[method])
        method.apply()
        train = dataclasses.replace(ctx.recipe.train, epochs=options["finetune_epochs"],
                                    lr=options["finetune_lr"] or ctx.recipe.train.lr)
        # like the one-shot arm, the history is the fine-tuning's
        return Outcome(model, ctx.train(model, job, config=train))


# ---- N:M sparse training -----------------------------------------------------------------------


NM_ALGORITHMS = ("srste", "pgf")


@dataclass
class NMTrainingOptions:
    """Train each of ``algorithms`` at each N:M of ``patterns`` (one level each; default: the sparsity
    section's). ``srste``: SR-STE with refined decay ``srste_decay``; ``pgf``: progressive gradient
    flow, pruned weights scaled from 1 to 0 by epoch ``decay_epoch`` (default: half of training)
    while the structure steps through ``structure_stages`` n:M (n doubling per stage, e.g. 4:16 →
    2:16 → 1:16; 1 = straight to N:M). Masks are recomputed from |w| every ``update_every`` steps."""

    algorithms: list[str] = field(default_factory=lambda: list(NM_ALGORITHMS))
    patterns: list[str] | None = None
    srste_decay: float = 2e-4
    decay_epoch: int | None = None
    structure_stages: int = 3
    update_every: int = 1

    def validate(self, recipe: Recipe) -> None:
        if self.patterns is None:
            self.patterns = [str(recipe.sparsity.pattern)]
        if not isinstance(self.patterns, list) or not self.patterns or \
                not all(isinstance(parse_pattern(p), NM) for p in self.patterns):
            raise ConfigError(f"patterns must be a list of N:M patterns such as ['1:8', '1:16'], got {self.patterns!r}")
        self.patterns = [parse_pattern(p).name for p in self.patterns]
        if not isinstance(self.algorithms, list) or not self.algorithms or \
                any(a not in NM_ALGORITHMS for a in self.algorithms):
            raise ConfigError(f"algorithms must be a list drawn from {list(NM_ALGORITHMS)}, got {self.algorithms!r}")
        if isinstance(self.srste_decay, bool) or not isinstance(self.srste_decay, (int, float)) or self.srste_decay < 0:
            raise ConfigError(f"srste_decay must be a number >= 0, got {self.srste_decay!r}")
        if self.decay_epoch is None:  # measured best of 1/4, 1/2, 3/4 at 1:16 (docs/nm_training.md)
            self.decay_epoch = max(1, recipe.train.epochs // 2)
        _int_at_least(self.decay_epoch, "decay_epoch", 1)
        if self.decay_epoch > recipe.train.epochs:
            raise ConfigError(f"decay_epoch {self.decay_epoch} is after the last epoch ({recipe.train.epochs})")
        _int_at_least(self.structure_stages, "structure_stages", 1)
        _int_at_least(self.update_every, "update_every", 1)


class NMTrainingProtocol:
    Options = NMTrainingOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        targets = [1.0 - parse_pattern(p).fixed_density for p in options["patterns"]]
        return [job for seed in recipe.seeds for job in [
            Job(seed, "dense"), *(Job(seed, arm, i, t) for i, t in enumerate(targets, 1)
                                  for arm in options["algorithms"])]]

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return Dense().run(job, ctx)
        options = ctx.recipe.method
        pattern = parse_pattern(options["patterns"][job.level - 1])
        config = dataclasses.replace(ctx.recipe.sparsity, pattern=pattern, sparsity=job.target)
        model = ctx.new_model(init_seed(job.seed))
        if job.arm == "srste":
            method = SRSTE(model, config, decay=options["srste_decay"], update_every=options["update_every"])
        else:
            total = ctx.recipe.train.epochs * ctx.steps_per_epoch
            stages = [pattern.n * 2 ** k for k in reversed(range(options["structure_stages"]))]
            method = ProgressiveNM(model, config, total_steps=total,
                                   decay_end=options["decay_epoch"] / ctx.recipe.train.epochs,
                                   structure=[n for n in stages if n < pattern.m], update_every=options["update_every"])
        history = ctx.train(model, job, hooks=[method])
        method.finalize()
        return Outcome(model, history)


# ---- dropout: nn.Dropout against SparseDrop ----------------------------------------------------------

DROPOUT_ARMS = ("dense", "dropout", "sparsedrop")


@dataclass
class DropoutOptions:
    """Arms ``dense`` (no dropout), ``dropout`` (``nn.Dropout(p)`` on the input of each chosen Linear)
    and ``sparsedrop`` (those Linears become SparseDrop(p, ``block``)), same initialisation and data
    order. ``layers``: globs on module names; default every Linear but the first."""

    p: float = 0.5
    block: int = 32
    layers: list[str] | None = None
    arms: list[str] = field(default_factory=lambda: ["dense", "dropout", "sparsedrop"])

    def validate(self, recipe: Recipe) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0 < self.p < 1:
            raise ConfigError(f"p must be a drop probability in (0, 1), got {self.p!r}")
        _int_at_least(self.block, "block", 1)
        if self.layers is not None and (not isinstance(self.layers, list) or
                                        not all(isinstance(g, str) for g in self.layers)):
            raise ConfigError(f"layers must be a list of module-name globs, got {self.layers!r}")
        if not isinstance(self.arms, list) or not self.arms or any(a not in DROPOUT_ARMS for a in self.arms):
            raise ConfigError(f"arms must be a non-empty list from {list(DROPOUT_ARMS)}, got {self.arms!r}")


class InputDropout:
    """Forward pre-hook: ``nn.Dropout(p)`` on a layer's input, leaving the layer and its state_dict be."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], self.p, module.training), *args[1:])


class DropoutProtocol:
    Options = DropoutOptions

    def jobs(self, recipe: Recipe) -> list[Job]:
        arms = [a for a in DROPOUT_ARMS if a in recipe.method["arms"]]
        return [Job(seed, arm) for seed in recipe.seeds for arm in arms]

    def run(self, job: Job, ctx: Context) -> Outcome:
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        if job.arm == "sparsedrop":
            sparse_drop_(model, options["p"], options["block"], options["layers"])
        elif job.arm == "dropout":
            for _, layer in hidden_linears(model, options["layers"]):
                layer.register_forward_pre_hook(InputDropout(options["p"]))
        return Outcome(model, ctx.train(model, job))


PROTOCOLS: dict[str, Any] = {
    "dense": Dense(), "oneshot": OneShotProtocol(), "gradual": GradualProtocol(), "lottery": LotteryProtocol(),
    "sparse_training": SparseTrainingProtocol(), "nm_training": NMTrainingProtocol(), "blkrew": BlockReweightedProtocol(),
    "dropout": DropoutProtocol(),
}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """A method section's options with defaults filled in; unknown keys are errors."""
    option_class = PROTOCOLS[name].Options
    valid = [f.name for f in dataclasses.fields(option_class)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {name!r}; "
                          f"valid options: {', '.join(['name', *valid])}")
    return dataclasses.asdict(option_class(**options))


def validate(recipe: Recipe) -> None:
    """Check a method's options against the rest of the recipe; fills derived defaults in place."""
    name = recipe.method["name"]
    options = PROTOCOLS[name].Options(**recipe.options("method"))
    options.validate(recipe)
    recipe.method = {"name": name, **dataclasses.asdict(options)}

