"""GEMM views and block maps: the one home for the shape helpers every stage shares.

Every weight is seen as a matrix ``out × in`` (its GEMM form): a Linear as it is, a conv
filter bank as ``out × in·kh·kw``, Hugging Face's ``Conv1D`` (stored ``in × out``) transposed.
Block patterns, kernels and checkpoints cut that matrix into ``r × c`` tiles (edge tiles smaller).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2) stores its weight as ``in × out``."""
    return module is not None and any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) \
        and hasattr(module, "nf")


def to_gemm(module: nn.Module, tensor: Tensor) -> Tensor:
    """View a weight (or a tensor of its shape) as ``out × in``."""
    if is_hf_conv1d(module):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def from_gemm(module: nn.Module, matrix: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of :func:`to_gemm`: a GEMM-form matrix back in the weight's own ``shape``."""
    if is_hf_conv1d(module):
        return matrix.t().contiguous()
    return matrix.reshape(shape)


def n_blocks(size: int, side: int) -> int:
    """How many tiles of ``side`` cover ``size`` (the last may be partial)."""
    return -(-size // side)


def block_keep(mask: Tensor, block: tuple[int, int]) -> Tensor:
    """``(row blocks, column blocks)`` map: True where the ``r × c`` block of ``mask`` has any True
    (or any nonzero, for a numeric matrix)."""
    r, c = block
    rows, cols = mask.shape
    padded = torch.zeros(n_blocks(rows, r) * r, n_blocks(cols, c) * c, dtype=torch.bool, device=mask.device)
    padded[:rows, :cols] = mask != 0
    return padded.view(padded.shape[0] // r, r, padded.shape[1] // c, c).any(dim=3).any(dim=1)


def expand_blocks(keep: Tensor, block: tuple[int, int], shape: tuple[int, int]) -> Tensor:
    """The element mask of a ``rows × cols`` matrix from its block map (the inverse of :func:`block_keep`)."""
    r, c = block
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: shape[0], : shape[1]]


def block_density(matrix: Tensor, block: tuple[int, int]) -> float:
    """Fraction of the ``r × c`` blocks of ``matrix`` holding any nonzero."""
    return float(block_keep(matrix, block).float().mean())
