"""int8 linear layers for CPU inference: dense (:class:`Int8Linear`) and block-sparse
(:class:`BlockSparseInt8Linear`).

Both hold an int8 weight with one float32 scale per output channel and a float32 bias, all as
buffers (``state_dict``, ``deepcopy``, pickling and ``.to()`` work unchanged), and quantize
activations dynamically, per row, at every call (see :mod:`sparsenets.kernels.int8`).
:class:`Int8Linear` takes an optional ``outlier_threshold`` (a plain attribute, kept by
``deepcopy`` and pickling but not in ``state_dict``): LLM.int8()'s decomposition, the input
columns holding a value above it in magnitude multiplied in float32 at each call.

They are inference-only: no gradient flows through the int8 product. In training mode an
input that requires grad (with grad enabled) is an error, since training through them would
silently not update anything; in eval mode the product runs under ``torch.no_grad()`` and the
output does not require grad.

They do no weight quantization of their own beyond the plain per-channel rounding of
``from_float``: a quantizer that produced int8 weights and scales (say RTN or GPTQ) hands them
over with ``from_quantized``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gemm import block_keep, n_blocks
from ..kernels import BlockLayout, gather_blocks, scatter_blocks
from ..kernels.int8 import (
    PackedBlockInt8,
    block_sparse_int8_linear,
    check_outlier_threshold,
    int8_linear,
    pack_block_int8,
    quantize_weight_int8,
)
from .block_sparse import BlockStructure

__all__ = ["BlockSparseInt8Linear", "Int8Linear"]



def _inference_only(module: nn.Module, x: Tensor) -> None:
    if module.training and torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{type(module).__name__} is inference-only (no gradient flows through its int8 "
                           f"product); call .eval() or run it under torch.no_grad()")


def _check_quantized(q_weight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
    if not isinstance(q_weight, Tensor) or q_weight.dtype != torch.int8 or q_weight.dim() != 2:
        raise ConfigError(f"q_weight must be an int8 (out, in) matrix, got "
                          f"{getattr(q_weight, 'dtype', type(q_weight).__name__)} of shape "
                          f"{tuple(getattr(q_weight, 'shape', ()))}")
    out = q_weight.shape[0]
    if not isinstance(scale, Tensor) or tuple(scale.shape) != (out,) or not scale.is_floating_point():
        raise ConfigError(f"scale must be a float ({out},) tensor, one per output channel, got "
                          f"{tuple(getattr(scale, 'shape', ()))}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ConfigError(f"bias must have shape ({out},), got {tuple(bias.shape)}")


def _bias_buffer(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach().to(torch.float32).clone()


class Int8Linear(nn.Module):
    """``y = x · (q_weight · w_scale[:, None])ᵀ + bias`` with ``x`` quantized to int8 per row.

    Buffers: ``q_weight`` int8 ``(out, in)``, ``w_scale`` float32 ``(out,)``, ``bias`` float32
    ``(out,)`` or None. Build it with :meth:`from_float` or :meth:`from_quantized`.
    ``outlier_threshold`` (None: off) sends the input columns with any ``|x|`` above it to a
    float32 product with the dequantized weight (``int8_linear(..., outlier_threshold=)``).
    """

    q_weight: Tensor
    w_scale: Tensor
    bias: Tensor | None
    outlier_threshold: float | None = None  # the default for layers pickled before it existed

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 outlier_threshold: float | None = None) -> None:
        super().__init__()
        if outlier_threshold is not None:
            check_outlier_threshold(outlier_threshold)
        self.in_features, self.out_features = in_features, out_features
        self.outlier_threshold = outlier_threshold
        self.register_buffer("q_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_quantized(cls, q_weight: Tensor, scale: Tensor, bias: Tensor | None = None,
                       outlier_threshold: float | None = None) -> Int8Linear:
        """From an int8 ``(out, in)`` weight and its per-output-channel ``scale (out,)``."""
        _check_quantized(q_weight, scale, bias)
        layer = cls(q_weight.shape[1], q_weight.shape[0], bias is not None, q_weight.device, outlier_threshold)
        layer.q_weight.copy_(q_weight.detach())
        layer.w_scale.copy_(scale.detach())
        layer.bias = _bias_buffer(bias)
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, outlier_threshold: float | None = None) -> Int8Linear:
        """Round ``linear``'s weight to int8 with a symmetric scale per output channel."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"from_float takes an nn.Linear, got {type(linear).__name__}")
        q, scale = quantize_weight_int8(linear.weight.detach())
        return cls.from_quantized(q, scale, linear.bias, outlier_threshold)

    def dense_weight(self) -> Tensor:
        """The dequantized float32 ``(out, in)`` weight."""
        return self.q_weight.float() * self.w_scale.unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self, x)
        return int8_linear(x, self.q_weight, self.w_scale, self.bias, outlier_threshold=self.outlier_threshold)

    def extra_repr(self) -> str:
        outliers = "" if self.outlier_threshold is None else f", outlier_threshold={self.outlier_threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{outliers}")


class BlockSparseInt8Linear(BlockStructure):
    """Block-sparse ``y = x · Wᵀ + bias`` with int8 ``W`` keeping only some ``r × c`` blocks.

    Buffers: ``row_ptr``/``col_idx`` (the row-block CSR of :class:`~sparsenets.kernels.BlockLayout`),
    ``q_values`` int8 ``(nnz, r, c)`` (the kept blocks), ``w_scale`` float32 ``(out,)`` and ``bias``.
    The C kernel's packed copy of the blocks is made on first use and kept until ``q_values``
    changes; it is never saved (its layout depends on the CPU). Build it with :meth:`from_float`
    (a :class:`~sparsenets.layers.BlockSparseLinear`), :meth:`from_dense` (weight + mask) or
    :meth:`from_quantized`.
    """

    row_ptr: Tensor
    col_idx: Tensor
    q_values: Tensor
    w_scale: Tensor
    bias: Tensor | None

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (32, 32),
                 keep: Tensor | None = None, bias: bool = True, device=None) -> None:
        super().__init__()
        r, c = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
        if r < 1 or c < 1:
            raise ConfigError(f"block sides must be >= 1, got {r}x{c}")
        self.in_features, self.out_features, self.block = in_features, out_features, (r, c)
        grid = (n_blocks(out_features, r), n_blocks(in_features, c))
        keep = torch.ones(grid, dtype=torch.bool) if keep is None else keep
        layout = BlockLayout.from_keep(keep.to(device), (out_features, in_features), self.block)
        self._set_structure(layout)
        self.register_buffer("q_values", torch.zeros(layout.nnz, r, c, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed_cache: tuple[tuple, PackedBlockInt8] | None = None

    @classmethod
    def from_quantized(cls, q_weight: Tensor, scale: Tensor, block: int | tuple[int, int],
                       bias: Tensor | None = None, mask: Tensor | None = None) -> BlockSparseInt8Linear:
        """From a dense int8 ``(out, in)`` weight and its per-output-channel ``scale``, keeping the
        blocks where ``mask`` (default: ``q_weight != 0``) has any True."""
        _check_quantized(q_weight, scale, bias)
        r, c = (block, block) if isinstance(block, int) else block
        if r < 1 or c < 1:
            raise ConfigError(f"block sides must be >= 1, got {r}x{c}")
        mask = q_weight != 0 if mask is None else mask
        if tuple(mask.shape) != tuple(q_weight.shape):
            raise ConfigError(f"mask of shape {tuple(mask.shape)} does not match q_weight {tuple(q_weight.shape)}")
        out_features, in_features = q_weight.shape
        layer = cls(in_features, out_features, (r, c), block_keep(mask, (r, c)), bias is not None, q_weight.device)
        layer.q_values.copy_(gather_blocks(q_weight.detach() * mask.to(torch.int8), layer.layout))
        layer.w_scale.copy_(scale.detach())
        layer.bias = _bias_buffer(bias)
        return layer

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, block: int | tuple[int, int],
                   bias: Tensor | None = None) -> BlockSparseInt8Linear:
        """Keep the blocks of the float ``weight (out, in)`` where ``mask`` has any True; the masked
        weight is rounded to int8 with a symmetric scale per output channel."""
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(f"weight and mask must both be out x in matrices, got {tuple(weight.shape)} "
                              f"and {tuple(mask.shape)}")
        q, scale = quantize_weight_int8(weight.detach() * mask.to(weight.dtype))
        return cls.from_quantized(q, scale, block, bias, mask)

    @classmethod
    def from_float(cls, layer: nn.Module) -> BlockSparseInt8Linear:
        """From a :class:`~sparsenets.layers.BlockSparseLinear`: the same blocks, rounded to int8."""
        from .block_sparse import BlockSparseLinear

        if not isinstance(layer, BlockSparseLinear):
            raise ConfigError(f"from_float takes a BlockSparseLinear, got {type(layer).__name__}")
        q, scale = quantize_weight_int8(layer.dense_weight().detach())
        out = cls(layer.in_features, layer.out_features, layer.block, None, layer.bias is not None,
                  layer.values.device)
        # Own copies of the index: the float layer may rewrite its own in place (sparse training).
        out._set_structure(BlockLayout.from_csr(layer.row_ptr.clone(), layer.col_idx.clone(),
                                                (layer.out_features, layer.in_features), layer.block))
        out.q_values = gather_blocks(q, layer.layout)
        out.w_scale.copy_(scale)
        out.bias = _bias_buffer(layer.bias)
        return out

    def dense_weight(self) -> Tensor:
        """The dequantized float32 ``(out, in)`` weight, zeros outside the kept blocks."""
        return scatter_blocks(self.q_values.float(), self.layout) * self.w_scale.unsqueeze(1)

    def packed(self) -> PackedBlockInt8:
        """The kernel's packed blocks, made once and again only after ``q_values`` or the index change."""
        q, ptr, idx = self.q_values, self.row_ptr, self.col_idx
        key = (q.data_ptr(), q._version, q.device, ptr.data_ptr(), ptr._version, idx.data_ptr(), idx._version)
        if self._packed_cache is None or self._packed_cache[0] != key:
            self._packed_cache = (key, pack_block_int8(q, self.layout))
        return self._packed_cache[1]

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self, x)
        return block_sparse_int8_linear(x, self.packed(), self.w_scale, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may keep other blocks than this layer: adopt its structure first.
        row_ptr, col_idx = state_dict.get(prefix + "row_ptr"), state_dict.get(prefix + "col_idx")
        if row_ptr is not None and col_idx is not None and (
                row_ptr.shape != self.row_ptr.shape or col_idx.shape != self.col_idx.shape
                or not torch.equal(row_ptr.cpu(), self.row_ptr.cpu()) or not torch.equal(col_idx.cpu(),
                                                                                          self.col_idx.cpu())):
            device = self.row_ptr.device
            layout = BlockLayout.from_csr(row_ptr.to(device), col_idx.to(device),
                                          (self.out_features, self.in_features), self.block)
            self._set_structure(layout)
            self.q_values = self.q_values.new_zeros(layout.nnz, *self.block)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_packed_cache"] = None  # machine-dependent, and rebuilt on first use
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, density={self.density:.3f}, bias={self.bias is not None}")
