"""Block-sparse matrix products: the one place that picks an implementation.

:func:`block_sparse_linear` computes ``x · Wᵀ + bias`` for a weight that keeps only some
``r × c`` blocks (see :mod:`.layout`) and differentiates with respect to the input, the kept
blocks and the bias. Backends:

- ``"cpu"``: compiled C kernels (fp32 on CPU), built on first use.
- ``"triton"``: Triton kernels (CUDA tensors, blocks of 16+ with power-of-two sides).
- ``"torch"``: batched dense products per block in plain torch ops; any device and dtype.

``"auto"`` takes the first that fits the tensors; ``SPARSENETS_KERNELS=torch`` forces the fallback.

Under torch.compile and torch.export the C and Triton kernels run as the custom op
``sparsenets::block_sparse_linear`` (:mod:`.ops`), one opaque node in the graph; eager code calls
them directly (:mod:`.eager`), since the op's dispatch costs more than a small product.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from . import cpu, eager, ops, reference
from .layout import BlockLayout, block_keep, gather_blocks, scatter_blocks

__all__ = ["BACKENDS", "BlockLayout", "block_keep", "block_sparse_linear", "choose_backend",
           "gather_blocks", "scatter_blocks"]

BACKENDS = ("auto", "cpu", "triton", "torch")


@functools.cache
def _find_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _find_triton()


# A constant to torch.compile, as cpu.available (the mark sits on a plain function: Dynamo
# looks through functools.cache wrappers).
_triton_importable._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _cpu_fits(x: Tensor, values: Tensor) -> str | None:
    """Why the C kernels can't take these tensors, or None if they can."""
    if x.device.type != "cpu" or values.device.type != "cpu":
        return f"they need CPU tensors, got {x.device.type}"
    if x.dtype != torch.float32:
        return f"they need float32, got {x.dtype}"
    if not cpu.available():
        return "they could not be compiled on this machine"
    return None


def _triton_fits(x: Tensor, values: Tensor, layout: BlockLayout) -> str | None:
    if not _triton_importable():
        return "triton is not installed"
    if not all(side >= 16 and side & (side - 1) == 0 for side in layout.block):
        return f"block sides must be powers of two >= 16, got {layout.block[0]}x{layout.block[1]}"
    return None


def choose_backend(x: Tensor, values: Tensor, layout: BlockLayout, backend: str = "auto") -> str:
    """The backend :func:`block_sparse_linear` runs these tensors on; raises if a named one can't."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "cpu" and (why := _cpu_fits(x, values)):
        raise ValueError(f"backend 'cpu' can't run these tensors: {why}")
    if backend == "triton" and (why := _triton_fits(x, values, layout)):
        raise ValueError(f"backend 'triton' can't run these tensors: {why}")
    if backend != "auto":
        return backend
    if os.environ.get("SPARSENETS_KERNELS", "").lower() == "torch":
        return "torch"
    if x.device.type == "cpu" and _cpu_fits(x, values) is None:
        return "cpu"
    if x.device.type == "cuda" and _triton_fits(x, values, layout) is None:
        return "triton"
    return "torch"


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch, or a device without autocast
        pass
    return None


def _plain_cpu_inference(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None) -> bool:
    """Whether this call can go straight to the C kernels: eager fp32 inference on CPU with a 2-D
    input whose rows are contiguous, nothing wanting a gradient, no autocast. A batch-1 product
    takes tens of microseconds, so the general checks of :func:`block_sparse_linear` would cost
    as much as the product; these are the same decisions in their cheapest form."""
    f32 = torch.float32
    return (type(x) is Tensor and x.dim() == 2 and x.is_cpu and x.dtype is f32 and x.stride(1) == 1
            and x.shape[1] == layout.in_features and values.is_cpu and values.dtype is f32
            and values.is_contiguous() and values.shape == (layout.nnz, *layout.block)
            and (bias is None or (bias.is_cpu and bias.dtype is f32 and bias.is_contiguous()))
            and not eager.wants_grad(x, values, bias) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and cpu.available()
            and os.environ.get("SPARSENETS_KERNELS", "").lower() != "torch")


def block_sparse_linear(x: Tensor, values: Tensor, layout: BlockLayout, bias: Tensor | None = None,
                        backend: str = "auto") -> Tensor:
    """``x (..., in) -> (..., out)``: the product with the block-sparse weight, plus ``bias``."""
    if backend in ("auto", "cpu") and _plain_cpu_inference(x, values, layout, bias):
        return cpu.linear(x, values, layout, bias)
    if x.shape[-1] != layout.in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, "
                         f"the layer expects {layout.in_features}")
    r, c = layout.block
    if tuple(values.shape) != (layout.nnz, r, c):
        raise ValueError(f"values of shape {tuple(values.shape)} do not match {layout.nnz} blocks of {r}x{c}")
    if (dtype := _autocast_dtype(x.device.type)) is not None:  # behave like F.linear under autocast
        x, values = x.to(dtype), values.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    for name, t in (("values", values), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} are {t.dtype} but the input is {x.dtype}; convert one of them")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, layout.in_features)
    name = choose_backend(x2d, values, layout, backend)
    if name == "torch":
        y = reference.linear(x2d, values, layout, bias)
    elif eager.traced(x2d):
        y = ops.linear(x2d, values, layout, bias, name)  # the custom op: one node in the graph
    else:
        y = eager.linear(x2d, values, layout, bias, name)  # the kernels without dispatcher overhead
    return y.reshape(*lead, layout.out_features)
