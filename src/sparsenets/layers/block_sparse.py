"""Layers that store only the kept ``r × c`` blocks of their weight and compute with them.

:class:`BlockSparseLinear` replaces an ``nn.Linear``; :class:`BlockSparseConv1d` and
:class:`BlockSparseConv2d` replace convolutions, keeping the conv weight in GEMM form
(``out × in·k``): at stride 1 on CPU fp32 the convolution kernels (:mod:`..kernels.conv`) read
the input in place; otherwise the block-sparse product runs on unfolded patches. ``values`` is an ordinary
trainable parameter holding the kept blocks; the block index lives in int64 buffers, so
``state_dict``, ``deepcopy``, pickling, ``.to()`` and any optimizer work unchanged.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as conv_grad

from ..gemm import n_blocks
from ..kernels import BlockLayout, block_keep, block_sparse_linear, choose_backend, gather_blocks, scatter_blocks
from ..kernels import conv as conv_kernels

__all__ = ["BlockSparseConv1d", "BlockSparseConv2d", "BlockSparseLinear", "block_sources", "remap_blocks_"]

_DERIVED = ("row_idx", "t_ptr", "t_row", "t_block")  # rebuilt from row_ptr/col_idx, not saved


def _block(block: int | tuple[int, int]) -> tuple[int, int]:
    r, c = (block, block) if isinstance(block, int) else tuple(block)
    if r < 1 or c < 1:
        raise ValueError(f"block sides must be >= 1, got {r}x{c}")
    return int(r), int(c)


class BlockStructure(nn.Module):
    """Which blocks of an ``out_features × in_features`` weight a layer keeps, in index buffers
    (the float and the int8 block-sparse layers share it)."""

    in_features: int
    out_features: int
    block: tuple[int, int]
    row_ptr: Tensor  # buffers, registered by _set_structure
    col_idx: Tensor

    def _set_structure(self, layout: BlockLayout) -> None:
        self.register_buffer("row_ptr", layout.row_ptr)
        self.register_buffer("col_idx", layout.col_idx)
        for name in _DERIVED:
            self.register_buffer(name, getattr(layout, name), persistent=False)

    @property
    def layout(self) -> BlockLayout:
        # direct: nn.Module's attribute lookup costs microseconds per call
        b = cast("dict[str, Tensor]", self._buffers)
        return BlockLayout(self.out_features, self.in_features, self.block, b["row_ptr"], b["col_idx"],
                           b["row_idx"], b["t_ptr"], b["t_row"], b["t_block"])

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that are kept."""
        return self.layout.density


class _BlockSparseGemm(BlockStructure):
    """A weight of ``out_features × in_features`` (GEMM form) keeping only some blocks."""

    def __init__(self, in_features: int, out_features: int, block: int | tuple[int, int] = (32, 32),
                 keep: Tensor | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, _block(block)
        grid = (n_blocks(out_features, self.block[0]), n_blocks(in_features, self.block[1]))
        keep = torch.ones(grid, dtype=torch.bool) if keep is None else keep
        layout = BlockLayout.from_keep(keep.to(device), (out_features, in_features), self.block)
        self.values = nn.Parameter(torch.empty(layout.nnz, *self.block, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._set_structure(layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (uniform in ±1/√fan_in) on the kept blocks."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            # Round trip through the dense weight: zeroes the padding of edge blocks.
            self.values.copy_(gather_blocks(scatter_blocks(self.values, self.layout), self.layout))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @torch.no_grad()
    def relayout_(self, keep: Tensor) -> Tensor:
        """Keep the blocks of ``keep`` (a boolean block map, as many blocks as now) instead, in place.

        Blocks kept before keep their values; new ones start at zero. ``values`` and every index
        buffer stay the same tensors (optimizers, DDP and compiled graphs hold them), rewritten.
        Returns, for each stored block, the index it had before, or -1 for a new block: the map
        with which to carry other per-block state (the optimizer's) along, see :func:`remap_blocks_`.
        """
        layout = BlockLayout.from_keep(keep.to(self.row_ptr.device), (self.out_features, self.in_features), self.block)
        if layout.nnz != self.layout.nnz:
            raise ValueError(f"a new layout must keep as many blocks as the old one ({self.layout.nnz}), "
                             f"got {layout.nnz}")
        source = block_sources(self.layout, layout)
        remap_blocks_(self.values, source)
        self._rewrite_structure(layout)
        return source

    @torch.no_grad()
    def _rewrite_structure(self, layout: BlockLayout) -> None:
        """Copy a layout of as many blocks into the index buffers, which stay the same tensors."""
        for name in ("row_ptr", "col_idx", *_DERIVED):
            getattr(self, name).copy_(getattr(layout, name))

    def _gemm(self, x: Tensor) -> Tensor:
        return block_sparse_linear(x, self.values, self.layout, self.bias)

    def _dense_gemm_weight(self) -> Tensor:
        return scatter_blocks(self.values, self.layout)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may keep other blocks than this layer: adopt its structure first.
        row_ptr, col_idx = state_dict.get(prefix + "row_ptr"), state_dict.get(prefix + "col_idx")
        if row_ptr is not None and col_idx is not None and not (
                row_ptr.shape == self.row_ptr.shape and col_idx.shape == self.col_idx.shape
                and torch.equal(row_ptr.cpu(), self.row_ptr.cpu()) and torch.equal(col_idx.cpu(), self.col_idx.cpu())):
            device = self.row_ptr.device
            layout = BlockLayout.from_csr(row_ptr.to(device), col_idx.to(device),
                                          (self.out_features, self.in_features), self.block)
            if layout.nnz == self.layout.nnz:  # rewire in place: an optimizer built on this layer keeps working
                self._rewrite_structure(layout)
            else:
                self._set_structure(layout)
                self.values = nn.Parameter(self.values.new_zeros(layout.nnz, *self.block))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, density={self.density:.3f}, bias={self.bias is not None}")


class BlockSparseLinear(_BlockSparseGemm):
    """``y = x · Wᵀ + b`` with ``W`` (``out × in``) keeping only the blocks of ``keep``.

    ``keep`` is a boolean map of ``(⌈out/r⌉, ⌈in/c⌉)`` blocks (default: all). Most code builds
    the layer from a trained, masked weight with :meth:`from_dense`.
    """

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Tensor | None,
                   block: int | tuple[int, int]) -> BlockSparseLinear:
        """Keep the blocks of ``weight`` (``out × in``) where ``mask`` has any True.

        Values are copied as ``weight * mask``, so the layer computes what the masked layer did.
        Shapes that don't divide by the block are padded internally.
        """
        if weight.dim() != 2 or mask.shape != weight.shape:
            raise ValueError(f"weight and mask must both be out x in matrices, got {tuple(weight.shape)} "
                             f"and {tuple(mask.shape)}")
        return _from_gemm(cls(weight.shape[1], weight.shape[0], block, block_keep(mask, _block(block)),
                              bias is not None, weight.device, weight.dtype), weight, mask, bias)

    def dense_weight(self) -> Tensor:
        """The ``out × in`` weight, zeros outside the kept blocks (differentiable)."""
        return self._dense_gemm_weight()

    def forward(self, x: Tensor) -> Tensor:
        return self._gemm(x)


def block_sources(old: BlockLayout, new: BlockLayout) -> Tensor:
    """For each block stored in ``new``, its index in ``old``, or -1 where ``old`` lacks it."""
    columns = old.grid[1]
    position = torch.full((old.grid[0] * columns,), -1, dtype=torch.int64, device=old.col_idx.device)
    position[old.row_idx * columns + old.col_idx] = torch.arange(old.nnz, device=old.col_idx.device)
    return position[new.row_idx * columns + new.col_idx]


@torch.no_grad()
def remap_blocks_(tensor: Tensor, source: Tensor) -> Tensor:
    """``tensor[k] = old tensor[source[k]]``, zeros where ``source`` is -1, in place."""
    moved = tensor[source.clamp(min=0)]
    moved[source < 0] = 0
    return tensor.copy_(moved)


def _from_gemm(layer: _BlockSparseGemm, weight: Tensor, mask: Tensor, bias: Tensor | None):
    gemm, keep = weight.detach().reshape(weight.shape[0], -1), mask.reshape(mask.shape[0], -1)
    with torch.no_grad():
        layer.values.copy_(gather_blocks(gemm * keep.to(gemm.dtype), layer.layout))
        if bias is not None:
            assert layer.bias is not None, "the layer is built with a bias when the source has one"
            layer.bias.copy_(bias.detach())
    return layer


# ---- convolutions ------------------------------------------------------------------------------


def _tuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * n


def _pad_amounts(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """``F.pad`` amounts (last dimension first) for a conv's ``padding`` (ints, 'valid' or 'same')."""
    if padding == "valid":
        return [0, 0] * len(kernel)
    if padding == "same":
        amounts = []
        for k, d in zip(reversed(kernel), reversed(dilation)):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts
    if isinstance(padding, str):
        raise ValueError(f"padding must be ints, 'valid' or 'same', got {padding!r}")
    return [p for p in reversed(_tuple(padding, len(kernel))) for _ in range(2)]


def _patches(x: Tensor, spatial: list[int], kernel, stride, dilation) -> Tensor:
    """Every receptive field of a (padded) NCHW input as a row: ``(N·Ho·Wo, C·kh·kw)``."""
    if torch.is_grad_enabled() and x.requires_grad:
        # F.unfold's backward (a fold) is much faster than that of a strided view.
        cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    # One copy from a strided view: half the memory traffic of F.unfold and a transpose.
    n, c = x.shape[:2]
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((n, *spatial, c, *kernel),
                        (s_n, s_h * stride[0], s_w * stride[1], s_c, s_h * dilation[0], s_w * dilation[1]))
    return view.reshape(-1, c * kernel[0] * kernel[1])


class _BlockSparseConv(_BlockSparseGemm):
    dims: int  # spatial dimensions

    def __init__(self, in_channels: int, out_channels: int, kernel_size, block: int | tuple[int, int] = (32, 32),
                 keep: Tensor | None = None, stride=1, padding=0, dilation=1, padding_mode: str = "zeros",
                 bias: bool = True, device=None, dtype=None) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _tuple(kernel_size, self.dims)
        self.stride, self.dilation = _tuple(stride, self.dims), _tuple(dilation, self.dims)
        if padding == "same" and any(s != 1 for s in self.stride):
            raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
        self.padding, self.padding_mode = padding, padding_mode
        self._pad = _pad_amounts(padding, self.kernel_size, self.dilation)
        super().__init__(in_channels * math.prod(self.kernel_size), out_channels, block, keep, bias, device, dtype)

    @classmethod
    def from_dense(cls, conv: nn.Conv1d | nn.Conv2d, weight: Tensor, mask: Tensor,
                   block: int | tuple[int, int]):
        """Keep the blocks of ``weight`` (conv shape, GEMM form ``out × in·k``) where ``mask`` has any True."""
        if conv.groups != 1:
            raise ValueError(f"grouped convolutions (groups={conv.groups}) have no single GEMM form; "
                             f"keep this layer dense")
        if weight.shape != conv.weight.shape or mask.shape != weight.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must have the "
                             f"conv's weight shape {tuple(conv.weight.shape)}")
        gemm_mask = mask.reshape(mask.shape[0], -1)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, block,
                    block_keep(gemm_mask, _block(block)), conv.stride, conv.padding, conv.dilation,
                    conv.padding_mode, conv.bias is not None, weight.device, weight.dtype)
        return _from_gemm(layer, weight, mask, conv.bias)

    def dense_weight(self) -> Tensor:
        """The weight in conv shape (``out × in × k...``), zeros outside the kept blocks."""
        return self._dense_gemm_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        kernel, stride, dilation = (self._planar(v) for v in (self.kernel_size, self.stride, self.dilation))
        direct = self._direct(x, stride)
        padding = (0, 0, 0, 0)  # zeros the kernels add themselves: top, bottom, left, right
        if any(self._pad) and direct and self.padding_mode == "zeros":
            p = self._pad  # F.pad's order: last dimension first
            padding = (p[2], p[3], p[0], p[1]) if self.dims == 2 else (0, 0, p[0], p[1])
        elif any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        planar = x.unsqueeze(2) if self.dims == 1 else x  # 1-d is 2-d of height 1
        if direct:
            y = conv_kernels.conv2d(planar, self.values, self.layout, self.bias, kernel, dilation, padding)
        else:
            y = self._unfolded(planar, kernel, stride, dilation)
        if self.dims == 1:
            y = y.squeeze(2)
        y = y.contiguous()  # like nn.Conv's output, so code such as y.view(n, -1) keeps working
        return y.squeeze(0) if unbatched else y

    def _direct(self, x: Tensor, stride: tuple[int, int]) -> bool:
        """Whether the convolution kernels take this input (else patches are unfolded)."""
        return (stride == (1, 1) and x.dtype == self.values.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and conv_kernels.available()
                and choose_backend(x, self.values, self.layout) == "cpu")

    def _unfolded(self, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int]) -> Tensor:
        """The block-sparse product on every receptive field: ``(N, out, Ho, Wo)``."""
        spatial = [(size - d * (k - 1) - 1) // s + 1
                   for size, k, d, s in zip(x.shape[2:], kernel, dilation, stride)]
        y = self._gemm(_patches(x, spatial, kernel, stride, dilation))  # (N·Ho·Wo, out)
        return y.reshape(x.shape[0], *spatial, self.out_channels).permute(0, 3, 1, 2)

    def gemm_gradient(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """The dense ``out × in·k`` gradient of the weight, for input ``x`` and output gradient
        ``grad_out`` (what sparse training ranks blocks by)."""
        if x.dim() == self.dims + 1:  # unbatched
            x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
        if any(self._pad):
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        weight_grad = conv_grad.conv1d_weight if self.dims == 1 else conv_grad.conv2d_weight
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        return weight_grad(x, shape, grad_out, stride=self.stride, dilation=self.dilation).reshape(shape[0], -1)

    def _planar(self, values: tuple[int, ...]) -> tuple[int, int]:
        return (1, values[0]) if self.dims == 1 else (values[0], values[1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, block={self.block[0]}x{self.block[1]}, density={self.density:.3f}, "
                f"bias={self.bias is not None}")


class BlockSparseConv1d(_BlockSparseConv):
    """``nn.Conv1d`` (groups=1) with a block-sparse weight in GEMM form ``out × in·k``."""

    dims = 1


class BlockSparseConv2d(_BlockSparseConv):
    """``nn.Conv2d`` (groups=1) with a block-sparse weight in GEMM form ``out × in·kh·kw``."""

    dims = 2
