"""The C convolution kernels (``conv.c``) on CPU fp32 tensors, called through ctypes.

Stride 1 with zero padding ``(top, bottom, left, right)`` applied inside the kernels: ``x (N, C,
H, W)`` contiguous, a kernel of ``kh × kw`` taps at dilation ``dh, dw``, and the weight in GEMM
form (``out × C·kh·kw``) as the kept blocks of a :class:`~sparsenets.kernels.layout.BlockLayout`.
Outputs are allocated here; threads follow ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools

from torch import Tensor

from ..layout import BlockLayout
from . import threads_for
from .build import Signature, load_or_warn

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
Pair = tuple[int, int]
Padding = tuple[int, int, int, int]  # top, bottom, left, right

# Multiply-adds worth another thread: fork-joins cost up to a time slice on a busy machine.
_WORK_PER_THREAD = 1 << 18
_threads = functools.partial(threads_for, per_thread=_WORK_PER_THREAD)


_SIGNATURES: dict[str, Signature] = {
    "bspc_forward": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int], _int),
    "bspc_input_grad": ([_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int], _int),
    "bspc_values_grad": ([_ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _int], _int),
    "bspc_vector_width": ([], _int),
    "bspc_tile_rows": ([], _int),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) when they cannot be built here."""
    return load_or_warn("conv.c", "unfolding patches instead", _SIGNATURES)


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


def output_size(size: Pair, kernel: Pair, dilation: Pair, padding: Padding) -> Pair:
    """``(Ho, Wo)`` of a stride-1 convolution of an ``(H, W)`` input."""
    return (size[0] + padding[0] + padding[1] - dilation[0] * (kernel[0] - 1),
            size[1] + padding[2] + padding[3] - dilation[1] * (kernel[1] - 1))


def _dims(x_shape, layout: BlockLayout, kernel: Pair, dilation: Pair, padding: Padding):
    """The shape as the kernels take it: n, C, H, W, out, kh, kw, dh, dw, pt, pb, pl, pr, r, c."""
    n, channels, height, width = x_shape
    return (_i64 * 15)(n, channels, height, width, layout.out_features, *kernel, *dilation, *padding, *layout.block)


def _work(n: int, layout: BlockLayout, pixels: int) -> int:
    r, c = layout.block
    return n * layout.nnz * r * c * pixels


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("block-sparse convolution kernel could not allocate its buffers")


def forward(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None, kernel: Pair,
            dilation: Pair, padding: Padding) -> Tensor:
    """``y (N, out, Ho, Wo)``: the convolution of the contiguous ``x (N, C, H, W)`` plus ``bias``."""
    n, _, height, width = x.shape
    ho, wo = output_size((height, width), kernel, dilation, padding)
    y = x.new_empty(n, layout.out_features, ho, wo)
    _check(_loaded().bspc_forward(
        _dims(x.shape, layout, kernel, dilation, padding), x.data_ptr(), layout.row_ptr.data_ptr(),
        layout.col_idx.data_ptr(), values.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
        _threads(_work(n, layout, ho * wo))))
    return y


def input_grad(grad_out: Tensor, values: Tensor, layout: BlockLayout, size: Pair, kernel: Pair,
               dilation: Pair, padding: Padding) -> Tensor:
    """``dx (N, C, H, W)`` from a contiguous ``grad_out``."""
    n, _, ho, wo = grad_out.shape
    dx = grad_out.new_empty(n, layout.in_features // (kernel[0] * kernel[1]), *size)
    _check(_loaded().bspc_input_grad(
        _dims(dx.shape, layout, kernel, dilation, padding), grad_out.data_ptr(), layout.t_ptr.data_ptr(),
        layout.t_row.data_ptr(), layout.t_block.data_ptr(), values.data_ptr(), dx.data_ptr(),
        _threads(_work(n, layout, ho * wo))))
    return dx


def values_grad(grad_out: Tensor, x: Tensor, layout: BlockLayout, kernel: Pair, dilation: Pair,
                padding: Padding) -> Tensor:
    """``dValues (nnz, r, c)`` from a contiguous ``grad_out`` and the contiguous ``x``."""
    n, _, ho, wo = grad_out.shape
    grad = x.new_empty(layout.nnz, *layout.block)
    _check(_loaded().bspc_values_grad(
        _dims(x.shape, layout, kernel, dilation, padding), x.data_ptr(), grad_out.data_ptr(), layout.nnz,
        layout.row_idx.data_ptr(), layout.col_idx.data_ptr(), grad.data_ptr(), _threads(_work(n, layout, ho * wo))))
    return grad
