"""Strong lottery tickets inside multi-head attention (after Otsuka et al.).

A random *target* ``nn.MultiheadAttention`` (input dim ``d``, ``H`` heads, head dim ``d/H``)
is approximated by a subnetwork of a random *source* attention of the same input dim whose
query/key/value hidden size is ``n·d`` (head dim ``n·d/H``), found by edge-popup: only the
scores are trained, to minimise the MSE between source and target outputs on random inputs.
The source keeps the target's softmax temperature ``1/sqrt(d/H)`` so that a subnetwork can
match the target's attention logits exactly in principle. The approximation error should
fall roughly exponentially in the hidden size.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from ..methods.edgepopup import edge_popup_, finalize_
from .schema import Fraction, PositiveFloat, PositiveInt, Section


class WideAttention(nn.Module):
    """Multi-head self-attention with its own hidden size (``nn.MultiheadAttention`` ties it to the input dim).

    Bias-free ``q``/``k``/``v``: Linear(dim → hidden), ``out``: Linear(hidden → dim); each head uses
    ``hidden / heads`` of the hidden units; logits are scaled by ``scale``.
    """

    def __init__(self, dim: int, heads: int, hidden: int, scale: float | None = None) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of heads={heads}")
        self.heads = heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(hidden // heads)
        self.q, self.k, self.v = (nn.Linear(dim, hidden, bias=False) for _ in range(3))
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x: batch × tokens × dim
        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # batch × heads × tokens × head_dim

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        return self.out((attention @ v).transpose(1, 2).flatten(2))


def random_target(dim: int, heads: int, seed: int) -> nn.MultiheadAttention:
    """A bias-free ``nn.MultiheadAttention`` with PyTorch's default (Xavier) initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
    return target.requires_grad_(False)


def target_output(target: nn.MultiheadAttention, x: Tensor) -> Tensor:
    return target(x, x, x, need_weights=False)[0]


class SLTAttentionConfig(Section):
    """One sweep: the source hidden size is ``multiplier · dim`` for each multiplier (strictly checked)."""

    dim: PositiveInt = 8
    heads: PositiveInt = 2
    tokens: PositiveInt = 8
    multipliers: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 2, 4, 8, 16]
    density: Fraction = 0.5
    init: Literal["kaiming_normal", "signed_constant"] = "kaiming_normal"
    weight_scale: PositiveFloat = 0.5  # multiplies the source's frozen Kaiming weights (1.0 overshoots the target)
    steps: PositiveInt = 3000
    lr: PositiveFloat = 0.01
    batch_size: PositiveInt = 64
    eval_samples: PositiveInt = 1024

    @model_validator(mode="after")
    def _consistent(self) -> SLTAttentionConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not a multiple of heads={self.heads}")
        if len(set(self.multipliers)) != len(self.multipliers):
            raise ValueError(f"multipliers must be distinct, got {self.multipliers}")
        return self


def approximate(target: nn.MultiheadAttention, multiplier: int, config: SLTAttentionConfig,
                seed: int) -> dict[str, float]:
    """Edge-popup a subnetwork of a random source with hidden ``multiplier·dim`` to match ``target``.

    Returns the relative MSE ``E‖f_src − f_tgt‖² / E‖f_tgt‖²`` on fresh inputs (1 = predicting zero).
    """
    return search(target, multiplier, config, seed)[1]


def search(target: nn.MultiheadAttention, multiplier: int, config: SLTAttentionConfig,
           seed: int) -> tuple[WideAttention, dict[str, float]]:
    """:func:`approximate`, also returning the source with its subnetwork baked in as fixed masks."""
    d, h = config.dim, config.heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        source = WideAttention(d, h, multiplier * d, scale=1.0 / math.sqrt(d // h))
    scores = edge_popup_(source, config.density, init=config.init, seed=seed)
    with torch.no_grad():
        for layer in (source.q, source.k, source.v, source.out):
            weight = cast(nn.ModuleDict, layer.parametrizations)["weight"]
            cast(ParametrizationList, weight).original.mul_(config.weight_scale)
    optimizer = torch.optim.Adam(scores, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.steps):
        x = torch.randn(config.batch_size, config.tokens, d, generator=generator)
        loss = F.mse_loss(source(x), target_output(target, x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        x = torch.randn(config.eval_samples, config.tokens, d, generator=torch.Generator().manual_seed(10**6 + seed))
        want = target_output(target, x)
        error = (source(x) - want).pow(2).mean() / want.pow(2).mean()
    stats = {"hidden": multiplier * d, "multiplier": multiplier, "relative_mse": error.item(),
             "final_train_mse": loss.item()}
    return cast(WideAttention, finalize_(source, as_masks=True)), stats
