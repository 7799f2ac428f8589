"""2:4 sparse linear layers on GPU sparse tensor cores, through torch's semi-structured tensors.

NVIDIA GPUs of compute capability 8.0+ (A100, H100, ...) multiply a weight with at most 2
nonzeros in every 4 consecutive inputs at up to twice the dense speed, in fp16/bf16/int8.
Elsewhere (CPU, older GPUs, fp32, shapes the hardware can't take) the layer keeps the masked
dense weight, so it computes the same function everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SemiStructuredLinear", "semi_structured_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
# Weight (out × in) sides must be multiples of these for torch's CUTLASS/cuSPARSELt kernels.
_MULTIPLES = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (32, 128)}


def semi_structured_supported(weight: Tensor) -> bool:
    """Whether ``weight`` (``out × in``) can become a torch semi-structured sparse tensor here."""
    if weight.device.type != "cuda" or weight.dtype not in _DTYPES or weight.dim() != 2:
        return False
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return False
    rows, cols = _MULTIPLES[weight.dtype]
    return weight.shape[0] % rows == 0 and weight.shape[1] % cols == 0


def is_two_four(mask: Tensor) -> bool:
    """At most 2 True in every run of 4 consecutive inputs (columns)."""
    if mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(*mask.shape[:-1], -1, 4).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4-sparse weight, on sparse tensor cores where the GPU has them.

    Meant for inference: the compressed weight is frozen (``requires_grad=False``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.accelerated = semi_structured_supported(weight)
        if self.accelerated:
            weight = torch.sparse.to_sparse_semi_structured(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Tensor | None) -> SemiStructuredLinear:
        """From an ``out × in`` weight and a 2:4 mask over its inputs."""
        if mask.shape != weight.shape or not is_two_four(mask):
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not a 2:4 pattern over the inputs of a "
                             f"{tuple(weight.shape)} weight (at most 2 kept in every 4 consecutive inputs)")
        return cls(weight * mask.to(weight.dtype), bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.accelerated:
            # The semi-structured kernels want a 2-D input with rows in multiples of 8.
            lead, x2d = x.shape[:-1], x.reshape(-1, self.in_features)
            rows = x2d.shape[0]
            padded = F.pad(x2d, (0, 0, 0, -rows % 8))
            y = F.linear(padded, self.weight, self.bias)[:rows]
            return y.reshape(*lead, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, accelerated={self.accelerated}"
