"""Block-sparse linear in plain torch ops: the fallback on any device and dtype, and the
reference the fast kernels are tested against. Autograd differentiates it as it stands.

Each kept block is one small dense GEMM on the input columns it reads, batched over blocks;
partial outputs are summed into their row-blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import BlockLayout

# Bound the gathered intermediate (rows × nnz × block side) to about this many elements.
_CHUNK_ELEMENTS = 1 << 24


def linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None = None) -> Tensor:
    """``x (rows, in) -> (rows, out)``, the product with the block-sparse weight, plus ``bias``."""
    rows = x.shape[0]
    r, c = layout.block
    step = max(1, _CHUNK_ELEMENTS // max(1, layout.nnz * max(r, c)))
    parts = [_linear_rows(x[i:i + step], values, layout) for i in range(0, max(rows, 1), step)]
    y = torch.cat(parts) if len(parts) != 1 else parts[0]
    return y if bias is None else y + bias


def _linear_rows(x: Tensor, values: Tensor, layout: BlockLayout) -> Tensor:
    r, c = layout.block
    n_rows, n_cols = layout.grid
    rows = x.shape[0]
    x_blocks = F.pad(x, (0, n_cols * c - layout.in_features)).view(rows, n_cols, c)
    gathered = x_blocks[:, layout.col_idx].transpose(0, 1)  # (nnz, rows, c)
    partial = torch.bmm(gathered, values.transpose(1, 2))  # (nnz, rows, r)
    summed = partial.new_zeros(n_rows, rows, r).index_add(0, layout.row_idx, partial)
    return summed.permute(1, 0, 2).reshape(rows, n_rows * r)[:, : layout.out_features]
