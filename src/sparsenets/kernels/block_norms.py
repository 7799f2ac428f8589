"""Squared norms of a weight gradient's blocks, ``‖dYᵢᵀ·Xⱼ‖²`` for every ``r × c`` block ``(i, j)``,
from a layer's input ``X`` and output gradient ``dY`` (``rows × in``, ``rows × out``), without
ever holding the dense ``out × in`` gradient. Two ways, the cheaper for the shapes runs:

- *Gram*: ``‖dYᵢᵀXⱼ‖² = ⟨dYᵢdYᵢᵀ, XⱼXⱼᵀ⟩``, one ``rows × rows`` Gram matrix per row block and
  per column block, then one product of the two stacks: ``rows²·(out + in + blocks)``
  multiply-adds instead of ``rows·out·in``, fewer while the batch is smaller than a block's area.
- *Panels*: the gradient a panel of row blocks at a time, each reduced to its blocks' sums of
  squares before the next one is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gemm import block_sums, n_blocks

__all__ = ["block_gradient_norms", "matrix_block_norms"]

GRAM_BYTES = 256 << 20  # the most the two Gram stacks may take
PANEL_BYTES = 32 << 20  # one panel of the gradient


def _padded(t: Tensor, width: int) -> Tensor:
    return F.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


def block_gradient_norms(grad_out: Tensor, x: Tensor, block: tuple[int, int], method: str = "auto") -> Tensor:
    """``(row blocks, column blocks)`` squared Frobenius norms of ``grad_outᵀ · x``'s blocks, float64.

    ``method``: ``"gram"``, ``"panels"``, or ``"auto"`` for the one with fewer multiply-adds
    (Gram only while its matrices fit :data:`GRAM_BYTES`).
    """
    (rows, out_features), in_features = grad_out.shape, x.shape[1]
    if x.shape[0] != rows:
        raise ValueError(f"the input has {x.shape[0]} rows and the output gradient {rows}")
    r, c = block
    n_rows, n_cols = n_blocks(out_features, r), n_blocks(in_features, c)
    dy, xs = _padded(grad_out.float(), n_rows * r), _padded(x.float(), n_cols * c)
    if method == "auto":
        gram_work = rows * rows * (n_rows * r + n_cols * c + n_rows * n_cols)
        gram_fits = (n_rows + n_cols) * rows * rows * 4 <= GRAM_BYTES
        method = "gram" if gram_fits and gram_work < rows * out_features * in_features else "panels"
    if method == "gram":
        return _gram(dy, xs, n_rows, n_cols, r, c)
    if method == "panels":
        return _panels(dy, xs, n_rows, n_cols, r, c)
    raise ValueError(f"unknown method {method!r}; expected 'auto', 'gram' or 'panels'")


def _grams(t: Tensor, n: int, side: int) -> Tensor:
    """``(n, rows·rows)``: ``Tᵢ·Tᵢᵀ`` for each slice ``Tᵢ`` of ``side`` columns, flattened."""
    slices = t.reshape(t.shape[0], n, side).transpose(0, 1)  # (n, rows, side)
    return torch.bmm(slices, slices.transpose(1, 2)).reshape(n, -1)


def _gram(dy: Tensor, x: Tensor, n_rows: int, n_cols: int, r: int, c: int) -> Tensor:
    norms = _grams(dy, n_rows, r) @ _grams(x, n_cols, c).T
    return norms.double().clamp_(min=0)  # rounding can take an exact zero slightly negative


def _panels(dy: Tensor, x: Tensor, n_rows: int, n_cols: int, r: int, c: int) -> Tensor:
    per_panel = max(1, PANEL_BYTES // (4 * r * x.shape[1]))
    norms = []
    for start in range(0, n_rows, per_panel):
        stop = min(n_rows, start + per_panel)
        norms.append(matrix_block_norms(dy[:, start * r: stop * r].T @ x, (r, c)))  # a (k·r, in) panel
    return torch.cat(norms)


def matrix_block_norms(matrix: Tensor, block: tuple[int, int]) -> Tensor:
    """``(row blocks, column blocks)`` squared Frobenius norms of a matrix's blocks, float64."""
    return block_sums(matrix.square(), block, torch.float64)
