"""Block-sparse 2-d convolution (stride 1, zero padding) on the C kernels.

:func:`conv2d` convolves an NCHW input with a weight kept as blocks of its GEMM form
(``out × C·kh·kw``, see :mod:`.layout`), reading the input in place instead of unfolding it
into patches. Under torch.compile and torch.export it runs as the custom op
``sparsenets::block_sparse_conv2d`` (with its two gradient ops, fake implementations and
autograd), one opaque node in the graph; eager code calls the kernels directly, as
:mod:`.eager` does for the linear kernels.

The shape travels as ints: ``out_channels, in_features, r, c, kh, kw, dh, dw`` and the zero
padding ``pt, pb, pl, pr`` (top, bottom, left, right).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu import conv as kernels
from .cpu.conv import Padding, Pair
from .eager import traced, wants_grad
from .layout import BlockLayout
from .ops import index_tensors

__all__ = ["available", "conv2d"]

available = kernels.available


def _layout(index: list[Tensor], out_channels: int, in_features: int, r: int, c: int) -> BlockLayout:
    return BlockLayout(out_channels, in_features, (r, c), *index)


@torch.library.custom_op("sparsenets::block_sparse_conv2d", mutates_args=())
def conv2d_op(x: Tensor, values: Tensor, bias: Tensor | None, index: list[Tensor], out_channels: int,
              in_features: int, r: int, c: int, kh: int, kw: int, dh: int, dw: int, pt: int, pb: int, pl: int,
              pr: int) -> Tensor:
    """``y (N, out, Ho, Wo)`` from ``x (N, C, H, W)``."""
    layout = _layout(index, out_channels, in_features, r, c)
    bias = None if bias is None else bias.contiguous()
    return kernels.forward(x.contiguous(), values.contiguous(), layout, bias, (kh, kw), (dh, dw), (pt, pb, pl, pr))


@conv2d_op.register_fake
def _(x, values, bias, index, out_channels, in_features, r, c, kh, kw, dh, dw, pt, pb, pl, pr):
    ho, wo = kernels.output_size((x.shape[2], x.shape[3]), (kh, kw), (dh, dw), (pt, pb, pl, pr))
    return x.new_empty(x.shape[0], out_channels, ho, wo)


@torch.library.custom_op("sparsenets::block_sparse_conv2d_input_grad", mutates_args=())
def input_grad_op(grad_out: Tensor, values: Tensor, index: list[Tensor], out_channels: int, in_features: int,
                  r: int, c: int, kh: int, kw: int, dh: int, dw: int, pt: int, pb: int, pl: int, pr: int,
                  height: int, width: int) -> Tensor:
    """``dx (N, C, H, W)``."""
    layout = _layout(index, out_channels, in_features, r, c)
    return kernels.input_grad(grad_out.contiguous(), values.contiguous(), layout, (height, width), (kh, kw),
                              (dh, dw), (pt, pb, pl, pr))


@input_grad_op.register_fake
def _(grad_out, values, index, out_channels, in_features, r, c, kh, kw, dh, dw, pt, pb, pl, pr, height, width):
    return grad_out.new_empty(grad_out.shape[0], in_features // (kh * kw), height, width)


@torch.library.custom_op("sparsenets::block_sparse_conv2d_values_grad", mutates_args=())
def values_grad_op(grad_out: Tensor, x: Tensor, index: list[Tensor], out_channels: int, in_features: int,
                   r: int, c: int, kh: int, kw: int, dh: int, dw: int, pt: int, pb: int, pl: int, pr: int) -> Tensor:
    """``dValues (nnz, r, c)``: the weight gradient at the kept blocks only."""
    layout = _layout(index, out_channels, in_features, r, c)
    return kernels.values_grad(grad_out.contiguous(), x.contiguous(), layout, (kh, kw), (dh, dw), (pt, pb, pl, pr))


@values_grad_op.register_fake
def _(grad_out, x, index, out_channels, in_features, r, c, kh, kw, dh, dw, pt, pb, pl, pr):
    return x.new_empty(index[1].shape[0], r, c)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, index, *dims = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.dims, ctx.size = dims, (x.shape[2], x.shape[3])


def _backward(ctx, grad_out: Tensor):
    x, values, *index = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[:3]
    grad_x = input_grad_op(grad_out, values, index, *ctx.dims, *ctx.size) if need_x else None
    grad_values = values_grad_op(grad_out, x, index, *ctx.dims) if need_values else None
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
    return grad_x, grad_values, grad_bias, [None] * len(index), *[None] * len(ctx.dims)


conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _Conv2d(torch.autograd.Function):
    """The op's arithmetic and gradients without the dispatcher, for eager calls."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, layout: BlockLayout, kernel: Pair,
                dilation: Pair, padding: Padding) -> Tensor:
        ctx.layout, ctx.geometry = layout, (kernel, dilation, padding)
        ctx.save_for_backward(x, values)
        return kernels.forward(x, values, layout, bias, kernel, dilation, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, values = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        size = (x.shape[2], x.shape[3])
        grad_x = kernels.input_grad(grad_out, values, ctx.layout, size, *ctx.geometry) if need_x else None
        grad_values = kernels.values_grad(grad_out, x, ctx.layout, *ctx.geometry) if need_values else None
        grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_values, grad_bias, None, None, None, None


def conv2d(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, kernel: Pair, dilation: Pair,
           padding: Padding) -> Tensor:
    """``(N, C, H, W) -> (N, out, Ho, Wo)``: the stride-1, zero-padded convolution of an fp32 CPU input."""
    if traced(x):
        r, c = layout.block
        return conv2d_op(x, values, bias, index_tensors(layout), layout.out_features, layout.in_features,
                         r, c, *kernel, *dilation, *padding)
    x, values = x.contiguous(), values.contiguous()
    bias = None if bias is None else bias.contiguous()
    if wants_grad(x, values, bias):
        return _Conv2d.apply(x, values, bias, layout, kernel, dilation, padding)
    return kernels.forward(x, values, layout, bias, kernel, dilation, padding)
