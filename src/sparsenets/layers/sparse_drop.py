"""SparseDrop: a Linear with block-structured dropout on its input that skips the dropped work.

In training, the input features are cut into blocks of ``block`` consecutive features and each
block is dropped with probability ``p`` — the same blocks for the whole batch, so the dropped
columns of ``x`` and ``W`` can be left out of the product altogether: one dense GEMM over the
kept ``(1 − p)·in`` features, forward and backward. The result equals
``(x · mask / (1 − p)) · Wᵀ + b``; the weight columns of dropped blocks get zero gradient.
In eval mode the layer is a plain ``nn.Linear``.

``p`` is a dropout probability (the expected fraction of feature blocks dropped per step), as
in ``nn.Dropout``; it is not a weight sparsity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..targets import name_matches

__all__ = ["SparseDrop", "hidden_linears", "sparse_drop_", "sparse_drop_linear"]


def sparse_drop_linear(x: Tensor, weight: Tensor, bias: Tensor | None, keep_blocks: Tensor, block: int,
                       p: float) -> Tensor:
    """``(x · mask / (1 − p)) · Wᵀ + b`` computed on the kept feature blocks only.

    ``keep_blocks`` is a bool vector over the ``⌈in/block⌉`` feature blocks.
    """
    keep_features = keep_blocks.repeat_interleave(block)[: weight.shape[1]]
    kept = keep_features.nonzero().squeeze(1)
    # index_select's backward scatters into the dropped columns as zeros: the masked maths' gradients.
    y = F.linear(x.index_select(-1, kept), weight.index_select(1, kept)) * (1.0 / (1.0 - p))
    return y if bias is None else y + bias


class SparseDrop(nn.Linear):
    """``nn.Linear`` whose input loses whole ``block``-wide feature blocks with probability ``p`` in training."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.5, block: int = 32, bias: bool = True,
                 device=None, dtype=None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.p, self.block = float(p), block

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float = 0.5, block: int = 32) -> SparseDrop:
        """A SparseDrop sharing ``linear``'s weight and bias tensors (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, p, block, linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.block)

    def sample_keep(self, generator: torch.Generator | None = None) -> Tensor:
        """A fresh bool vector over the feature blocks: True where the block is kept (prob. ``1 − p``)."""
        return torch.rand(self.n_blocks, generator=generator, device=self.weight.device) >= self.p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight, self.bias)
        return sparse_drop_linear(x, self.weight, self.bias, self.sample_keep(), self.block, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, block={self.block}"


def hidden_linears(model: nn.Module, include: Sequence[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` layers whose inputs dropout goes on: those matching the ``include`` globs
    (as in :class:`~sparsenets.SparsityConfig`), by default every Linear but the first."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n]
    chosen = linears[1:] if include is None else [(n, m) for n, m in linears if name_matches(n, list(include))]
    if not chosen:
        raise ConfigError(f"no nn.Linear to put dropout on (include={include!r}; "
                         f"linear layers: {[n for n, _ in linears]})")
    return chosen


def sparse_drop_(model: nn.Module, p: float = 0.5, block: int = 32, include: Sequence[str] | None = None) -> list[str]:
    """Swap ``nn.Linear`` layers of ``model`` for :class:`SparseDrop` in place; returns their names.

    ``include``: globs on module names; by default every Linear but the first, i.e. dropout on
    hidden activations, not on the raw input. The swapped layers share their weights with the
    originals and keep their ``state_dict`` keys.
    """
    chosen = hidden_linears(model, include)
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseDrop.from_linear(linear, p, block))
    return [n for n, _ in chosen]
