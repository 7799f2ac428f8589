"""Low-rank factors of a dense weight: truncated SVD, Fisher-weighted SVD, and :class:`LowRankLinear`.

A rank-``r`` factorisation ``W ≈ left @ right`` of an ``m × n`` weight stores and computes
``r·(m + n)`` numbers instead of ``m·n``. :func:`truncated_svd` gives the best such factors in
Frobenius norm (Eckart–Young), or, with ``row_weights``, the best in a row-weighted norm: with the
empirical Fisher of each output row as weights this is FWSVD (Hsu et al. 2022, "Language model
compression with weighted low-rank factorization"), which keeps the rows the loss depends on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["LowRankLinear", "spectrum", "truncated_svd"]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _compute_dtype(weight: Tensor) -> torch.dtype:
    # SVD in half precision is inaccurate (and has no kernels): work in float32 at least
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def row_scale(row_weights: Tensor, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``√w`` per row, clamped below at ``√eps · max √w`` (eps of ``dtype``).

    The factors are divided by this scale afterwards, so a zero (or tiny) weight would blow up the
    row it scales; the clamp bounds that amplification at ``1/√eps`` (3e3 in float32), where the
    rounding error of the SVD stays far below the row's own size. Rows that light cost nothing in
    the weighted error anyway. All-zero weights carry no preference: they act as uniform weights.
    """
    if row_weights.shape != (rows,):
        raise ConfigError(f"row_weights must have one value per output row, shape ({rows},), "
                          f"got {tuple(row_weights.shape)}")
    w = row_weights.detach().to(device=device, dtype=dtype)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ConfigError(f"row_weights must be finite and >= 0, got min {w.min().item()}, max {w.max().item()}")
    scale = w.sqrt()
    peak = scale.max()
    if peak == 0:
        return torch.ones_like(scale)
    return scale.clamp(min=peak.item() * torch.finfo(dtype).eps ** 0.5)


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ConfigError(f"weight must be an (out, in) matrix, got {shape}")


def truncated_svd(weight: Tensor, rank: int, row_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Factors ``(left (m, r), right (r, n))`` whose product best approximates the ``(m, n)`` ``weight``.

    Without ``row_weights``: the rank-``r`` truncated SVD ``U_r S_r V_rᵀ``, the best rank-``r``
    matrix in Frobenius norm. ``√S_r`` goes into each factor, so both have the same scale (column
    norms of ``left`` equal row norms of ``right``), which suits training them afterwards.

    With ``row_weights`` (``(m,)``, >= 0; FWSVD): the factors minimise ``Σ_i w_i ‖W_i − (left @
    right)_i‖²``: the truncated SVD of ``diag(√w) W``, with ``left`` divided by ``√w`` again. ``√w``
    is clamped below at ``√eps · max √w`` (eps of the compute dtype) so that rows of zero weight
    stay finite; all-zero weights give the plain SVD.

    ``r = min(rank, m, n)``: a larger ``rank`` is allowed and gives the exact factorisation. The SVD
    runs in float32 (float64 for a float64 weight); the factors come back in the weight's dtype.
    """
    _check_weight(weight)
    rank = _positive_int(rank, "rank")
    dtype = _compute_dtype(weight)
    w = weight.detach().to(dtype)
    scale = None if row_weights is None else row_scale(row_weights, w.shape[0], dtype, w.device)
    u, s, vh = torch.linalg.svd(w if scale is None else scale[:, None] * w, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    left, right = u[:, :r] * root, root[:, None] * vh[:r]
    if scale is not None:
        left = left / scale[:, None]
    return left.to(weight.dtype).contiguous(), right.to(weight.dtype).contiguous()


def spectrum(weight: Tensor, row_weights: Tensor | None = None) -> Tensor:
    """The per-rank gains ``σ_k²`` of ``weight`` (of ``diag(√w) W`` with ``row_weights``), decreasing.

    Keeping rank ``r`` of :func:`truncated_svd` leaves a (weighted) squared error of ``Σ_{k>r} σ_k²``,
    so these are what :func:`sparsenets.formats.ranks.allocate_ranks` trades off across layers.
    Float32 at least, like :func:`truncated_svd`.
    """
    _check_weight(weight)
    dtype = _compute_dtype(weight)
    w = weight.detach().to(dtype)
    if row_weights is not None:
        w = row_scale(row_weights, w.shape[0], dtype, w.device)[:, None] * w
    return torch.linalg.svdvals(w).square()


class LowRankLinear(nn.Module):
    """``y = x · (left @ right)ᵀ + b``, computed as two GEMMs: ``x → x·rightᵀ → ·leftᵀ + b``.

    ``right`` is ``(rank, in_features)``, ``left`` is ``(out_features, rank)``; parameters and FLOPs
    per token are ``rank · (in_features + out_features)`` against ``in · out`` for ``nn.Linear``.
    Build one from a trained weight with :meth:`from_dense`; a fresh one is initialised so that its
    output has the variance of a freshly initialised ``nn.Linear`` (see :meth:`reset_parameters`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.rank = _positive_int(rank, "rank")
        options = {"device": device, "dtype": dtype}
        self.right = nn.Parameter(torch.empty(rank, in_features, **options))
        self.left = nn.Parameter(torch.empty(out_features, rank, **options))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, **options))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform factors giving ``nn.Linear``'s output variance at the same ``in_features``.

        ``nn.Linear`` draws ``W ~ U(±1/√n)``: ``Var W = 1/(3n)``, so a unit-variance input gives
        ``Var y = n · Var W = 1/3``. Through the factors, ``Var y = r·Var(left) · n·Var(right)``
        (independent, zero-mean entries). Splitting the 1/3 evenly, ``n·Var(right) = r·Var(left) =
        1/√3``, puts the hidden ``x·rightᵀ`` and the output at comparable scales, as the ``√σ`` split
        of :func:`truncated_svd` does; a uniform ``U(±a)`` has variance ``a²/3``, so ``a = 3^¼/√n`` and
        ``3^¼/√r``. The bias is ``nn.Linear``'s, ``U(±1/√n)``.
        """
        root = 3 ** 0.25
        with torch.no_grad():
            self.right.uniform_(-root / math.sqrt(self.in_features), root / math.sqrt(self.in_features))
            self.left.uniform_(-root / math.sqrt(self.rank), root / math.sqrt(self.rank))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.right), self.left, self.bias)

    def dense_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight ``left @ right`` (differentiable)."""
        return self.left @ self.right

    def format_name(self) -> str:
        return f"low-rank:{self.rank}"

    def init_args(self) -> dict[str, Any]:
        """The constructor's arguments: ``LowRankLinear(**layer.init_args())`` has this layer's shapes."""
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.bias is not None}

    def num_parameters(self) -> int:
        """Numbers in the factors (the bias, which a dense layer has too, not counted)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, rank: int | None = None,
                   row_weights: Tensor | None = None) -> LowRankLinear:
        """The layer of the :func:`truncated_svd` factors of ``weight`` (``out × in``, as ``nn.Linear``
        stores it; transpose a Hugging Face ``Conv1D`` weight first), with ``bias`` copied.

        ``rank`` is required; the layer gets ``min(rank, out, in)`` (exact at full rank). With
        ``row_weights`` (per output row, e.g. :func:`sparsenets.formats.fisher.fisher_rows`): FWSVD.
        The layer has the weight's device and dtype.
        """
        if rank is None:
            raise ConfigError("LowRankLinear.from_dense needs a rank")
        _check_weight(weight)
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ConfigError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        left, right = truncated_svd(weight, rank, row_weights)
        layer = cls(weight.shape[1], weight.shape[0], right.shape[0], bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            if bias is not None:
                assert layer.bias is not None, "the layer is built with a bias when one is given"
                layer.bias.copy_(bias.detach())
        return layer
