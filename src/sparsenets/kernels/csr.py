"""``W`` in compressed-sparse-row form times a dense input, as ``torch.library`` custom ops.

Sparse CSR tensors can't be fake tensors under torch.compile or torch.export, so the ops take
the CSR parts (``crow_indices``, ``col_indices``, ``values``) as plain tensors. On CPU fp32 they
run the C kernels of :mod:`.cpu.gather` (vectorised over the batch); other dtypes and devices,
or a machine without a C compiler, build a torch sparse weight and run ``torch.sparse.mm``.
Either way the forward returns the transpose of an ``out × rows`` matrix, the layout both
write directly. ``sparsenets::csr_linear``
has autograd registered; its backward calls ``csr_input_grad`` (``dY · W``) and
``csr_values_grad`` (``dYᵀ · X`` sampled at the stored entries).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from .cpu import gather
from .eager import traced, wants_grad

__all__ = ["csr_linear", "linear"]

# torch warns once per process that sparse CSR support is "beta" (the ops used here are
# stable): spend that one warning here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                            (1, 1), check_invariants=False)


def _weight(values: Tensor, crow: Tensor, col: Tensor, out_features: int, in_features: int) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, (out_features, in_features), check_invariants=False)


def linear(x: Tensor, values: Tensor, bias: Tensor | None, crow_indices: Tensor, col_indices: Tensor,
           out_features: int, in_features: int) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``: the op, or in eager inference the product itself
    (the op's dispatch costs tens of microseconds)."""
    args = (x, values, bias, crow_indices, col_indices, out_features, in_features)
    if traced(x) or wants_grad(x, values, bias):
        return csr_linear(*args)
    return _product(*args)


def _product(x: Tensor, values: Tensor, bias: Tensor | None, crow_indices: Tensor, col_indices: Tensor,
             out_features: int, in_features: int) -> Tensor:
    if gather.supports(x, values, bias):
        return gather.csr_linear(x, _ptr(crow_indices), _col(col_indices), values.contiguous(),
                                 None if bias is None else bias.contiguous(), out_features, transposed=True)
    weight = _weight(values, crow_indices, col_indices, out_features, in_features)
    # W·xᵀ is the product MKL runs sparse-times-dense; the result is transposed back (a view).
    if bias is None:
        return torch.sparse.mm(weight, x.t()).t()
    return torch.addmm(bias.unsqueeze(1), weight, x.t()).t()


@torch.library.custom_op("sparsenets::csr_linear", mutates_args=())
def csr_linear(x: Tensor, values: Tensor, bias: Tensor | None, crow_indices: Tensor, col_indices: Tensor,
               out_features: int, in_features: int) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias``, returned as the transpose of an ``out × rows`` matrix."""
    return _product(x, values, bias, crow_indices, col_indices, out_features, in_features)


@csr_linear.register_fake
def _(x, values, bias, crow_indices, col_indices, out_features, in_features):
    return x.new_empty(out_features, x.shape[0]).t()  # the strides the real product has


@torch.library.custom_op("sparsenets::csr_input_grad", mutates_args=())
def csr_input_grad(grad_out: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor,
                   in_features: int) -> Tensor:
    """``dX = dY · W`` (rows, in)."""
    if gather.supports(grad_out, values):
        ptr, rows, perm = by_column(crow_indices, col_indices, in_features)
        return gather.csr_linear(grad_out, ptr, rows, values.contiguous(), None, in_features, perm)
    return torch.mm(grad_out, _weight(values, crow_indices, col_indices, grad_out.shape[1], in_features))


@csr_input_grad.register_fake
def _(grad_out, values, crow_indices, col_indices, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


@torch.library.custom_op("sparsenets::csr_values_grad", mutates_args=())
def csr_values_grad(grad_out: Tensor, x: Tensor, values: Tensor, crow_indices: Tensor,
                    col_indices: Tensor) -> Tensor:
    """``dValues``: ``dYᵀ · X`` at the stored entries only (nnz,)."""
    if gather.supports(grad_out, x, values):
        return gather.csr_values_grad(grad_out, x, _ptr(crow_indices), _col(col_indices))
    pattern = _weight(values, crow_indices, col_indices, grad_out.shape[1], x.shape[1])
    return torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()


@csr_values_grad.register_fake
def _(grad_out, x, values, crow_indices, col_indices):
    return torch.empty_like(values)


def _setup_context(ctx, inputs, output) -> None:
    x, values, bias, crow, col, out_features, in_features = inputs
    ctx.save_for_backward(x, values, crow, col)
    ctx.in_features = in_features


def _backward(ctx, grad_out: Tensor):
    x, values, crow, col = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[:3]
    grad_x = csr_input_grad(grad_out, values, crow, col, ctx.in_features) if need_x else None
    grad_values = csr_values_grad(grad_out, x, values, crow, col) if need_values else None
    grad_bias = grad_out.sum(0) if need_bias else None
    return grad_x, grad_values, grad_bias, None, None, None, None


csr_linear.register_autograd(_backward, setup_context=_setup_context)


# ---- the index as the C kernels read it ---------------------------------------------------------


def _ptr(crow_indices: Tensor) -> Tensor:
    return crow_indices.to(torch.int64).contiguous()


def _col(col_indices: Tensor) -> Tensor:
    return col_indices.to(torch.int32).contiguous()


# id(col_indices) -> (weak references to (col, crow), (their versions, in_features), the index by column)
_BY_COLUMN: dict[int, tuple[tuple[Any, Any], tuple[int, int, int], tuple[Tensor, Tensor, Tensor]]] = {}


def by_column(crow_indices: Tensor, col_indices: Tensor, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """W's index by column, the CSR of ``Wᵀ``: ``(ptr, rows, perm)``, entry ``e`` of ``Wᵀ`` holding
    ``values[perm[e]]``. An argsort: kept while ``col_indices`` lives and neither tensor changes
    in place, so a training step pays for it once."""
    key = id(col_indices)
    try:
        state = (crow_indices._version, col_indices._version, in_features)
    except RuntimeError:  # inference tensors have no version counter: don't cache
        return _by_column(crow_indices, col_indices, in_features)
    hit = _BY_COLUMN.get(key)
    if hit is not None and hit[0][0]() is col_indices and hit[0][1]() is crow_indices and hit[1] == state:
        return hit[2]
    index = _by_column(crow_indices, col_indices, in_features)
    refs = (weakref.ref(col_indices, lambda _: _BY_COLUMN.pop(key, None)), weakref.ref(crow_indices))
    _BY_COLUMN[key] = (refs, state, index)
    return index


def _by_column(crow_indices: Tensor, col_indices: Tensor, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    col = col_indices.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(crow_indices.numel() - 1), crow_indices.to(torch.int64).diff())
    perm = torch.argsort(col, stable=True)  # rows stay ascending within each column
    counts = torch.bincount(col, minlength=in_features)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ptr, rows[perm].to(torch.int32), perm.to(torch.int32)
