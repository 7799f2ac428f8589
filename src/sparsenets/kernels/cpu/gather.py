"""The unstructured (CSR) and N:M kernels of ``gather.c`` on CPU fp32 tensors, through ctypes.

Inputs are 2-D with any strides (the kernels pack them in tiles anyway); values, bias and
index tensors are contiguous (CSR: int64 row pointers, int32 columns; N:M: uint8 in-group
indices). Outputs are allocated here, row-major or (``transposed``) as the transpose of a
row-major ``out × rows`` matrix, which the kernels write without a transposition. Threads
follow ``torch.get_num_threads()``, except for products too small to be worth a fork-join.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import threads_for
from .build import Signature, load_or_warn

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_IN = [_i64, _ptr, _i64, _i64]  # rows, data, row stride, column stride
_SIGNATURES: dict[str, Signature] = {
    "sn_csr_spmm": ([*_IN, _i64, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int], _int),
    "sn_nm_spmm": ([*_IN, _i64, _ptr, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _ptr, _int], _int),
    "sn_csr_sddmm": ([*_IN, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int], _int),
    "sn_nm_sddmm": ([*_IN, _ptr, _i64, _i64, _i64, _i64, _int, _int, _ptr, _ptr, _int], _int),
    "sn_nm_input_grad": ([*_IN, _i64, _ptr, _i64, _i64, _int, _int, _ptr, _ptr, _int], _int),
    "sn_vector_width": ([], _int),
}
# Multiply-adds worth a second thread: below this a fork-join (microseconds idle, up to a
# scheduler slice on a busy machine) costs more than it saves.
WORK_PER_THREAD = 100_000
_threads = functools.partial(threads_for, per_thread=WORK_PER_THREAD)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) when they cannot be built here."""
    return load_or_warn("gather.c", "unstructured and N:M layers use the slower torch fallback", _SIGNATURES)


def available() -> bool:
    return library() is not None


available._dynamo_marked_constant = True  # type: ignore[attr-defined]  # see cpu.available


def supports(*tensors: Tensor | None) -> bool:
    """Whether these tensors can take the C kernels: CPU fp32, and a compiler was found."""
    return all(t is None or (t.is_cpu and t.dtype is torch.float32) for t in tensors) and available()


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("sparsenets: the unstructured/N:M CPU kernels are unavailable; check available() first")
    return lib




def _input(t: Tensor) -> list:
    return [t.shape[0], t.data_ptr(), t.stride(0), t.stride(1)]


def _ptr_of(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _output(x: Tensor, features: int, transposed: bool) -> Tensor:
    return x.new_empty(features, x.shape[0]).t() if transposed else x.new_empty(x.shape[0], features)


def _check(status: int, rows: int) -> None:
    if status != 0:
        raise MemoryError(f"sparse kernel could not allocate its buffers for {rows} rows")


def csr_linear(x: Tensor, ptr: Tensor, col: Tensor, values: Tensor, bias: Tensor | None, out_features: int,
               perm: Tensor | None = None, transposed: bool = False) -> Tensor:
    """``x (rows, in) · Pᵀ + bias (rows, out)``, ``P`` in CSR (``ptr`` int64, ``col`` int32, best
    ascending within a row); with ``perm`` (int32) entry ``e`` takes ``values[perm[e]]``."""
    out = _output(x, out_features, transposed)
    work = x.shape[0] * col.numel()
    _check(_lib().sn_csr_spmm(*_input(x), x.shape[1], out.data_ptr(), out.stride(0), out.stride(1),
                              out_features, ptr.data_ptr(),
                              col.data_ptr(), _ptr_of(perm), values.data_ptr(), _ptr_of(bias), _threads(work)),
           x.shape[0])
    return out


def csr_values_grad(grad_out: Tensor, x: Tensor, ptr: Tensor, col: Tensor) -> Tensor:
    """``dY[:, row(e)] · X[:, col(e)]`` for each stored entry ``e`` (nnz,)."""
    grad = x.new_empty(col.numel())
    work = x.shape[0] * col.numel()
    _check(_lib().sn_csr_sddmm(*_input(grad_out), x.data_ptr(), x.stride(0), x.stride(1), grad_out.shape[1],
                               x.shape[1], ptr.data_ptr(), col.data_ptr(), grad.data_ptr(), _threads(work)),
           x.shape[0])
    return grad


def nm_linear(x: Tensor, values: Tensor, idx: Tensor, bias: Tensor | None, n: int, m: int,
              transposed: bool = False) -> Tensor:
    """``x (rows, in) · Wᵀ + bias``, ``W`` as N:M ``values`` and uint8 in-group ``idx`` (out, in/m·n)."""
    out_features = values.shape[0]
    out = _output(x, out_features, transposed)
    work = x.shape[0] * values.numel()
    _check(_lib().sn_nm_spmm(*_input(x), x.shape[1], out.data_ptr(), out.stride(0), out.stride(1), out_features, n, m,
                             idx.data_ptr(), values.data_ptr(), _ptr_of(bias), _threads(work)), x.shape[0])
    return out


def nm_input_grad(grad_out: Tensor, values: Tensor, idx: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """``dX = dY · W`` (rows, in)."""
    grad = grad_out.new_empty(grad_out.shape[0], in_features)
    work = grad_out.shape[0] * values.numel()
    _check(_lib().sn_nm_input_grad(*_input(grad_out), values.shape[0], grad.data_ptr(), in_features, in_features,
                                   n, m, idx.data_ptr(), values.data_ptr(), _threads(work)), grad_out.shape[0])
    return grad


def nm_values_grad(grad_out: Tensor, x: Tensor, idx: Tensor, n: int, m: int) -> Tensor:
    """The gradient of the N:M values (out, in/m·n): ``dYᵀ · X`` at the stored entries."""
    grad = x.new_empty(idx.shape)
    work = x.shape[0] * idx.numel()
    _check(_lib().sn_nm_sddmm(*_input(grad_out), x.data_ptr(), x.stride(0), x.stride(1), grad_out.shape[1],
                              x.shape[1], n, m, idx.data_ptr(), grad.data_ptr(), _threads(work)), x.shape[0])
    return grad
