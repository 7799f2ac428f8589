"""``NMSparseLinear``: a Linear layer whose weight keeps N of every M consecutive inputs.

The weight is stored compressed (:mod:`sparsenets.kernels.nm`): the kept ``values`` are an
``nn.Parameter`` (``out × in/m·n``), so the layer trains with autograd, and their in-group
positions a uint8 buffer ``indices``; the pattern is fixed. The forward runs the custom op
``sparsenets::nm_linear`` when traced or training, so torch.compile and torch.export take the
layer; state_dict, deepcopy and pickling work as for any module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import nm
from .kept_linear import KeptLinear


class NMSparseLinear(KeptLinear):
    """``y = x Wᵀ + b`` with ``W`` (``out × in``) N:M sparse along its inputs; ``x`` is ``(..., in)``."""

    indices: Tensor  # buffer
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        _check_shape(in_features, n, m)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features // m * n
        self.values = nn.Parameter(torch.zeros(out_features, kept, dtype=dtype, device=device))
        first = torch.arange(n, dtype=torch.uint8, device=device).repeat(out_features, in_features // m)
        self.register_buffer("indices", first)  # the first n of every group until set
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None, bias: Tensor | None = None, n: int = 2,
                   m: int = 4) -> NMSparseLinear:
        """Keep the entries of ``weight`` (``out × in``) where ``mask`` is True, exactly ``n`` in every
        group of ``m`` inputs. Without a mask: the nonzeros, at most ``n`` a group (zeros fill up)."""
        if weight.dim() != 2:
            raise ValueError(f"NMSparseLinear needs a 2-D (out x in) weight, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        _check_shape(in_features, n, m)
        keep = (weight != 0) if mask is None else mask.to(torch.bool)
        if keep.shape != weight.shape:
            raise ValueError(f"mask of shape {tuple(keep.shape)} does not match weight {tuple(weight.shape)}")
        groups = keep.reshape(out_features, in_features // m, m)
        _check_groups(groups, n, m, exact=mask is not None)
        # The kept positions first, then (for groups short of n nonzeros) the earliest others.
        position = torch.arange(m, device=weight.device)
        rank = groups.to(torch.int64) * m + (m - 1 - position)
        indices = rank.topk(n, dim=-1).indices.sort(dim=-1).values
        layer = cls(in_features, out_features, n, m, bias is not None, weight.dtype, weight.device)
        with torch.no_grad():
            layer.indices.copy_(indices.reshape(out_features, -1))
            values = weight.detach().reshape(out_features, in_features // m, m).gather(-1, indices)
            layer.values.copy_(values.reshape(out_features, -1))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    @property
    def density(self) -> float:
        return self.n / self.m

    def dense_weight(self) -> Tensor:
        return nm.dense(self.values, self.indices, self.n, self.m, self.in_features)

    def mask(self) -> Tensor:
        """Boolean ``out × in`` map of the stored entries."""
        ones = torch.ones_like(self.values, dtype=torch.bool)
        return nm.dense(ones, self.indices, self.n, self.m, self.in_features)

    def _product(self, x: Tensor) -> Tensor:
        return nm.linear(x, self.values, self.bias, self.indices, self.n, self.m)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, bias={self.bias is not None}")


def _check_shape(in_features: int, n: int, m: int) -> None:
    if not 1 <= n < m <= 256:  # in-group positions are stored as uint8
        raise ValueError(f"N:M needs 1 <= N < M <= 256, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"in_features={in_features} is not a multiple of M={m}; pad the input dimension")


def _check_groups(groups: Tensor, n: int, m: int, exact: bool) -> None:
    """Every group keeps exactly ``n`` (``exact``) or at most ``n`` entries, else a ValueError naming one."""
    counts = groups.sum(-1)
    bad = (counts != n) if exact else (counts > n)
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        wanted = f"exactly {n}" if exact else f"at most {n}"
        raise ValueError(f"weight is not {n}:{m} sparse along its inputs: row {row}, group {group} (inputs "
                         f"{group * m}..{group * m + m - 1}) keeps {int(counts[row, group])} entries, "
                         f"expected {wanted}")
