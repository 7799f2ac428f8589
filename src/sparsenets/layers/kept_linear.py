"""What every Linear layer that stores only its kept weights shares: a dense ``weight`` on
demand and a forward over any leading dimensions. Subclasses say how they multiply."""

from __future__ import annotations

from torch import Tensor, nn


class KeptLinear(nn.Module):
    """Base of :class:`~sparsenets.layers.CSRLinear` and :class:`~sparsenets.layers.NMSparseLinear`."""

    in_features: int
    out_features: int

    def dense_weight(self) -> Tensor:
        raise NotImplementedError

    def _product(self, x: Tensor) -> Tensor:
        """``x (rows, in) -> (rows, out)``, bias included."""
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """A dense copy, for code that reads ``layer.weight`` (slow; the forward never uses it)."""
        return self.dense_weight()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, "
                             f"the layer expects {self.in_features}")
        lead = x.shape[:-1]
        return self._product(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
