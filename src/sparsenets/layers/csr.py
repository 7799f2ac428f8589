"""``CSRLinear``: a Linear layer whose weight is a compressed-sparse-row matrix.

For unstructured weights at low density, where a sparse-times-dense product beats the dense
GEMM: on CPU fp32 the C kernels of :mod:`sparsenets.kernels.cpu.gather`, elsewhere
``torch.sparse`` (MKL on CPU, cuSPARSE on CUDA). The kept values are an ``nn.Parameter``, so
the layer trains with autograd; the sparsity structure is fixed (buffers ``crow_indices``,
``col_indices``), and state_dict, deepcopy and pickling work as for any module. Traced or
training, the forward runs the custom op ``sparsenets::csr_linear`` on these plain tensors, so
torch.compile and torch.export take the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import csr
from .kept_linear import KeptLinear


class CSRLinear(KeptLinear):
    """``y = x Wᵀ + b`` with ``W`` (``out × in``) stored as CSR; ``x`` is ``(..., in)``."""

    crow_indices: Tensor  # buffers
    col_indices: Tensor
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(nnz, dtype=dtype, device=device))
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None, bias: Tensor | None = None) -> CSRLinear:
        """Keep the entries of ``weight`` (``out × in``) where ``mask`` is True (default: the nonzeros)."""
        if weight.dim() != 2:
            raise ValueError(f"CSRLinear needs a 2-D (out x in) weight, got shape {tuple(weight.shape)}")
        keep = (weight != 0) if mask is None else mask.to(torch.bool)
        if keep.shape != weight.shape:
            raise ValueError(f"mask of shape {tuple(keep.shape)} does not match weight {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        rows, cols = keep.nonzero(as_tuple=True)
        layer = cls(in_features, out_features, rows.numel(), bias is not None, weight.dtype, weight.device)
        counts = torch.bincount(rows, minlength=out_features)
        with torch.no_grad():
            layer.crow_indices.copy_(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
            layer.col_indices.copy_(cols)
            layer.values.copy_(weight.detach()[rows, cols])
            if bias is not None and layer.bias is not None:  # the layer has a bias iff bias is given
                layer.bias.copy_(bias.detach())
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may keep other entries than this layer: adopt its structure first.
        values = state_dict.get(prefix + "values")
        if values is not None and values.shape != self.values.shape:
            self.values = nn.Parameter(self.values.new_zeros(values.shape), requires_grad=self.values.requires_grad)
            self.col_indices = self.col_indices.new_zeros(values.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(self.in_features * self.out_features, 1)

    def sparse_weight(self) -> Tensor:
        """The weight as a torch sparse CSR tensor (differentiable in ``values``)."""
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def dense_weight(self) -> Tensor:
        return self.sparse_weight().to_dense()

    def mask(self) -> Tensor:
        """Boolean ``out × in`` map of the stored entries."""
        ones = torch.ones_like(self.values, dtype=torch.bool)
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, ones,
                                       (self.out_features, self.in_features), check_invariants=False).to_dense()

    def _product(self, x: Tensor) -> Tensor:
        return csr.linear(x, self.values, self.bias, self.crow_indices, self.col_indices, self.out_features,
                          self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density:.4f}, bias={self.bias is not None}")
