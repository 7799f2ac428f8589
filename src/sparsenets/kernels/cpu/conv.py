"""The C convolution kernels (``conv.c``) on CPU fp32 tensors, called through ctypes.

Stride 1 on an input that is already padded: ``x (N, C, Hp, Wp)`` contiguous, a kernel of
``kh × kw`` taps at dilation ``dh, dw``, and the weight in GEMM form (``out × C·kh·kw``) as the
kept blocks of a :class:`~sparsenets.kernels.layout.BlockLayout`. Outputs are allocated here;
threads follow ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..layout import BlockLayout
from .build import BuildError, load

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

# Multiply-adds worth another thread: fork-joins cost up to a time slice on a busy machine.
_WORK_PER_THREAD = 1 << 18


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) when they cannot be built here."""
    try:
        lib = load(Path(__file__).with_name("conv.c"))
    except (BuildError, OSError) as err:
        warnings.warn(f"sparsenets: block-sparse convolution kernels unavailable, unfolding patches "
                      f"instead ({err})", RuntimeWarning, stacklevel=3)
        return None
    shape = [_i64] * 4  # n, channels, Hp, Wp
    conv = [_i64] * 7  # out, kh, kw, dh, dw, r, c
    lib.bspc_forward.argtypes = [*shape, _ptr, *conv, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
    lib.bspc_input_grad.argtypes = [*shape, _ptr, *conv, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
    lib.bspc_values_grad.argtypes = [*shape, _ptr, _ptr, *conv, _i64, _ptr, _ptr, _ptr, _int]
    for fn in (lib.bspc_forward, lib.bspc_input_grad, lib.bspc_values_grad):
        fn.restype = _int
    lib.bspc_vector_width.restype = _int
    lib.bspc_tile_rows.restype = _int
    return lib


def available() -> bool:
    return library() is not None


available._dynamo_marked_constant = True  # type: ignore[attr-defined]  # a constant to torch.compile


def describe() -> str:
    """One line on the compiled kernels, for benchmark reports."""
    lib = library()
    if lib is None:
        return "convolution kernels unavailable (unfolded patches)"
    return f"conv kernels: {lib.bspc_vector_width()}-float vectors, {lib.bspc_tile_rows()}-row register tiles"


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("sparsenets: the convolution kernels are unavailable; check available() first")
    return lib


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // _WORK_PER_THREAD))


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("block-sparse convolution kernel could not allocate its buffers")


def output_size(padded: tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """``(Ho, Wo)`` of a stride-1 convolution of an already padded ``(Hp, Wp)`` input."""
    return padded[0] - dilation[0] * (kernel[0] - 1), padded[1] - dilation[1] * (kernel[1] - 1)


def _work(n: int, layout: BlockLayout, pixels: int) -> int:
    r, c = layout.block
    return n * layout.nnz * r * c * pixels


def forward(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, kernel: tuple[int, int],
            dilation: tuple[int, int]) -> Tensor:
    """``y (N, out, Ho, Wo)``: the convolution of the padded, contiguous ``x`` plus ``bias``."""
    n, channels, hp, wp = x.shape
    ho, wo = output_size((hp, wp), kernel, dilation)
    y = x.new_empty(n, layout.out_features, ho, wo)
    r, c = layout.block
    _check(_loaded().bspc_forward(
        n, channels, hp, wp, x.data_ptr(), layout.out_features, *kernel, *dilation, r, c,
        layout.row_ptr.data_ptr(), layout.col_idx.data_ptr(), values.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), _threads(_work(n, layout, ho * wp))))
    return y


def input_grad(grad_out: Tensor, values: Tensor, layout: BlockLayout, padded: tuple[int, int],
               kernel: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``dx (N, C, Hp, Wp)`` for the padded input, from a contiguous ``grad_out``."""
    n, _, ho, _ = grad_out.shape
    channels = layout.in_features // (kernel[0] * kernel[1])
    dx = grad_out.new_zeros(n, channels, *padded)
    r, c = layout.block
    _check(_loaded().bspc_input_grad(
        n, channels, *padded, grad_out.data_ptr(), layout.out_features, *kernel, *dilation, r, c,
        layout.t_ptr.data_ptr(), layout.t_row.data_ptr(), layout.t_block.data_ptr(), values.data_ptr(),
        dx.data_ptr(), _threads(_work(n, layout, ho * padded[1]))))
    return dx


def values_grad(grad_out: Tensor, x: Tensor, layout: BlockLayout, kernel: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:
    """``dValues (nnz, r, c)`` from a contiguous ``grad_out`` and the padded, contiguous ``x``."""
    n, channels, hp, wp = x.shape
    r, c = layout.block
    grad = x.new_empty(layout.nnz, r, c)
    _check(_loaded().bspc_values_grad(
        n, channels, hp, wp, x.data_ptr(), grad_out.data_ptr(), layout.out_features, *kernel, *dilation,
        r, c, layout.nnz, layout.row_idx.data_ptr(), layout.col_idx.data_ptr(), grad.data_ptr(),
        _threads(_work(n, layout, grad_out.shape[2] * wp))))
    return grad
