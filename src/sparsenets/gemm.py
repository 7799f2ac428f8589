"""GEMM views and block maps: the one home for the shape helpers every stage shares.

Every weight is seen as a matrix ``out × in`` (its GEMM form): a Linear as it is, a conv
filter bank as ``out × in·kh·kw``, Hugging Face's ``Conv1D`` (stored ``in × out``) transposed.
Block patterns, kernels and checkpoints cut that matrix into ``r × c`` tiles (edge tiles smaller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2) stores its weight as ``in × out``."""
    return module is not None and any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) \
        and hasattr(module, "nf")


def is_experts(module: nn.Module | None) -> bool:
    """A mixture-of-experts bank: ``num_experts`` matrices stacked in 3-D parameters
    (``experts × out × in``, or ``experts × in × out`` where ``is_transposed``)."""
    return bool(expert_weight_names(module))


def expert_weight_names(module: nn.Module | None) -> list[str]:
    """The 3-D ``experts × …`` parameters of an expert bank (masked ones included), else []."""
    n = getattr(module, "num_experts", None)
    if module is None or not isinstance(n, int) or isinstance(module, nn.modules.conv._ConvNd):
        return []
    masked = getattr(module, "parametrizations", {})
    names = [*module._parameters, *masked]
    return [name for name in names if _stacked(getattr(module, name), n)]


def _stacked(tensor: object, n: int) -> bool:
    return isinstance(tensor, Tensor) and tensor.dim() == 3 and tensor.shape[0] == n


def _expert_stack(module: nn.Module | None, tensor: Tensor) -> bool:
    return tensor.dim() == 3 and is_experts(module)


def to_gemm(module: nn.Module, tensor: Tensor) -> Tensor:
    """View a weight (or a tensor of its shape) as ``out × in``; an expert bank as its experts'
    GEMM forms stacked along the rows."""
    if is_hf_conv1d(module):
        return tensor.t()
    if _expert_stack(module, tensor):
        if getattr(module, "is_transposed", False):
            tensor = tensor.transpose(1, 2)
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1)


def from_gemm(module: nn.Module, matrix: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of :func:`to_gemm`: a GEMM-form matrix back in the weight's own ``shape``."""
    if is_hf_conv1d(module):
        return matrix.t().contiguous()
    if len(shape) == 3 and getattr(module, "is_transposed", False) and is_experts(module):
        return matrix.reshape(shape[0], shape[2], shape[1]).transpose(1, 2).contiguous()
    return matrix.reshape(shape)


def n_blocks(size: int, side: int) -> int:
    """How many tiles of ``side`` cover ``size`` (the last may be partial)."""
    return -(-size // side)


def block_sums(matrix: Tensor, block: tuple[int, int], dtype: torch.dtype | None = None) -> Tensor:
    """``(row blocks, column blocks)``: the sum of each ``r × c`` block of ``matrix`` (edge blocks
    over the entries they have), in ``dtype`` (default: the matrix's floating type)."""
    (rows, cols), (r, c) = matrix.shape, block
    n_rows, n_cols = n_blocks(rows, r), n_blocks(cols, c)
    if (n_rows * r, n_cols * c) != (rows, cols):
        matrix = F.pad(matrix, (0, n_cols * c - cols, 0, n_rows * r - rows))
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float32)  # counts stay exact, and float sums run far faster
    # the c entries of each block row in the matrix's own precision, then the r rows in ``dtype``:
    # a reduction that converts as it sums runs ten times slower
    return matrix.reshape(n_rows, r, n_cols, c).sum(3).to(dtype or matrix.dtype).sum(1)


def block_sizes(shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    """``(row blocks, column blocks)``: how many entries of a ``rows × cols`` matrix each block holds."""
    (rows, cols), (r, c) = shape, block
    heights = (rows - torch.arange(n_blocks(rows, r)) * r).clamp(max=r)
    widths = (cols - torch.arange(n_blocks(cols, c)) * c).clamp(max=c)
    return heights[:, None] * widths[None, :]


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
