"""The block-sparse format every kernel reads.

A weight ``W`` (``out × in``, GEMM form) is cut into ``r × c`` blocks; the kept ones are stored
as ``values[nnz, r, c]`` in row-block order (edge blocks padded with zeros). The index is a
row-block CSR (``row_ptr``, ``col_idx``) plus its transpose (``t_ptr``, ``t_row``, ``t_block``),
which the input gradient walks column-block by column-block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..gemm import block_keep, n_blocks


@dataclass(frozen=True)
class BlockLayout:
    out_features: int
    in_features: int
    block: tuple[int, int]
    row_ptr: Tensor  # (n_row_blocks + 1,) entries of row-block i are row_ptr[i]:row_ptr[i+1]
    col_idx: Tensor  # (nnz,) column-block of each stored block
    row_idx: Tensor  # (nnz,) row-block of each stored block
    t_ptr: Tensor  # (n_col_blocks + 1,) the same blocks listed by column-block
    t_row: Tensor  # (nnz,) row-block of each entry in column order
    t_block: Tensor  # (nnz,) stored-block index of each entry in column order

    @property
    def grid(self) -> tuple[int, int]:
        """(row blocks, column blocks) of the padded weight."""
        r, c = self.block
        return n_blocks(self.out_features, r), n_blocks(self.in_features, c)

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        rows, cols = self.grid
        return self.nnz / max(rows * cols, 1)

    @classmethod
    def from_csr(cls, row_ptr: Tensor, col_idx: Tensor, shape: tuple[int, int],
                 block: tuple[int, int]) -> BlockLayout:
        """Complete a row-block CSR with the derived indices (all int64, on ``col_idx``'s device)."""
        out_features, in_features = shape
        n_rows, n_cols = n_blocks(out_features, block[0]), n_blocks(in_features, block[1])
        row_ptr, col_idx = row_ptr.to(torch.int64).contiguous(), col_idx.to(torch.int64).contiguous()
        if row_ptr.numel() != n_rows + 1 or int(row_ptr[-1]) != col_idx.numel():
            raise ValueError(f"row_ptr of length {row_ptr.numel()} ending at {int(row_ptr[-1])} does not "
                             f"describe {n_rows} row-blocks holding {col_idx.numel()} blocks")
        if col_idx.numel() and not (0 <= int(col_idx.min()) and int(col_idx.max()) < n_cols):
            raise ValueError(f"col_idx out of range [0, {n_cols}) for {in_features} inputs in blocks of {block[1]}")
        row_idx = torch.repeat_interleave(torch.arange(n_rows, device=col_idx.device), row_ptr.diff())
        # Stable sort by column keeps rows ascending within each column-block.
        t_block = torch.sort(col_idx, stable=True).indices
        counts = torch.bincount(col_idx, minlength=n_cols)
        t_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(out_features, in_features, (block[0], block[1]), row_ptr, col_idx, row_idx,
                   t_ptr, row_idx[t_block].contiguous(), t_block.contiguous())

    @classmethod
    def from_mask(cls, mask: Tensor, block: tuple[int, int]) -> BlockLayout:
        """Keep every block of an ``out × in`` boolean mask that has any True."""
        return cls.from_keep(block_keep(mask, block), (mask.shape[0], mask.shape[1]), block)

    @classmethod
    def from_keep(cls, keep: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> BlockLayout:
        """From a boolean ``(row blocks, column blocks)`` map of the kept blocks."""
        expected = (n_blocks(shape[0], block[0]), n_blocks(shape[1], block[1]))
        if tuple(keep.shape) != expected:
            raise ValueError(f"block map of shape {tuple(keep.shape)} does not match a {shape[0]}x{shape[1]} "
                             f"weight in {block[0]}x{block[1]} blocks (expected {expected})")
        rows, cols = keep.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=expected[0])
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls.from_csr(row_ptr, cols, shape, block)

    def to(self, device: torch.device | str) -> BlockLayout:
        moved = {k: getattr(self, k).to(device) for k in ("row_ptr", "col_idx", "row_idx", "t_ptr", "t_row", "t_block")}
        return BlockLayout(self.out_features, self.in_features, self.block, **moved)



def gather_blocks(weight: Tensor, layout: BlockLayout) -> Tensor:
    """``values[nnz, r, c]``: the kept blocks of a dense ``out × in`` weight, edges zero-padded."""
    r, c = layout.block
    n_rows, n_cols = layout.grid
    padded = weight.new_zeros(n_rows * r, n_cols * c)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    tiles = padded.view(n_rows, r, n_cols, c).transpose(1, 2)
    return tiles[layout.row_idx, layout.col_idx].contiguous()


def scatter_blocks(values: Tensor, layout: BlockLayout) -> Tensor:
    """The dense ``out × in`` weight: ``values`` at their blocks, zeros elsewhere (differentiable)."""
    r, c = layout.block
    n_rows, n_cols = layout.grid
    tiles = values.new_zeros(n_rows, n_cols, r, c).index_put((layout.row_idx, layout.col_idx), values)
    dense = tiles.transpose(1, 2).reshape(n_rows * r, n_cols * c)
    return dense[: layout.out_features, : layout.in_features]
