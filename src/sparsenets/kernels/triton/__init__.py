"""Block-sparse linear on CUDA tensors with Triton kernels (forward, input and weight gradients).

Plain functions on 2-D operands; :mod:`..ops` wraps them as differentiable custom ops.

The kernels also run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported), which is how they are tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..layout import BlockLayout
from .block_sparse import forward_kernel, input_grad_kernel, values_grad_kernel

BLOCK_M = 64


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting: TF32 tensor cores only where the user allowed them.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None = None) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``."""
    r, c = layout.block
    rows = x.shape[0]
    y = x.new_empty(rows, layout.out_features)
    grid = (triton.cdiv(rows, BLOCK_M), layout.grid[0])
    if rows:
        forward_kernel[grid](x, values, layout.row_ptr, layout.col_idx, bias if bias is not None else values, y,
                             rows, layout.out_features, layout.in_features, x.stride(0), y.stride(0),
                             R=r, C=c, BLOCK_M=BLOCK_M, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype))
    return y


def input_grad(grad_out: Tensor, values: Tensor, layout: BlockLayout) -> Tensor:
    r, c = layout.block
    rows = grad_out.shape[0]
    grad_x = grad_out.new_empty(rows, layout.in_features)
    if rows:
        input_grad_kernel[(triton.cdiv(rows, BLOCK_M), layout.grid[1])](
            grad_out, values, layout.t_ptr, layout.t_row, layout.t_block, grad_x,
            rows, layout.out_features, layout.in_features, grad_out.stride(0), grad_x.stride(0),
            R=r, C=c, BLOCK_M=BLOCK_M, PRECISION=_precision(grad_out.dtype))
    return grad_x


def values_grad(grad_out: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    r, c = layout.block
    grad = x.new_zeros(layout.nnz, r, c)
    if layout.nnz:
        values_grad_kernel[(layout.nnz,)](
            grad_out, x, layout.row_idx, layout.col_idx, grad, x.shape[0], layout.out_features,
            layout.in_features, grad_out.stride(0), x.stride(0),
            R=r, C=c, BLOCK_M=BLOCK_M, PRECISION=_precision(x.dtype))
    return grad
