"""In-place masking of CPU fp32 tensors with ``masking.c``, and the torch ops that do it elsewhere.

A bool mask multiplies a float tensor through a type promotion that runs four times slower than
a float product; the C loop reads the mask's bytes directly and writes the tensor in place.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from . import threads_for
from .build import Signature, load_or_warn

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# Elements worth a second thread: a memory-bound pass, so only large tensors split.
ELEMENTS_PER_THREAD = 1 << 18


_SIGNATURES: dict[str, Signature] = {
    "sn_mask_f32": ([_ptr, _ptr, _i64, _int], None),
    "sn_zero_dropped_f32": ([_ptr, _ptr, _i64, _int], _i64),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    return load_or_warn("masking.c", "masks are applied with torch ops", _SIGNATURES)


def _kernels_for(x: Tensor, keep: Tensor) -> ctypes.CDLL | None:
    """The library, if it can take these tensors: CPU fp32, contiguous, a bool mask of the same shape."""
    fits = (x.is_cpu and x.dtype is torch.float32 and x.is_contiguous() and keep.is_contiguous()
            and keep.dtype is torch.bool and keep.device == x.device and x.shape == keep.shape)
    return library() if fits else None


def mask_(x: Tensor, keep: Tensor) -> Tensor:
    """``x *= keep``, in place; returns ``x``."""
    if (lib := _kernels_for(x, keep)) is not None:
        lib.sn_mask_f32(x.data_ptr(), keep.data_ptr(), x.numel(), threads_for(x.numel(), ELEMENTS_PER_THREAD))
        return x
    return x.mul_(keep)


def zero_dropped_(x: Tensor, keep: Tensor) -> Tensor:
    """``x *= keep``, in place, writing only where a dropped entry is nonzero; returns ``x``."""
    if (lib := _kernels_for(x, keep)) is not None:
        written = lib.sn_zero_dropped_f32(x.data_ptr(), keep.data_ptr(), x.numel(),
                                                threads_for(x.numel(), ELEMENTS_PER_THREAD))
        if written:  # a write behind torch's back: tell autograd, as an in-place op would
            torch.autograd.graph.increment_version(x)
        return x
    return x.mul_(keep)
