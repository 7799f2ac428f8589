"""The int8 kernels of ``int8.c`` on CPU tensors, through ctypes.

Float inputs are fp32 with unit stride along their rows (a row stride is passed on); int8,
int32 and index tensors are contiguous. Outputs are allocated here. Every wrapper takes an
optional ``lib``: a library built with other flags (tests build the AVX2 and plain C paths
that way with ``SPARSENETS_CFLAGS``), declared by :func:`declare`; by default the one built
for this CPU. Threads follow ``torch.get_num_threads()``, fewer for small products.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
from torch import Tensor

from . import threads_for
from .build import Signature, load_or_warn

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES: dict[str, Signature] = {
    "i8_path": ([], ctypes.c_char_p),
    "i8_lanes": ([], _int),
    "i8_tile_rows": ([], _int),
    "i8_shifted": ([], _int),
    "i8_amx": ([], _int),
    "i8_quantize_rows": ([_i64, _ptr, _i64, _i64, _ptr, _i64, _ptr, _int], None),
    "i8_dequant": ([_i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int], None),
    "i8_bsp_linear": ([_i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64,
                       _int, _int], _int),
}
# Work worth a second thread: a fork-join costs microseconds on an idle machine but up to a
# scheduler time slice on a busy one. int8 multiply-adds run 4-8x faster than the fp32 ones
# cpu.threads_for is tuned for, so each thread gets that much more.
_ELEMENTS_PER_THREAD = 1 << 18  # values quantized or scaled
_MACS_PER_THREAD = 1 << 20


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels built for this CPU, or None (with one warning) when they cannot be built here."""
    return load_or_warn("int8.c", "int8 layers use the slower torch fallback", _SIGNATURES)


def available() -> bool:
    return library() is not None


available._dynamo_marked_constant = True  # type: ignore[attr-defined]  # see cpu.available


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures on a library of ``int8.c`` loaded some other way (another build)."""
    for name, (argtypes, restype) in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = restype
    return lib


def _lib(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    lib = lib if lib is not None else library()
    if lib is None:
        raise RuntimeError("sparsenets: the int8 CPU kernels are unavailable; check available() first")
    return lib


def path(lib: ctypes.CDLL | None = None) -> str:
    """The vector path compiled: ``"avx512-vnni"``, ``"avx-vnni"``, ``"avx2"`` or ``"scalar"``."""
    return _lib(lib).i8_path().decode()


def lanes(lib: ctypes.CDLL | None = None) -> int:
    """Outputs per vector: the packed panels pad each block's rows to a multiple of it."""
    return int(_lib(lib).i8_lanes())


# SPARSENETS_INT8_AMX=0 keeps the kernels off AMX: asking Linux for the tile state makes every
# signal frame bigger, so a library that later sets up a small alternate signal stack would fail.
AMX_ALLOWED = os.environ.get("SPARSENETS_INT8_AMX", "1") != "0"


def amx(lib: ctypes.CDLL | None = None) -> bool:
    """Whether block-sparse products run on AMX tiles (compiled in, allowed, granted by the OS)."""
    return AMX_ALLOWED and bool(_lib(lib).i8_amx())


# What bsp_linear's ``mode`` runs: the fastest path (AMX where granted), the plain C loops, or
# the vector path without AMX.
MODES = {"best": 0, "scalar": 1, "simd": 2}


def tile_rows(lib: ctypes.CDLL | None = None) -> int:
    return int(_lib(lib).i8_tile_rows())


def quantize_rows(x: Tensor, lib: ctypes.CDLL | None = None) -> tuple[Tensor, Tensor]:
    """``(q int8, scale float32)`` of a 2-D fp32 ``x`` with unit column stride, row by row."""
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    if rows:
        _lib(lib).i8_quantize_rows(rows, x.data_ptr(), x.stride(0), cols, q.data_ptr(), cols, scale.data_ptr(),
                                   threads_for(x.numel(), _ELEMENTS_PER_THREAD))
    return q, scale


def dequant(acc: Tensor, sx: Tensor, sw: Tensor, bias: Tensor | None, lib: ctypes.CDLL | None = None) -> Tensor:
    """``acc · sx[:, None] · sw[None, :] + bias`` of a contiguous int32 ``acc (rows, cols)``."""
    rows, cols = acc.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    if rows and cols:
        _lib(lib).i8_dequant(rows, cols, acc.data_ptr(), acc.stride(0), sx.data_ptr(), sw.data_ptr(),
                             None if bias is None else bias.data_ptr(), out.data_ptr(), cols,
                             threads_for(acc.numel(), _ELEMENTS_PER_THREAD))
    return out


def bsp_linear(x: Tensor, in_dim: int, out_dim: int, block: tuple[int, int], row_ptr: Tensor, col_idx: Tensor,
               panels: Tensor, colsum: Tensor, w_scale: Tensor, bias: Tensor | None, mode: str = "best",
               lib: ctypes.CDLL | None = None) -> Tensor:
    """Quantize ``x (rows, in)`` per row and multiply by the packed block-sparse weight: ``(rows, out)`` fp32."""
    rows = x.shape[0]
    out = torch.empty(rows, out_dim, dtype=torch.float32)
    if rows == 0:
        return out
    r, c = block
    work = rows * col_idx.numel() * r * c
    status = _lib(lib).i8_bsp_linear(
        rows, x.data_ptr(), x.stride(0), in_dim, out_dim, r, c, row_ptr.data_ptr(), col_idx.data_ptr(),
        panels.data_ptr(), colsum.data_ptr(), w_scale.data_ptr(), None if bias is None else bias.data_ptr(),
        out.data_ptr(), out_dim, MODES["simd" if mode == "best" and not AMX_ALLOWED else mode],
        threads_for(work, _MACS_PER_THREAD))
    if status != 0:
        raise MemoryError(f"int8 block-sparse kernel could not allocate its buffers for {rows} rows")
    return out
