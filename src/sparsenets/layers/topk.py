"""TopK: an activation that keeps the ``k`` largest values of each row and zeroes the rest."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TopK"]


class TopK(nn.Module):
    """Keep the ``k`` largest entries along ``dim`` (default: the last), zero elsewhere.

    The activation density is exactly ``k / size``; gradients flow to the kept entries only.
    """

    def __init__(self, k: int, dim: int = -1) -> None:
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k, self.dim = k, dim

    def forward(self, x: Tensor) -> Tensor:
        if self.k >= x.shape[self.dim]:
            return x
        values, indices = x.topk(self.k, dim=self.dim)
        return torch.zeros_like(x).scatter(self.dim, indices, values)

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}"
