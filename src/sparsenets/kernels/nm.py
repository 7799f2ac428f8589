"""An N:M sparse weight times a dense input, as ``torch.library`` custom ops.

An ``out × in`` weight that keeps ``n`` entries in every group of ``m`` consecutive inputs is
stored compressed: ``values`` (``out × in/m·n``) and ``indices`` (same shape, uint8), the position
of each value inside its group, ascending within the group; entry ``j`` of a row sits at column
``(j // n)·m + indices[j]``. On CPU fp32 the ops run the C kernels of :mod:`.cpu.gather`; other
dtypes and devices (or no C compiler) expand the weight and call dense torch ops.
``sparsenets::nm_linear`` has autograd registered; its backward calls ``nm_input_grad``
(``dY · W``) and ``nm_values_grad`` (``dYᵀ · X`` at the stored entries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .cpu import gather
from .eager import traced, wants_grad

__all__ = ["columns", "dense", "linear", "nm_linear"]


def columns(indices: Tensor, n: int, m: int) -> Tensor:
    """The column of every stored entry (int64, shaped like ``indices``)."""
    group = torch.arange(indices.shape[-1], device=indices.device) // n
    return group * m + indices.long()


def dense(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """The ``out × in`` weight (differentiable in ``values``)."""
    zeros = values.new_zeros(values.shape[0], in_features)
    return zeros.scatter(1, columns(indices, n, m), values)


def linear(x: Tensor, values: Tensor, bias: Tensor | None, indices: Tensor, n: int, m: int) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``: the op, or in eager inference the product itself."""
    if traced(x) or wants_grad(x, values, bias):
        return nm_linear(x, values, bias, indices, n, m)
    return _product(x, values, bias, indices, n, m)


def _product(x: Tensor, values: Tensor, bias: Tensor | None, indices: Tensor, n: int, m: int) -> Tensor:
    if gather.supports(x, values, bias):
        return gather.nm_linear(x, values.contiguous(), indices.contiguous(),
                                None if bias is None else bias.contiguous(), n, m)
    return F.linear(x, dense(values, indices, n, m, x.shape[1]), bias)


@torch.library.custom_op("sparsenets::nm_linear", mutates_args=())
def nm_linear(x: Tensor, values: Tensor, bias: Tensor | None, indices: Tensor, n: int, m: int) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``, ``W`` in N:M form."""
    return _product(x, values, bias, indices, n, m)


@nm_linear.register_fake
def _(x, values, bias, indices, n, m):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("sparsenets::nm_input_grad", mutates_args=())
def nm_input_grad(grad_out: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """``dX = dY · W`` (rows, in)."""
    if gather.supports(grad_out, values):
        return gather.nm_input_grad(grad_out, values.contiguous(), indices.contiguous(), n, m, in_features)
    return grad_out @ dense(values, indices, n, m, in_features)


@nm_input_grad.register_fake
def _(grad_out, values, indices, n, m, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("sparsenets::nm_values_grad", mutates_args=())
def nm_values_grad(grad_out: Tensor, x: Tensor, indices: Tensor, n: int, m: int) -> Tensor:
    """``dValues`` (out, in/m·n): ``dYᵀ · X`` at the stored entries only."""
    if gather.supports(grad_out, x):
        return gather.nm_values_grad(grad_out, x, indices.contiguous(), n, m)
    return (grad_out.t() @ x).gather(1, columns(indices, n, m))


@nm_values_grad.register_fake
def _(grad_out, x, indices, n, m):
    return x.new_empty(indices.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, indices, n, m = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.n, ctx.m = n, m


def _backward(ctx, grad_out: Tensor):
    x, values, indices = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[:3]
    grad_x = nm_input_grad(grad_out, values, indices, ctx.n, ctx.m, x.shape[1]) if need_x else None
    grad_values = nm_values_grad(grad_out, x, indices, ctx.n, ctx.m) if need_values else None
    grad_bias = grad_out.sum(0) if need_bias else None
    return grad_x, grad_values, grad_bias, None, None, None


nm_linear.register_autograd(_backward, setup_context=_setup_context)
