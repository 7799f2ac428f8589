"""Tensor encodings: each tensor stored in the smallest of ``dense``, ``bitmask``, ``csr`` and ``blocks:RxC``.

- ``dense``: the tensor as it is;
- ``bitmask``: the kept values plus one bit per element (``numpy.packbits`` order);
- ``csr``: the kept values, row pointers and column indices (the narrowest integers that fit);
- ``blocks:RxC``: the values of the kept ``R × C`` blocks plus one bit per block.

A descriptor (JSON) says which, with the tensor's shape and dtype. :func:`decode` checks every
size and index against the descriptor before it builds anything the size of the tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..gemm import block_keep, expand_blocks, n_blocks

_BLOCKS = re.compile(r"blocks:([1-9][0-9]*)x([1-9][0-9]*)")
# the dtypes a descriptor may name (a name is looked up here, never as an arbitrary torch attribute)
DTYPES = {name: dtype for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
                                   "int8", "uint8", "bool", "complex64", "complex128", "float8_e4m3fn",
                                   "float8_e5m2")
          if isinstance(dtype := getattr(torch, name, None), torch.dtype)}


def _index_dtype(limit: int) -> torch.dtype:
    return torch.int16 if limit <= 2**15 - 1 else torch.int32 if limit <= 2**31 - 1 else torch.int64


def pack_bits(mask: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=count).astype(bool))


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _nbytes(parts: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode(tensor: Tensor, mask: Tensor | None = None, block: tuple[int, int] | None = None
           ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The smallest encoding of ``tensor`` keeping the entries of ``mask`` (default: its nonzeros).

    Returns the descriptor (JSON) and the parts to store, keyed by suffix.
    """
    tensor = tensor.detach().cpu().contiguous()
    info = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    options = [("dense", {"": tensor.clone()})]
    if tensor.dim() >= 1 and tensor.is_floating_point() and tensor.numel():
        keep = (tensor != 0) if mask is None else mask.detach().cpu().to(torch.bool).reshape(tensor.shape)
        options += _sparse_options(tensor, keep, mask is not None, block)
    name, parts = min(options, key=lambda option: _nbytes(option[1]))
    info["encoding"] = name
    return info, parts


def _sparse_options(tensor: Tensor, keep: Tensor, exact: bool, block: tuple[int, int] | None
                    ) -> list[tuple[str, dict[str, Tensor]]]:
    flat_keep = keep.reshape(-1)
    values = tensor.reshape(-1)[flat_keep]
    options = [("bitmask", {"values": values, "bits": pack_bits(keep)})]
    if tensor.dim() < 2:
        return options
    rows, cols = _grid(tuple(tensor.shape))
    keep2d = keep.reshape(rows, cols)
    counts = keep2d.sum(dim=1)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(_index_dtype(values.numel()))
    col = keep2d.nonzero()[:, 1].to(_index_dtype(cols))
    options.append(("csr", {"values": values, "crow": crow, "col": col}))
    # whole rows (pruned neurons) and whole columns (unused inputs) are blocks too
    for shape in dict.fromkeys(s for s in (block, (1, cols), (rows, 1)) if s is not None):
        if shape[0] > rows or shape[1] > cols:
            continue
        blocks = block_keep(keep2d, shape)
        inside = expand_blocks(blocks, shape, (rows, cols)).reshape(-1)
        if not exact or torch.equal(inside, flat_keep):  # a given mask must come back exactly
            options.append((f"blocks:{shape[0]}x{shape[1]}",
                            {"values": tensor.reshape(-1)[inside], "bits": pack_bits(blocks)}))
    return options


# ---- reading a descriptor ------------------------------------------------------------------------------


def describe(info: Any) -> tuple[tuple[int, ...], torch.dtype, str]:
    """Shape, dtype and encoding of a descriptor; ValueError names whatever is malformed."""
    if not isinstance(info, dict):
        raise ValueError(f"a tensor descriptor must be an object, got {info!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"shape must be a list of non-negative integers, got {shape!r}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {info.get('dtype')!r}")
    encoding = info.get("encoding")
    if encoding not in ("dense", "bitmask", "csr") and not (isinstance(encoding, str) and _BLOCKS.fullmatch(encoding)):
        raise ValueError(f"unknown encoding {encoding!r}")
    if encoding != "dense" and (not shape or not dtype.is_floating_point):
        raise ValueError(f"encoding {encoding!r} needs a floating-point tensor of at least one dimension")
    if encoding != "dense" and encoding != "bitmask" and len(shape) < 2:
        raise ValueError(f"encoding {encoding!r} needs a tensor of at least two dimensions, got shape {shape}")
    return tuple(shape), dtype, encoding


def nbytes(info: dict[str, Any]) -> int:
    """Bytes the decoded tensor takes (from a descriptor :func:`describe` accepted)."""
    shape, dtype, _ = describe(info)
    return math.prod(shape) * dtype.itemsize


def _part(parts: dict[str, Tensor], name: str, numel: int | None, what: str,
          dtype: torch.dtype | None = None) -> Tensor:
    part = parts.get(name)
    if part is None:
        raise ValueError(f"{what} is missing")
    if part.dim() != 1 or (numel is not None and part.numel() != numel):
        raise ValueError(f"{what} has shape {tuple(part.shape)}, the descriptor implies ({numel},)")
    if dtype is not None and part.dtype != dtype:
        raise ValueError(f"{what} is {part.dtype}, the descriptor says {dtype}")
    return part


def _index(part: Tensor, what: str) -> Tensor:
    if part.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"{what} must be integers, got {part.dtype}")
    return part.long()


# ---- decode ---------------------------------------------------------------------------------------------


def decode(info: dict[str, Any], parts: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The tensor and its mask (None for dense) from :func:`encode`'s output.

    Raises ValueError when the descriptor is malformed or the parts don't have the sizes and
    indices it implies. Callers bound the size the descriptor claims (see :func:`nbytes`) first.
    """
    shape, dtype, encoding = describe(info)
    numel = math.prod(shape)
    if encoding == "dense":
        dense = parts.get("")
        if dense is None or dense.numel() != numel or dense.dtype != dtype:
            have = "nothing" if dense is None else f"{dense.numel()} {dense.dtype} entries"
            raise ValueError(f"dense tensor has {have}, the descriptor implies {numel} {dtype}")
        return dense.reshape(shape), None
    if encoding == "bitmask":
        keep = unpack_bits(_part(parts, "bits", n_blocks(numel, 8), "bitmask", torch.uint8), numel)
    elif encoding == "csr":
        keep = _csr_keep(parts, _grid(shape))
    else:
        keep = _blocks_keep(parts, encoding, _grid(shape))
    values = _part(parts, "values", int(keep.sum()), "kept values", dtype)
    dense = torch.zeros(numel, dtype=dtype)
    dense[keep] = values
    return dense.reshape(shape), keep.reshape(shape)


def _csr_keep(parts: dict[str, Tensor], grid: tuple[int, int]) -> Tensor:
    rows, cols = grid
    values = _part(parts, "values", None, "kept values")
    crow = _index(_part(parts, "crow", rows + 1, "row pointers"), "row pointers")
    col = _index(_part(parts, "col", values.numel(), "column indices"), "column indices")
    if int(crow[0]) != 0 or int(crow[-1]) != values.numel() or bool((crow.diff() < 0).any()) or (
            col.numel() and not (0 <= int(col.min()) and int(col.max()) < cols)):
        raise ValueError("CSR indices out of range")
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep[torch.repeat_interleave(torch.arange(rows), crow.diff()), col] = True
    return keep.reshape(-1)


def _blocks_keep(parts: dict[str, Tensor], encoding: str, grid: tuple[int, int]) -> Tensor:
    rows, cols = grid
    sides = _BLOCKS.fullmatch(encoding)
    assert sides is not None  # describe() accepted the encoding
    r, c = int(sides[1]), int(sides[2])
    if r > max(rows, 1) or c > max(cols, 1):
        raise ValueError(f"{r}x{c} blocks are larger than the {rows}x{cols} matrix")
    block_grid = (n_blocks(rows, r), n_blocks(cols, c))
    count = block_grid[0] * block_grid[1]
    bits = _part(parts, "bits", n_blocks(count, 8), "block bitmap", torch.uint8)
    return expand_blocks(unpack_bits(bits, count).reshape(block_grid), (r, c), (rows, cols)).reshape(-1)


__all__ = ["DTYPES", "decode", "describe", "encode", "nbytes", "pack_bits", "unpack_bits"]
