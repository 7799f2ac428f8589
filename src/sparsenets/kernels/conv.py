"""Block-sparse 2-d convolution (stride 1, zero padding already applied) on the C kernels.

:func:`conv2d` convolves a padded NCHW input with a weight kept as blocks of its GEMM form
(``out × C·kh·kw``, see :mod:`.layout`), reading the input in place instead of unfolding it
into patches. Under torch.compile and torch.export it runs as the custom op
``sparsenets::block_sparse_conv2d`` (with its two gradient ops, fake implementations and
autograd), one opaque node in the graph; eager code calls the kernels directly, as
:mod:`.eager` does for the linear kernels.

The shape travels as ints: ``out_channels, in_features, r, c, kh, kw, dh, dw``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .cpu import conv as kernels
from .eager import traced, wants_grad
from .layout import BlockLayout
from .ops import index_tensors

__all__ = ["available", "conv2d"]

available = kernels.available


def _layout(index: list[Tensor], out_channels: int, in_features: int, r: int, c: int) -> BlockLayout:
    return BlockLayout(out_channels, in_features, (r, c), *index)


@torch.library.custom_op("sparsenets::block_sparse_conv2d", mutates_args=())
def conv2d_op(x: Tensor, values: Tensor, bias: Tensor | None, index: list[Tensor], out_channels: int,
              in_features: int, r: int, c: int, kh: int, kw: int, dh: int, dw: int) -> Tensor:
    """``y (N, out, Ho, Wo)`` from the padded ``x (N, C, Hp, Wp)``."""
    layout = _layout(index, out_channels, in_features, r, c)
    bias = None if bias is None else bias.contiguous()
    return kernels.forward(x.contiguous(), values.contiguous(), layout, bias, (kh, kw), (dh, dw))


@conv2d_op.register_fake
def _(x, values, bias, index, out_channels, in_features, r, c, kh, kw, dh, dw):
    ho, wo = kernels.output_size((x.shape[2], x.shape[3]), (kh, kw), (dh, dw))
    return x.new_empty(x.shape[0], out_channels, ho, wo)


@torch.library.custom_op("sparsenets::block_sparse_conv2d_input_grad", mutates_args=())
def input_grad_op(grad_out: Tensor, values: Tensor, index: list[Tensor], out_channels: int, in_features: int,
                  r: int, c: int, kh: int, kw: int, dh: int, dw: int, hp: int, wp: int) -> Tensor:
    """``dx (N, C, Hp, Wp)`` of the padded input."""
    layout = _layout(index, out_channels, in_features, r, c)
    return kernels.input_grad(grad_out.contiguous(), values.contiguous(), layout, (hp, wp), (kh, kw), (dh, dw))


@input_grad_op.register_fake
def _(grad_out, values, index, out_channels, in_features, r, c, kh, kw, dh, dw, hp, wp):
    return grad_out.new_empty(grad_out.shape[0], in_features // (kh * kw), hp, wp)


@torch.library.custom_op("sparsenets::block_sparse_conv2d_values_grad", mutates_args=())
def values_grad_op(grad_out: Tensor, x: Tensor, index: list[Tensor], out_channels: int, in_features: int,
                   r: int, c: int, kh: int, kw: int, dh: int, dw: int) -> Tensor:
    """``dValues (nnz, r, c)``: the weight gradient at the kept blocks only."""
    layout = _layout(index, out_channels, in_features, r, c)
    return kernels.values_grad(grad_out.contiguous(), x.contiguous(), layout, (kh, kw), (dh, dw))


@values_grad_op.register_fake
def _(grad_out, x, index, out_channels, in_features, r, c, kh, kw, dh, dw):
    return x.new_empty(index[1].shape[0], r, c)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, index, *dims = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.dims, ctx.padded = dims, (x.shape[2], x.shape[3])


def _backward(ctx, grad_out: Tensor):
    x, values, *index = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[:3]
    grad_x = input_grad_op(grad_out, values, index, *ctx.dims, *ctx.padded) if need_x else None
    grad_values = values_grad_op(grad_out, x, index, *ctx.dims) if need_values else None
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
    return grad_x, grad_values, grad_bias, [None] * len(index), *[None] * len(ctx.dims)


conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _Conv2d(torch.autograd.Function):
    """The op's arithmetic and gradients without the dispatcher, for eager calls."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, layout: BlockLayout,
                kernel: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        ctx.layout, ctx.kernel, ctx.dilation = layout, kernel, dilation
        ctx.save_for_backward(x, values)
        return kernels.forward(x, values, layout, bias, kernel, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, values = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        args = ctx.kernel, ctx.dilation
        grad_x = kernels.input_grad(grad_out, values, ctx.layout, (x.shape[2], x.shape[3]), *args) if need_x else None
        grad_values = kernels.values_grad(grad_out, x, ctx.layout, *args) if need_values else None
        grad_bias = grad_out.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_values, grad_bias, None, None, None


def conv2d(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, kernel: tuple[int, int],
           dilation: tuple[int, int]) -> Tensor:
    """``(N, C, Hp, Wp) -> (N, out, Ho, Wo)``: the stride-1 convolution of a padded fp32 CPU input."""
    if traced(x):
        r, c = layout.block
        return conv2d_op(x, values, bias, index_tensors(layout), layout.out_features, layout.in_features,
                         r, c, *kernel, *dilation)
    x, values = x.contiguous(), values.contiguous()
    bias = None if bias is None else bias.contiguous()
    if wants_grad(x, values, bias):
        return _Conv2d.apply(x, values, bias, layout, kernel, dilation)
    return kernels.forward(x, values, layout, bias, kernel, dilation)
