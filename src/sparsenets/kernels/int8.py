"""int8 inference products on CPU: dense, and block-sparse with our own C kernel.

Both compute ``y = dequant(q(x) · q(W)ᵀ) + bias`` where

- activations are quantized dynamically, per row (per token), symmetrically:
  ``scale = amax / 127``, ``q = round(x · 127 / amax)`` in [-127, 127] (:func:`quantize_rows`);
- weights are int8 with one float scale per output channel (:func:`quantize_weight_int8`, or
  any int8 weight and scales another quantizer produced);
- the product is accumulated exactly in int32, then scaled by ``scale_x[row] · scale_w[out]``.

:func:`int8_linear` (dense) runs the int8 × int8 → int32 product with ``torch._int_mm`` (oneDNN,
VNNI/AMX where the CPU has them); :func:`block_sparse_int8_linear` runs the kernel of
``cpu/int8.c`` on weights packed once by :func:`pack_block_int8` (AVX-512 VNNI, AVX-VNNI, AVX2
or plain C as compiled, and AMX tiles where the CPU and OS allow, unless
``SPARSENETS_INT8_AMX=0``; see :func:`int8_capabilities`). A dense product that ``_int_mm``
can't take runs on that kernel with every block kept. Where neither can run (no C compiler,
another device) the same integers are computed with float products of ≤ 1024-long slices of k,
which are exact (|partial sums| < 2²⁴), so every path gives the same int32 result; only the
final float scaling may round differently.

These are inference ops: nothing here has a gradient. Inputs may have any leading batch
dimensions; outputs are float32 (or the input's floating dtype).
"""

from __future__ import annotations

import ctypes
import math
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .cpu import int8 as c_int8
from .layout import BlockLayout, gather_blocks, scatter_blocks

__all__ = ["PackedBlockInt8", "block_sparse_int8_linear", "int8_capabilities", "int8_linear",
           "outlier_columns", "pack_block_int8", "quantize_rows", "quantize_weight_int8"]

# int32 accumulation is exact while in · 255 · 128 < 2³¹ (the C kernels add 128 to activations).
MAX_IN_FEATURES = 65536
# k per float product in the emulated int product: 127 · 128 · 1024 < 2²⁴, so every partial sum is exact.
_EXACT_K = 1024
_PATHS = ("auto", "c", "simd", "scalar", "torch")


# ---- quantization -----------------------------------------------------------------------------


def _float_input(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got "
                          f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() < 1:
        raise ConfigError(f"{name} must have at least one dimension (features last), got a scalar")


def _quantize_rows_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: the same float32 operations as the C kernel, so the same bytes."""
    x = x.float()
    amax = x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv.unsqueeze(-1)).clamp_(-127, 127).nan_to_num_(0).to(torch.int8)
    return q, amax / 127.0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (per-token) dynamic int8 quantization of ``x (..., k)``.

    Returns ``(q, scale)``: ``q`` int8 of ``x``'s shape, in [-127, 127], and ``scale`` float32
    of shape ``x.shape[:-1]``, with ``x ≈ q · scale[..., None]``. A row of zeros gets scale 0.
    One pass in C on CPU (amax, scale, round half to even, clamp); torch ops elsewhere, with
    identical results. Rows must be finite.
    """
    _float_input(x, "x")
    if not (x.is_cpu and c_int8.available()):
        return _quantize_rows_torch(x)
    x2 = _rows(x)
    q, scale = c_int8.quantize_rows(x2)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 quantization of a weight ``(out, in)``.

    Returns ``(q int8 (out, in), scale float32 (out,))`` with ``weight ≈ q · scale[:, None]``;
    an all-zero output channel gets scale 0.
    """
    _float_input(weight, "weight")
    if weight.dim() != 2:
        raise ConfigError(f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    return _quantize_rows_torch(weight.detach())


# ---- checks and shared pieces ---------------------------------------------------------------


def _rows(x: Tensor) -> Tensor:
    """``x`` as 2-D fp32 rows with unit column stride (a view when it already is one)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.stride(-1) != 1 and x2.shape[-1] > 1:
        x2 = x2.contiguous()
    return x2


def _check_path(path: str) -> None:
    if path not in _PATHS:
        raise ConfigError(f"path must be one of {', '.join(_PATHS)}, got {path!r}")


def _check_scales(w_scale: Tensor, bias: Tensor | None, out_features: int) -> tuple[Tensor, Tensor | None]:
    if not isinstance(w_scale, Tensor) or w_scale.shape != (out_features,):
        shape = tuple(w_scale.shape) if isinstance(w_scale, Tensor) else type(w_scale).__name__
        raise ConfigError(f"w_scale must have shape ({out_features},), one scale per output channel, got {shape}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (out_features,)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ConfigError(f"bias must have shape ({out_features},), got {shape}")
    w_scale = w_scale.detach().to(torch.float32).contiguous()
    return w_scale, None if bias is None else bias.detach().to(torch.float32).contiguous()


def _check_input(x: Tensor, in_features: int) -> None:
    _float_input(x, "x")
    if x.shape[-1] != in_features:
        raise ConfigError(f"x has {x.shape[-1]} features (last dimension of shape {tuple(x.shape)}), "
                          f"the weight takes {in_features}")
    if in_features > MAX_IN_FEATURES:
        raise ConfigError(f"in_features={in_features} could overflow int32 accumulation; at most "
                          f"{MAX_IN_FEATURES} are supported")


def _same_device(x: Tensor, *tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device != x.device:
            raise ConfigError(f"x is on {x.device} but the weight tensors are on {t.device}")


def _output(y: Tensor, x: Tensor, out_features: int) -> Tensor:
    y = y.reshape(*x.shape[:-1], out_features)
    return y if x.dtype in (torch.float32, torch.float64) and y.dtype == torch.float32 else y.to(x.dtype)


def int_matmul_emulated(a: Tensor, b: Tensor) -> Tensor:
    """``a (m, k) · b (n, k)ᵀ`` of int8 matrices as exact int32, from float products over slices
    of k short enough that every partial sum is an exactly representable integer."""
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for k0 in range(0, a.shape[1], _EXACT_K):
        part = a[:, k0:k0 + _EXACT_K].float() @ b[:, k0:k0 + _EXACT_K].float().t()
        acc += part.to(torch.int32)
    return acc


def _reference(x2: Tensor, q_weight: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The int8 product in torch ops, on any device."""
    q, sx = _quantize_rows_torch(x2)
    acc = int_matmul_emulated(q, q_weight)
    y = acc.float() * (sx.unsqueeze(1) * w_scale.to(x2.device).unsqueeze(0))
    return y if bias is None else y + bias.to(x2.device)


# torch 2.13's _int_mm on CPU returns wrong sums for k = 1 (an ambiguous stride of the (1, n)
# operand); such thin products are cheap, so they take the emulated path.
_INT_MM_MIN_K = 8
# (m, k, n) that torch._int_mm refused on this build: not tried again.
_INT_MM_REFUSED: set[tuple[int, int, int]] = set()


def _int_mm(q: Tensor, q_weight: Tensor) -> Tensor | None:
    """``torch._int_mm(q, Wᵀ)``, or None where this torch lacks it or refuses the shape."""
    fn = getattr(torch, "_int_mm", None)
    shape = (q.shape[0], q.shape[1], q_weight.shape[0])
    if fn is None or shape in _INT_MM_REFUSED or q.shape[1] < _INT_MM_MIN_K:
        return None
    try:
        return fn(q, q_weight.t())
    except RuntimeError:  # older builds require m > 16 and multiples of 8
        _INT_MM_REFUSED.add(shape)
        return None


# ---- dense ------------------------------------------------------------------------------------

_DENSE_BLOCK = (32, 32)
# The last dense weight packed for the block kernel (where _int_mm can't run): a weak reference
# to it (a new tensor may reuse a freed one's id and memory), its version, and the packing.
_DENSE_PACKED: dict[str, tuple[weakref.ref, tuple, tuple[Tensor, Tensor, Tensor, Tensor]]] = {}


def _dense_panels(q_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(row_ptr, col_idx, panels, colsum)`` of ``q_weight`` as one block-sparse weight keeping
    every block, packed once per weight (a layer calls with the same tensor every time)."""
    key = (q_weight.data_ptr(), q_weight._version, tuple(q_weight.shape))
    hit = _DENSE_PACKED.get("last")
    if hit is None or hit[0]() is not q_weight or hit[1] != key:
        out_features, in_features = q_weight.shape
        grid = (-(-out_features // _DENSE_BLOCK[0]), -(-in_features // _DENSE_BLOCK[1]))
        layout = BlockLayout.from_keep(torch.ones(grid, dtype=torch.bool), (out_features, in_features), _DENSE_BLOCK)
        packed = pack_block_int8(q_weight, layout)
        hit = (weakref.ref(q_weight), key, (layout.row_ptr, layout.col_idx, packed.panels, packed.colsum))
        _DENSE_PACKED["last"] = hit
    return hit[2]


def int8_linear(x: Tensor, q_weight: Tensor, w_scale: Tensor, bias: Tensor | None = None,
                path: str = "auto", *, outlier_threshold: float | None = None) -> Tensor:
    """``x · Wᵀ + bias`` with ``W = q_weight · w_scale[:, None]`` and ``x`` quantized per row.

    ``x (..., in)`` float; ``q_weight`` int8 ``(out, in)``; ``w_scale`` ``(out,)``; ``bias``
    ``(out,)`` or None. ``path``: ``"auto"`` (``torch._int_mm`` on CPU where it takes the shape,
    else the C block-sparse kernel with every block kept, else the emulated int product),
    ``"c"`` (insist on ``_int_mm``), ``"torch"`` (the float emulation of the same int32 product,
    on any device). Quantizing ``x`` and scaling the result run in C where the kernels could be
    built. No gradient flows through it.

    ``outlier_threshold`` (LLM.int8()'s decomposition): the input columns holding any value
    above it in magnitude in this call (:func:`outlier_columns`) are multiplied in float32 with
    those columns of the dequantized weight, the rest as above with them zeroed; with no such
    column it costs one pass over ``x`` (its max and min). Rows that are not finite stay so, as
    without it.
    """
    _check_path(path)
    if not isinstance(q_weight, Tensor) or q_weight.dtype != torch.int8 or q_weight.dim() != 2:
        raise ConfigError(f"q_weight must be an int8 (out, in) matrix, got "
                          f"{q_weight.dtype if isinstance(q_weight, Tensor) else type(q_weight).__name__} of shape "
                          f"{tuple(q_weight.shape) if isinstance(q_weight, Tensor) else '?'}")
    if outlier_threshold is not None:
        check_outlier_threshold(outlier_threshold)
    out_features, in_features = q_weight.shape
    _check_input(x, in_features)
    w_scale, bias = _check_scales(w_scale, bias, out_features)
    _same_device(x, q_weight, w_scale, bias)
    if path == "c" and not x.is_cpu:
        raise ConfigError(f"path='c' needs a CPU tensor, x is on {x.device}")
    with torch.no_grad():
        x2 = _rows(x.detach())
        cols = None if outlier_threshold is None else _outlier_columns(x2, outlier_threshold)
        if cols is None or not cols.numel():
            y = _int8_product(x2, q_weight, w_scale, bias, path)
        else:
            w_cols = q_weight[:, cols].float() * w_scale.unsqueeze(1)  # dequantized, as bitsandbytes does
            y = _int8_product(x2.index_fill(1, cols, 0.0), q_weight, w_scale, bias, path)
            y.addmm_(x2[:, cols], w_cols.t())
    return _output(y, x, out_features)


def _int8_product(x2: Tensor, q_weight: Tensor, w_scale: Tensor, bias: Tensor | None, path: str) -> Tensor:
    """The dispatch of :func:`int8_linear` on checked 2-D float32 rows: ``(m, out)`` float32."""
    out_features, in_features = q_weight.shape
    acc = None
    if x2.is_cpu and path in ("auto", "c") and x2.shape[0] and in_features:
        compiled = c_int8.available()  # else the same bytes from torch ops, a little slower
        q, sx = c_int8.quantize_rows(x2) if compiled else _quantize_rows_torch(x2)
        acc = _int_mm(q, q_weight.contiguous())
        if acc is None and path == "c":
            raise ConfigError(f"path='c': torch._int_mm can't multiply {tuple(q.shape)} by "
                              f"{tuple(q_weight.shape)}ᵀ on this build")
    if acc is None and x2.is_cpu and path == "auto" and x2.shape[0] and c_int8.available():
        # No usable _int_mm: our kernel with every block kept beats the float emulation.
        return c_int8.bsp_linear(x2, in_features, out_features, _DENSE_BLOCK, *_dense_panels(q_weight), w_scale,
                                 bias)
    if acc is None:
        return _reference(x2, q_weight, w_scale, bias)
    if compiled:
        return c_int8.dequant(acc.contiguous(), sx, w_scale, bias)
    y = acc.float() * (sx.unsqueeze(1) * w_scale.unsqueeze(0))
    return y if bias is None else y + bias


def check_outlier_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold <= 0:
        raise ConfigError(f"outlier_threshold must be a positive finite number, got {threshold!r}")


def _outlier_columns(x2: Tensor, threshold: float) -> Tensor:
    none = torch.zeros(0, dtype=torch.long, device=x2.device)
    if not x2.shape[0] or not x2.shape[1]:
        return none
    lo, hi = torch.aminmax(x2)  # one pass, the common case: nothing above the threshold
    if -threshold <= lo and hi <= threshold:
        return none
    # No |x| copy; two column reductions beat aminmax(dim=0), which is several times slower on CPU.
    return ((x2.amax(0) > threshold) | (x2.amin(0) < -threshold)).nonzero().squeeze(1)


def outlier_columns(x: Tensor, threshold: float) -> Tensor:
    """Indices (int64, ascending) of the columns (last dimension) of ``x (..., in)`` with any entry
    above ``threshold`` in magnitude: those :func:`int8_linear` multiplies in float with
    ``outlier_threshold=threshold``."""
    _float_input(x, "x")
    check_outlier_threshold(threshold)
    with torch.no_grad():
        return _outlier_columns(_rows(x.detach()), threshold)


# ---- block-sparse -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBlockInt8:
    """A block-sparse int8 weight in the layout the C kernel reads, built by :func:`pack_block_int8`.

    ``values`` (nnz, r, c) int8 are the kept blocks as :mod:`.layout` stores them; ``panels`` the
    same bytes as groups of 4 consecutive k per output (``(nnz, ⌈c/4⌉, rp, 4)``, rows padded to
    ``rp``, a multiple of ``lanes``); ``colsum`` ``(row blocks, rp)`` int32 the sum over the kept
    k of each output's weights (what the VNNI path subtracts ×128).
    """

    layout: BlockLayout
    values: Tensor
    panels: Tensor
    colsum: Tensor
    lanes: int

    def dense(self) -> Tensor:
        """The int8 ``(out, in)`` weight, zeros outside the kept blocks."""
        return scatter_blocks(self.values, self.layout)


def pack_block_int8(q_weight: Tensor, layout: BlockLayout, lanes: int | None = None) -> PackedBlockInt8:
    """Pack an int8 block-sparse weight once, for :func:`block_sparse_int8_linear`.

    ``q_weight`` is either the kept blocks ``(nnz, r, c)`` in ``layout``'s order, or the dense
    int8 ``(out, in)`` weight (its blocks outside ``layout`` are dropped). ``lanes`` (default:
    the compiled kernel's) pads each block's outputs to a whole number of vectors.
    """
    if not isinstance(q_weight, Tensor) or q_weight.dtype != torch.int8:
        raise ConfigError(f"q_weight must be an int8 tensor, got "
                          f"{q_weight.dtype if isinstance(q_weight, Tensor) else type(q_weight).__name__}")
    r, c = layout.block
    dense_shape = (layout.out_features, layout.in_features)
    if q_weight.dim() == 2 and tuple(q_weight.shape) == dense_shape:
        values = gather_blocks(q_weight, layout)
    elif tuple(q_weight.shape) == (layout.nnz, r, c):
        values = q_weight.contiguous()
    else:
        raise ConfigError(f"q_weight of shape {tuple(q_weight.shape)} is neither the dense {dense_shape} weight "
                          f"nor the {layout.nnz} kept {r}x{c} blocks of the layout")
    if lanes is None:
        lanes = c_int8.lanes() if c_int8.available() else 8
    rp, cp = -(-r // lanes) * lanes, -(-c // 4) * 4
    padded = values.new_zeros(layout.nnz, rp, cp)
    padded[:, :r, :c] = values
    # (nnz, rp, cp/4, 4) -> (nnz, cp/4, rp, 4): for each group of 4 k, every output's 4 bytes.
    panels = padded.view(layout.nnz, rp, cp // 4, 4).permute(0, 2, 1, 3).contiguous()
    n_rows = layout.grid[0]
    colsum = torch.zeros(n_rows, rp, dtype=torch.int32, device=values.device)
    colsum.index_add_(0, layout.row_idx, padded.sum(dim=2, dtype=torch.int32))
    return PackedBlockInt8(layout, values, panels, colsum, lanes)


def block_sparse_int8_linear(x: Tensor, packed: PackedBlockInt8, w_scale: Tensor, bias: Tensor | None = None,
                             path: str = "auto") -> Tensor:
    """``x · Wᵀ + bias`` for a packed block-sparse int8 ``W`` with per-output scales ``w_scale``.

    ``x (..., in)`` float, quantized per row inside the kernel. ``path``: ``"auto"`` (the C
    kernel on CPU, else torch), ``"c"`` (the C kernel's fastest path: AMX tiles where the CPU
    and OS allow and blocks are at most 64 wide, else the compiled vector path), ``"simd"`` (the
    vector path, never AMX), ``"scalar"`` (the kernel's plain C loops), ``"torch"`` (the
    reference, any device). No gradient flows through it.
    """
    _check_path(path)
    if not isinstance(packed, PackedBlockInt8):
        raise ConfigError(f"packed must come from pack_block_int8, got {type(packed).__name__}")
    layout = packed.layout
    _check_input(x, layout.in_features)
    w_scale, bias = _check_scales(w_scale, bias, layout.out_features)
    _same_device(x, packed.values, w_scale, bias)
    usable = x.is_cpu and c_int8.available() and packed.lanes == c_int8.lanes()
    if path in ("c", "simd", "scalar") and not usable:
        raise ConfigError(f"path={path!r} needs a CPU tensor, the compiled int8 kernels and panels packed for "
                          f"them (x on {x.device}, kernels available: {c_int8.available()}, panels of "
                          f"{packed.lanes} lanes)")
    with torch.no_grad():
        x2 = _rows(x.detach())
        if usable and path != "torch":
            y = c_int8.bsp_linear(x2, layout.in_features, layout.out_features, layout.block, layout.row_ptr,
                                  layout.col_idx, packed.panels, packed.colsum, w_scale, bias,
                                  mode=path if path in ("simd", "scalar") else "best")
        else:
            y = _reference(x2, packed.dense(), w_scale, bias)
    return _output(y, x, layout.out_features)


# ---- capabilities -----------------------------------------------------------------------------

_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def int8_capabilities(lib: ctypes.CDLL | None = None) -> dict[str, Any]:
    """What int8 execution this machine and build have.

    ``cpu``: the machine; ``flags``: each of avx2 / avx512f / avx512bw / avx512_vnni / avx_vnni /
    amx_tile / amx_int8 as True/False (None where /proc/cpuinfo can't tell); ``torch_cpu_capability``:
    what torch's own kernels dispatch to; ``int_mm``: whether this torch has ``torch._int_mm``;
    ``kernel_path``: the block-sparse kernel's compiled path (``"avx512-vnni"``, ``"avx-vnni"``,
    ``"avx2"``, ``"scalar"``) or None when it could not be built, with its ``kernel_lanes`` and
    ``kernel_tile_rows``; ``kernel_amx``: whether it runs blocks on AMX tiles (built with AMX and
    granted by the OS).
    """
    flags = _cpu_flags()
    try:
        capability: str | None = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    built = lib is not None or c_int8.available()
    return {
        "cpu": platform.machine(),
        "flags": {name: (None if flags is None else name in flags) for name in _FLAGS},
        "torch_cpu_capability": capability,
        "int_mm": hasattr(torch, "_int_mm"),
        "kernel_path": c_int8.path(lib) if built else None,
        "kernel_lanes": c_int8.lanes(lib) if built else None,
        "kernel_tile_rows": c_int8.tile_rows(lib) if built else None,
        "kernel_amx": c_int8.amx(lib) if built else False,
    }


def describe() -> str:
    """One line on int8 support, for benchmark reports."""
    caps = int8_capabilities()
    have = [name for name, on in caps["flags"].items() if on] or ["unknown"]
    path = caps["kernel_path"] or "unavailable (torch fallback)"
    return (f"int8: kernel path {path}{' + AMX tiles' if caps['kernel_amx'] else ''}, "
            f"CPU flags {' '.join(have)}, torch capability {caps['torch_cpu_capability']}, "
            f"torch._int_mm {'yes' if caps['int_mm'] else 'no'}")
