"""Tensor encodings: each tensor stored in the smallest of ``dense``, ``bitmask``, ``csr`` and ``blocks:RxC``.

- ``dense``: the tensor as it is;
- ``bitmask``: the kept values plus one bit per element (``numpy.packbits`` order);
- ``csr``: the kept values, row pointers and column indices (the narrowest integers that fit);
- ``blocks:RxC``: the values of the kept ``R × C`` blocks plus one bit per block.

With ``pack=True`` (the checkpoint asks for it for quantized layers' codes and masks) bool and
integer tensors may be bit-packed too, so that 4-bit codes take 4 bits, not a byte:

- ``bits``: a bool tensor at one bit per element;
- ``packed:B``: integers as ``value − offset`` (the descriptor's ``offset``, their minimum) at
  ``B`` bits each (:func:`pack_ints`), ``B`` ≤ 16;
- ``bitmask-packed:B``: only the kept entries, packed, plus one bit per element;
- ``masked-packed:B``: only the entries a mask stored elsewhere keeps (passed to :func:`decode`).

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
_PACKED = re.compile(r"(bitmask-|masked-)?packed:([0-9]|1[0-6])")
MAX_PACKED_BITS = 16  # wider ranges stay dense: unpacking works in words of at most 16 bits
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


def pack_ints(values: Tensor, width: int) -> Tensor:
    """Non-negative integers below ``2**width`` at ``width`` bits each: bit ``j`` (lowest first) of
    value ``i`` is bit ``i·width + j`` of the stream, in ``numpy.packbits`` order."""
    word = np.dtype(np.uint8 if width <= 8 else "<u2")
    v = values.reshape(-1).cpu().numpy().astype(word)
    bits = np.unpackbits(v.view(np.uint8).reshape(v.size, word.itemsize), axis=1, bitorder="little")[:, :width]
    return torch.from_numpy(np.packbits(bits.reshape(-1)))


def unpack_ints(packed: Tensor, width: int, count: int) -> Tensor:
    """The ``count`` int64 values :func:`pack_ints` packed (``packed`` holds ``count·width`` bits)."""
    word = np.dtype(np.uint8 if width <= 8 else "<u2")
    bits = np.unpackbits(packed.numpy(), count=count * width).reshape(count, width)
    bits = np.pad(bits, ((0, 0), (0, 8 * word.itemsize - width)))
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(word).reshape(-1).astype(np.int64))


def bit_packed(encoding: str) -> bool:
    """Whether ``encoding`` is one of the bit-packed ones (files holding them are version 4)."""
    return encoding == "bits" or _PACKED.fullmatch(encoding) is not None


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _nbytes(parts: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def encode(tensor: Tensor, mask: Tensor | None = None, block: tuple[int, int] | None = None, *,
           pack: bool = False, mask_stored: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The smallest encoding of ``tensor`` keeping the entries of ``mask`` (default: its nonzeros).

    ``pack``: bool and integer tensors may be bit-packed (off by default, so files that never
    asked for it stay as they were). ``mask_stored``: the caller stores ``mask`` itself and passes
    it to :func:`decode`, so a masked integer tensor needs no bits of its own (``masked-packed``).
    Returns the descriptor (JSON) and the parts to store, keyed by suffix.
    """
    tensor = tensor.detach().cpu().contiguous()
    info: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    options: list[tuple[dict[str, Any], dict[str, Tensor]]] = [({"encoding": "dense"}, {"": tensor.clone()})]
    given = None if mask is None else mask.detach().cpu().to(torch.bool).reshape(tensor.shape)
    if tensor.dim() >= 1 and tensor.is_floating_point() and tensor.numel():
        keep = (tensor != 0) if given is None else given
        sparse = _sparse_options(tensor, keep, mask is not None, block)
        options += [({"encoding": name}, parts) for name, parts in sparse]
    elif pack and tensor.dtype == torch.bool and tensor.numel():
        options.append(({"encoding": "bits"}, {"bits": pack_bits(tensor)}))
    elif pack and tensor.dtype in _INTEGERS and tensor.numel():
        options += _packed_options(tensor, given, mask_stored)
    fields, parts = min(options, key=lambda option: _nbytes(option[1]))
    return info | fields, parts


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _packed_options(tensor: Tensor, mask: Tensor | None, mask_stored: bool
                    ) -> list[tuple[dict[str, Any], dict[str, Tensor]]]:
    """``packed:B`` of all entries, and of the kept ones (under ``mask``, or the nonzeros)."""
    flat = tensor.reshape(-1)
    keep = (flat != 0) if mask is None else mask.reshape(-1)
    choices: list[tuple[str, Tensor, dict[str, Tensor]]] = [("", flat, {})]
    if mask is not None and mask_stored:
        choices.append(("masked-", flat[keep], {}))
    else:
        choices.append(("bitmask-", flat[keep], {"bits": pack_bits(keep)}))
    options = []
    for kind, values, extra in choices:
        offset = int(values.min()) if values.numel() else 0
        width = ((int(values.max()) - offset) if values.numel() else 0).bit_length()
        if width <= MAX_PACKED_BITS:
            packed = pack_ints(values.long() - offset, width)
            options.append(({"encoding": f"{kind}packed:{width}", "offset": offset}, {"packed": packed, **extra}))
    return options


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
    if not isinstance(encoding, str) or not (encoding in ("dense", "bitmask", "csr", "bits")
                                             or _PACKED.fullmatch(encoding) or _BLOCKS.fullmatch(encoding)):
        raise ValueError(f"unknown encoding {encoding!r}")
    packed = _PACKED.fullmatch(encoding)
    if encoding == "bits" and dtype != torch.bool:
        raise ValueError(f"encoding 'bits' needs a bool tensor, got {dtype}")
    if packed is not None:
        _check_offset(info.get("offset"), dtype, encoding)
    elif encoding not in ("dense", "bits") and (not shape or not dtype.is_floating_point):
        raise ValueError(f"encoding {encoding!r} needs a floating-point tensor of at least one dimension")
    if (encoding == "csr" or encoding.startswith("blocks:")) and len(shape) < 2:
        raise ValueError(f"encoding {encoding!r} needs a tensor of at least two dimensions, got shape {shape}")
    return tuple(shape), dtype, encoding


def _check_offset(offset: Any, dtype: torch.dtype, encoding: str) -> None:
    if dtype not in _INTEGERS:
        raise ValueError(f"encoding {encoding!r} needs an integer tensor, got {dtype}")
    bounds = torch.iinfo(dtype)
    if type(offset) is not int or not bounds.min <= offset <= bounds.max:
        raise ValueError(f"encoding {encoding!r} needs an integer offset within {dtype}'s range, got {offset!r}")


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


def decode(info: dict[str, Any], parts: dict[str, Tensor], mask: Tensor | None = None
           ) -> tuple[Tensor, Tensor | None]:
    """The tensor and its mask (None for dense) from :func:`encode`'s output.

    ``mask``: for ``masked-packed`` only, the mask stored elsewhere (bool, the tensor's shape).
    Raises ValueError when the descriptor is malformed or the parts don't have the sizes and
    indices it implies. Callers bound the size the descriptor claims (see :func:`nbytes`) first.
    """
    shape, dtype, encoding = describe(info)
    numel = math.prod(shape)
    if encoding == "bits":
        return unpack_bits(_part(parts, "bits", n_blocks(numel, 8), "bits", torch.uint8), numel).reshape(shape), None
    packed = _PACKED.fullmatch(encoding)
    if packed is not None:
        return _decode_packed(info, parts, packed[1], int(packed[2]), mask)
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


def _decode_packed(info: dict[str, Any], parts: dict[str, Tensor], kind: str | None, width: int,
                   mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    shape, dtype, encoding = describe(info)
    numel = math.prod(shape)
    if kind == "masked-":
        if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            have = "none" if mask is None else f"{mask.dtype} {tuple(mask.shape)}"
            raise ValueError(f"encoding {encoding!r} needs the bool mask of shape {shape}, got {have}")
        keep: Tensor | None = mask.reshape(-1).cpu()
    elif kind == "bitmask-":
        keep = unpack_bits(_part(parts, "bits", n_blocks(numel, 8), "bitmask", torch.uint8), numel)
    else:
        keep = None
    count = numel if keep is None else int(keep.sum())
    values = unpack_ints(_part(parts, "packed", n_blocks(count * width, 8), "packed values", torch.uint8),
                         width, count)
    if values.numel() and info["offset"] + int(values.max()) > torch.iinfo(dtype).max:  # checked before adding
        raise ValueError(f"packed values beyond {dtype}'s range")
    values += info["offset"]
    if keep is None:
        return values.to(dtype).reshape(shape), None
    dense = torch.zeros(numel, dtype=dtype)
    dense[keep] = values.to(dtype)
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


__all__ = ["DTYPES", "bit_packed", "decode", "describe", "encode", "nbytes", "pack_bits", "pack_ints", "unpack_bits",
           "unpack_ints"]
