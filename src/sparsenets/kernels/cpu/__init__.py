"""The C kernels on CPU fp32 tensors, called through ctypes with raw data pointers.

Every operand is 2-D with unit stride along its rows (a row stride is passed on), index
tensors are contiguous int64, and outputs are allocated here. Threads follow
``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref

import torch
from torch import Tensor

from ..layout import BlockLayout
from .build import Signature, load_or_warn

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


_SIGNATURES: dict[str, Signature] = {
    "bsp_spmm": ([_i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int, _ptr, _ptr,
                  _int], _int),
    "bsp_pack_panels": ([_i64, _ptr, _ptr, _i64, _i64, _int, _ptr, _int], None),
    "bsp_panel_floats": ([_i64, _i64, _i64], _i64),
    "bsp_sddmm": ([_i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int], _int),
    "bsp_gemv": ([_i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int], None),
    "bsp_vector_width": ([], _int),
    "bsp_tile_rows": ([], _int),
    "bsp_isa": ([], ctypes.c_char_p),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) when they cannot be built here."""
    return load_or_warn("block_sparse.c", "using the slower torch fallback", _SIGNATURES)


def available() -> bool:
    return library() is not None


# torch.compile calls it eagerly and takes the result as a constant instead of tracing the build
# (file system calls it can't trace). This is the mark torch.compiler.assume_constant_result
# sets; calling that would import torch._dynamo (seconds) with every import of sparsenets.
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _loaded() -> ctypes.CDLL:
    """The kernels, for callers that checked :func:`available` first."""
    lib = library()
    if lib is None:
        raise RuntimeError("sparsenets: the block-sparse CPU kernels are unavailable; check available() first")
    return lib


def describe() -> str:
    """One line on the compiled kernels, for benchmark reports."""
    lib = library()
    if lib is None:
        return "C kernels unavailable (torch fallback)"
    return (f"C kernels: {lib.bsp_isa().decode()}, {lib.bsp_vector_width()}-float vectors, "
            f"{lib.bsp_tile_rows()}-row register tiles")


def isa() -> str | None:
    """The instruction set the C kernels were built for (``"AVX-512"``, ``"AVX2"``, ...), or None."""
    lib = library()
    return None if lib is None else lib.bsp_isa().decode()


# Below this many input rows the forward reads W as stored instead of packing it transposed.
GEMV_ROWS = int(os.environ.get("SPARSENETS_GEMV_ROWS", 8))
# Multiply-adds worth another thread (a few µs of work): a fork-join costs microseconds on an
# idle machine but up to a scheduler time slice when the cores are busy, so tiny products
# stay on the calling thread.
_WORK_PER_THREAD = 1 << 17


def threads_for(work: int, per_thread: int = _WORK_PER_THREAD) -> int:
    """Threads for ``work`` multiply-adds: ``torch.get_num_threads()``, at most one per ``per_thread``."""
    return max(1, min(torch.get_num_threads(), work // per_thread))


# SPARSENETS_PANEL_CACHE=0 packs the forward panels on every call instead (saves their memory).
PANEL_CACHE = os.environ.get("SPARSENETS_PANEL_CACHE", "1") != "0"
# Forward panels (the kept blocks transposed, see bsp_pack_panels) of weights that are not being
# trained, by id of their values tensor until it changes or is freed (tensors compare by value,
# so a WeakKeyDictionary can't hold them).
_PANELS: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def _cached_panels(values: Tensor, layout: BlockLayout) -> Tensor | None:
    """The forward panels of ``values``, packed once while they stay unchanged; None in training."""
    if (torch.is_grad_enabled() and values.requires_grad) or not PANEL_CACHE:
        return None  # in training the optimizer changes them every step
    try:
        key = (values._version, values.data_ptr(), layout.row_ptr.data_ptr(), layout.col_idx.data_ptr(),
               layout.col_idx._version)  # a layout rewritten in place (sparse training) changes version
    except RuntimeError:  # an inference tensor has no version counter to tell a change
        return None
    hit = _PANELS.get(id(values))
    if hit is not None and hit[0]() is values and hit[1] == key:
        return hit[2]
    r, c = layout.block
    lib = _loaded()
    panels = values.new_empty(lib.bsp_panel_floats(layout.nnz, c, r))
    lib.bsp_pack_panels(layout.nnz, None, values.data_ptr(), c, r, 1, panels.data_ptr(),
                        threads_for(values.numel()))
    if hit is None or hit[0]() is not values:
        weakref.finalize(values, _PANELS.pop, id(values), None)
    _PANELS[id(values)] = (weakref.ref(values), key, panels)
    return panels


def _spmm(inp: Tensor, in_dim: int, out_dim: int, in_block: int, out_block: int, ptr: Tensor,
          in_blk: Tensor, blk: Tensor | None, values: Tensor, transposed: bool,
          bias: Tensor | None, panels: Tensor | None = None) -> Tensor:
    rows = inp.shape[0]
    out = inp.new_empty(rows, out_dim)
    if rows == 0:
        return out
    work = rows * in_blk.numel() * in_block * out_block
    status = _loaded().bsp_spmm(
        rows, inp.data_ptr(), inp.stride(0), in_dim, out.data_ptr(), out_dim, out_dim,
        in_block, out_block, ptr.data_ptr(), in_blk.data_ptr(),
        None if blk is None else blk.data_ptr(), values.data_ptr(), int(transposed),
        None if panels is None else panels.data_ptr(), None if bias is None else bias.data_ptr(),
        threads_for(work))
    if status != 0:
        raise MemoryError(f"block-sparse kernel could not allocate its buffers for {rows} rows")
    return out


def linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None = None) -> Tensor:
    """``x (rows, in) -> x · Wᵀ + bias (rows, out)``."""
    r, c = layout.block
    rows = x.shape[0]
    if 0 < rows < GEMV_ROWS:
        out = x.new_empty(rows, layout.out_features)
        _loaded().bsp_gemv(rows, x.data_ptr(), x.stride(0), layout.in_features, out.data_ptr(),
                           layout.out_features, layout.out_features, r, c, layout.row_ptr.data_ptr(),
                           layout.col_idx.data_ptr(), values.data_ptr(),
                           None if bias is None else bias.data_ptr(), threads_for(rows * layout.nnz * r * c))
        return out
    return _spmm(x, layout.in_features, layout.out_features, c, r, layout.row_ptr, layout.col_idx,
                 None, values, True, bias, _cached_panels(values, layout))


def input_grad(grad_out: Tensor, values: Tensor, layout: BlockLayout) -> Tensor:
    """``dX = dY · W``, walking the blocks column-block by column-block."""
    r, c = layout.block
    return _spmm(grad_out, layout.out_features, layout.in_features, r, c, layout.t_ptr, layout.t_row,
                 layout.t_block, values, False, None)


def values_grad(grad_out: Tensor, x: Tensor, layout: BlockLayout) -> Tensor:
    """``dValues[e] = dY[:, rows(e)]ᵀ · X[:, cols(e)]``, for the kept blocks only."""
    r, c = layout.block
    grad = torch.empty(layout.nnz, r, c, dtype=x.dtype)
    if layout.nnz:
        status = _loaded().bsp_sddmm(
            x.shape[0], grad_out.data_ptr(), grad_out.stride(0), x.data_ptr(), x.stride(0),
            layout.out_features, layout.in_features, r, c, layout.nnz,
            layout.row_idx.data_ptr(), layout.col_idx.data_ptr(), grad.data_ptr(),
            threads_for(x.shape[0] * layout.nnz * r * c))
        if status != 0:
            raise MemoryError(f"block-sparse kernel could not allocate its buffers for {x.shape[0]} rows")
    return grad
