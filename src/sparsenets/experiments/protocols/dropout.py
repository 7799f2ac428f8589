"""``dropout``: the dense network trained with ``nn.Dropout`` (``dropout``) or SparseDrop (``sparsedrop``)
on the inputs of its hidden layers, against ``dense``, trained without."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...layers.sparse_drop import hidden_linears, sparse_drop_
from ..schema import Fraction, PositiveInt
from .base import DENSE, Arm, Context, Job, Options, Outcome, Protocol, init_seed, register_protocol

if TYPE_CHECKING:
    from ..recipe import Recipe

DropoutArm = Literal["dense", "dropout", "sparsedrop"]
DROPOUT_ARMS: tuple[DropoutArm, ...] = ("dense", "dropout", "sparsedrop")


class DropoutOptions(Options):
    """Arms ``dense`` (no dropout), ``dropout`` (``nn.Dropout(p)`` on the input of each chosen Linear)
    and ``sparsedrop`` (those Linears become SparseDrop(p, ``block``)), same initialisation and data
    order. ``include``: globs on module names; default every Linear but the first."""

    p: Fraction = 0.5
    block: PositiveInt = 32
    include: Annotated[list[str], Field(min_length=1)] | None = None
    arms: Annotated[list[DropoutArm], Field(min_length=1)] = list(DROPOUT_ARMS)


class InputDropout:
    """Forward pre-hook: ``nn.Dropout(p)`` on a layer's input, leaving the layer and its state_dict be."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], self.p, module.training), *args[1:])


@register_protocol("dropout")
class DropoutProtocol(Protocol):
    Options = DropoutOptions
    arms = (DENSE, Arm("dropout", "nn.Dropout", "Dropout", "tab:blue", sparse=False),
            Arm("sparsedrop", "SparseDrop", color="tab:red", sparse=False))
    sections = ("data", "model", "train")

    def jobs(self, recipe: Recipe) -> list[Job]:
        arms = [a for a in DROPOUT_ARMS if a in recipe.method["arms"]]
        return [Job(seed, arm) for seed in recipe.seeds for arm in arms]

    def run(self, job: Job, ctx: Context) -> Outcome:
        options = ctx.recipe.method
        model = ctx.new_model(init_seed(job.seed))
        if job.arm == "sparsedrop":
            sparse_drop_(model, options["p"], options["block"], options["include"])
        elif job.arm == "dropout":
            for _, layer in hidden_linears(model, options["include"]):
                layer.register_forward_pre_hook(InputDropout(options["p"]))
        return Outcome(model, ctx.train(model, job))
