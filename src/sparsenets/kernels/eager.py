"""The kernels called straight from eager code, bypassing the custom ops of :mod:`.ops`.

Same arithmetic and gradients as ``sparsenets::block_sparse_linear``, without the dispatcher
and the Python autograd wrapper of ``torch.library``, which cost tens of microseconds a call:
more than a small product. Only for real tensors outside torch.compile and torch.export.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .layout import BlockLayout
from .ops import kernels, rows_contiguous

__all__ = ["linear", "traced", "wants_grad"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, layout: BlockLayout, backend: str) -> Tensor:
        ctx.layout, ctx.backend = layout, backend
        ctx.save_for_backward(x, values)
        return kernels(backend).linear(x, values, layout, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, values = ctx.saved_tensors
        grad_out, impl = rows_contiguous(grad_out), kernels(ctx.backend)
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        grad_x = impl.input_grad(grad_out, values, ctx.layout) if need_x else None
        grad_values = impl.values_grad(grad_out, x, ctx.layout) if need_values else None
        grad_bias = grad_out.sum(0) if need_bias else None
        return grad_x, grad_values, grad_bias, None, None


def linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, backend: str) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias``; autograd only when a gradient is wanted."""
    x, values = rows_contiguous(x), values.contiguous()
    bias = None if bias is None else bias.contiguous()
    if wants_grad(x, values, bias):
        return _Linear.apply(x, values, bias, layout, backend)
    return kernels(backend).linear(x, values, layout, bias)


def traced(x: Tensor) -> bool:
    """Under torch.compile or torch.export, which see fake or functional tensor subclasses."""
    return type(x) is not Tensor or torch.compiler.is_compiling()


def wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
