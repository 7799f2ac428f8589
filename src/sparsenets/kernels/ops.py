"""The block-sparse kernels as ``torch.library`` custom ops, so torch.compile and torch.export see them.

``sparsenets::block_sparse_linear`` and its two gradient ops take the layout as its six int64
index tensors and the shape as ints (``out_features, in_features, r, c``); ``backend`` names the
kernels (``"cpu"`` or ``"triton"``). Each op has a fake implementation (output shape and dtype
only), so the compilers trace through it and keep it as one opaque call, and the forward has
autograd registered: its backward calls the gradient ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import cpu
from .layout import BlockLayout

__all__ = ["index_tensors", "input_grad_op", "kernels", "linear", "linear_op", "rows_contiguous", "values_grad_op"]

# (row_ptr, col_idx, row_idx, t_ptr, t_row, t_block), in BlockLayout's order.
_INDEX = ("row_ptr", "col_idx", "row_idx", "t_ptr", "t_row", "t_block")


def _layout(index: list[Tensor], out_features: int, in_features: int, r: int, c: int) -> BlockLayout:
    return BlockLayout(out_features, in_features, (r, c), *index)


def kernels(backend: str) -> Any:
    """The module holding ``linear``/``input_grad``/``values_grad`` for ``backend``."""
    if backend == "triton":
        from . import triton  # imported on first use: loading triton takes seconds

        return triton
    return cpu


def rows_contiguous(t: Tensor) -> Tensor:
    """``t`` with unit stride along its rows, as the kernels read it (compiled graphs may pass views)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("sparsenets::block_sparse_linear", mutates_args=())
def linear_op(x: Tensor, values: Tensor, bias: Tensor | None, index: list[Tensor], out_features: int,
              in_features: int, r: int, c: int, backend: str) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``."""
    layout = _layout(index, out_features, in_features, r, c)
    bias = None if bias is None else bias.contiguous()
    return kernels(backend).linear(rows_contiguous(x), values.contiguous(), layout, bias)


@linear_op.register_fake
def _(x, values, bias, index, out_features, in_features, r, c, backend):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsenets::block_sparse_input_grad", mutates_args=())
def input_grad_op(grad_out: Tensor, values: Tensor, index: list[Tensor], out_features: int,
                  in_features: int, r: int, c: int, backend: str) -> Tensor:
    """``dX = dY · W`` (rows, in)."""
    layout = _layout(index, out_features, in_features, r, c)
    return kernels(backend).input_grad(rows_contiguous(grad_out), values.contiguous(), layout)


@input_grad_op.register_fake
def _(grad_out, values, index, out_features, in_features, r, c, backend):
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("sparsenets::block_sparse_values_grad", mutates_args=())
def values_grad_op(grad_out: Tensor, x: Tensor, index: list[Tensor], out_features: int,
                   in_features: int, r: int, c: int, backend: str) -> Tensor:
    """``dValues (nnz, r, c)``: the weight gradient at the kept blocks only."""
    layout = _layout(index, out_features, in_features, r, c)
    return kernels(backend).values_grad(rows_contiguous(grad_out), rows_contiguous(x), layout)


@values_grad_op.register_fake
def _(grad_out, x, index, out_features, in_features, r, c, backend):
    return x.new_empty(index[1].shape[0], r, c)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, index, *dims = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.dims = dims


def _backward(ctx, grad_out: Tensor):
    x, values, *index = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[:3]
    grad_x = input_grad_op(grad_out, values, index, *ctx.dims) if need_x else None
    grad_values = values_grad_op(grad_out, x, index, *ctx.dims) if need_values else None
    grad_bias = grad_out.sum(0) if need_bias else None
    no_index_grads = [None] * len(index)  # autograd wants one entry per index tensor
    return grad_x, grad_values, grad_bias, no_index_grads, None, None, None, None, None


linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, backend: str) -> Tensor:
    """The op on a layout: ``x`` (rows, in) with unit stride along rows, ``values`` contiguous."""
    r, c = layout.block
    return linear_op(x, values, bias, index_tensors(layout), layout.out_features, layout.in_features, r, c,
                     backend)


def index_tensors(layout: BlockLayout) -> list[Tensor]:
    """The layout's index as the ops take it."""
    return [getattr(layout, name) for name in _INDEX]
