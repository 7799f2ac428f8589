"""``formats``: one trained network compressed to equal parameter budgets by sparsity and by
structured matrices, each fine-tuned; accuracy against the parameters kept.

Per seed the dense network is trained once; each arm then keeps ``budget`` of the selected
layers' parameters (the sparsity section selects them: include, exclude, keep_first_last_dense
are honoured by every arm): pruned once (``unstructured``, ``block``, ``nm``: the criterion and
allocation of the sparsity section) or factorised (``low_rank``: truncated SVD, ``low_rank_fisher``:
Fisher-weighted SVD on the calibration batches, ``monarch``: the optimal Monarch projection),
then fine-tuned. The ``*_scratch`` arms train a factorised network of the same budget from a
fresh initialisation instead, on the train section. Index storage is not counted: a sparse
layer also stores where its weights are (a bit per weight for unstructured, one per block).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction as Ratio
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field
from torch import nn

from ...config import SparsityConfig
from ...errors import ConfigError
from ...formats.factorize import FactorizeConfig, factorize_
from ...gemm import is_hf_conv1d
from ...methods import OneShot
from ...targets import find_units
from ..schema import Fraction, PositiveInt
from ..trainer import mix_seed
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol
from .dense import train_dense
from .oneshot import finetune

if TYPE_CHECKING:
    from ..recipe import Recipe

FormatArm = Literal["unstructured", "block", "nm", "low_rank", "low_rank_fisher", "monarch",
                    "low_rank_scratch", "monarch_scratch"]
PRUNED = ("unstructured", "block", "nm")
SCRATCH_SUFFIX = "_scratch"


class FormatsOptions(Options):
    """``budgets``: parameters kept in the selected layers, as fractions (one level each);
    ``arms`` to run (default: every one-shot arm); ``block`` the block shape of the ``block`` arm;
    ``nblocks`` Monarch's blocks; ``allocation`` the low-rank arms' rank allocation; fine-tuning
    runs ``finetune_epochs`` at ``finetune_lr`` (default: the training lr). The ``nm`` arm runs
    where a budget is N/M with M <= 32 and is left out elsewhere."""

    budgets: Annotated[list[Fraction], Field(min_length=1)] = [0.5, 0.25]
    arms: Annotated[list[FormatArm], Field(min_length=1)] = ["unstructured", "block", "nm", "low_rank",
                                                             "low_rank_fisher", "monarch"]
    block: Annotated[str, Field(pattern=r"^\d+x\d+$")] = "4x4"
    nblocks: PositiveInt = 4
    allocation: Literal["uniform", "energy", "sensitivity"] = "uniform"
    finetune_epochs: PositiveInt = 5
    finetune_lr: Annotated[float, Field(gt=0)] | None = None

    def resolve(self, recipe: Recipe) -> None:
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms {self.arms} name an arm twice")
        if self.allocation == "sensitivity" and any(a.startswith("low_rank") and a != "low_rank_fisher"
                                                    for a in self.arms):
            raise ConfigError("allocation 'sensitivity' needs Fisher information: only arm low_rank_fisher takes it")


def nm_for(budget: float, largest_m: int = 32) -> str | None:
    """The N:M pattern keeping exactly ``budget`` of the weights, or None when none with M <= 32 does."""
    ratio = Ratio(budget).limit_denominator(largest_m)
    return f"{ratio.numerator}:{ratio.denominator}" if abs(float(ratio) - budget) < 1e-9 else None


@register_protocol("formats")
class FormatsProtocol(Protocol):
    Options = FormatsOptions
    arms = (DENSE,
            Arm("unstructured", "unstructured (one-shot)", "unstructured", "tab:blue"),
            Arm("block", "block (one-shot)", "block", "tab:cyan"),
            Arm("nm", "N:M (one-shot)", "N:M", "tab:green"),
            Arm("low_rank", "low-rank SVD", "SVD", "tab:red"),
            Arm("low_rank_fisher", "low-rank Fisher-weighted SVD", "FWSVD", "tab:orange"),
            Arm("monarch", "Monarch projection", "Monarch", "tab:purple"),
            Arm("low_rank_scratch", "low-rank from scratch", "SVD scratch", "tab:red", linestyle="--"),
            Arm("monarch_scratch", "Monarch from scratch", "Monarch scratch", "tab:purple", linestyle="--"))
    legend = ("Each arm keeps the same fraction of the selected layers' parameters: pruned once and fine-tuned "
              "(unstructured, block, N:M), factorised from the trained weights and fine-tuned (SVD, FWSVD, "
              "Monarch), or factorised and trained from scratch.")

    def jobs(self, recipe: Recipe) -> list[Job]:
        options = recipe.method
        jobs = []
        for seed in recipe.seeds:
            jobs.append(Job(seed, "dense"))
            for level, budget in enumerate(options["budgets"], 1):
                for name in options["arms"]:
                    if name == "nm" and nm_for(budget) is None:
                        continue
                    parent = None if name.endswith(SCRATCH_SUFFIX) else Job(seed, "dense").key
                    jobs.append(Job(seed, name, level, 1.0 - budget, parent=parent))
        return jobs

    def check(self, ctx: Context) -> None:
        if ctx.recipe.sparsity is None:
            raise ConfigError("formats: the sparsity section selects the layers every arm compresses")
        _layers(ctx.new_model(0), ctx)  # fails early when it selects a layer a factorised arm can't take

    def run(self, job: Job, ctx: Context) -> Outcome:
        if job.arm == "dense":
            return train_dense(job, ctx)
        budget = 1.0 - job.target
        if job.arm.endswith(SCRATCH_SUFFIX):
            model = ctx.new_model(init_seed(job.seed))
            config = _factorize_config(job.arm.removesuffix(SCRATCH_SUFFIX), budget, model, ctx, "random",
                                       mix_seed(job.seed, "factors"))
            factorize_(model, config)
            return Outcome(model, ctx.train(model, job))
        model = ctx.restore(job.parent_key)
        if job.arm in PRUNED:
            OneShot(model, _prune_config(job.arm, budget, ctx), data=ctx.calibration(job.seed)).apply()
        else:
            method = "fisher" if job.arm == "low_rank_fisher" else "svd"
            config = _factorize_config(job.arm.removesuffix("_fisher"), budget, model, ctx, method, job.seed)
            factorize_(model, config, data=ctx.calibration(job.seed) if method == "fisher" else None)
        return finetune(model, job, ctx)


def _prune_config(arm: str, budget: float, ctx: Context) -> SparsityConfig:
    options, config = ctx.recipe.method, ctx.recipe.sparsity
    pattern = {"unstructured": "unstructured", "block": f"block:{options['block']}", "nm": nm_for(budget)}[arm]
    assert pattern is not None  # jobs() leaves out the N:M arm where no N:M pattern fits
    return dataclasses.replace(config, pattern=pattern, sparsity=1.0 - budget)


def _layers(model, ctx: Context) -> list[str]:
    """The layers the sparsity section selects, which every arm compresses: Linear and Conv1D only."""
    config = ctx.recipe.sparsity
    if config.overrides:
        raise ConfigError("formats: sparsity.overrides would apply to the pruning arms only; select layers "
                          "with include/exclude instead, so every arm compresses the same ones")
    names = []
    for unit in find_units(model, config):
        for member in unit.weights:
            if not (isinstance(member.module, nn.Linear) or is_hf_conv1d(member.module)):
                raise ConfigError(f"formats: layer {member.module_name!r} ({type(member.module).__name__}) can't be "
                                  f"factorised (Linear and Conv1D only); leave it out with sparsity.exclude")
            names.append(member.module_name)
    return names


def _factorize_config(fmt: str, budget: float, model, ctx: Context, method: str, seed: int) -> FactorizeConfig:
    options = ctx.recipe.method
    allocation = options["allocation"] if fmt == "low_rank" and method != "random" else "uniform"
    if allocation == "sensitivity" and method != "fisher":
        allocation = "uniform"
    return FactorizeConfig(format="low-rank" if fmt == "low_rank" else "monarch", budget=budget,
                           nblocks=options["nblocks"], method=method, allocation=allocation,
                           include=[_exact(n) for n in _layers(model, ctx)], seed=seed)


def _exact(name: str) -> str:
    """A glob that matches exactly this module name."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


__all__ = ["FormatsProtocol", "nm_for"]
