"""Monarch matrices (Dao et al. 2022): two block-diagonal factors with a fixed permutation between.

A layer from ``n`` inputs to ``m`` outputs with ``nblocks`` ``b`` and ``block_rank`` ``q``:
the input, zero-padded to ``b·p`` (``p = ⌈n/b⌉``), goes through ``blocks1`` (``b × q × p``, block
``i`` maps input chunk ``i`` to ``q`` values); the ``b·q`` intermediate values, read as a
``q × b`` matrix, are transposed, so stage-2 block ``l`` takes values ``l, l+b, l+2b, ...``;
``blocks2`` (``b × s × q``, ``s = ⌈m/b⌉``) maps them to output chunk ``l``, and the output is
truncated to ``m``. Parameters (and FLOPs / 2 per token) are ``b·q·(p + s) ≈ q·(n + m)``.

Every (stage-2 block ``l``, stage-1 block ``i``) pair owns one ``s × p`` sub-block of the
weight and reaches it through its own share of the intermediate values, so the closed-form
projection of a dense weight (:func:`project_monarch`) is one truncated SVD per sub-block.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .low_rank import row_scale

__all__ = ["MonarchLinear", "monarch_multiply", "monarch_shapes", "monarch_to_dense", "project_monarch"]


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{key}={value!r}: must be an integer >= 1")
    return int(value)


def monarch_shapes(in_features: int, out_features: int, nblocks: int,
                   block_rank: int | None = None) -> tuple[int, int, int]:
    """``(p, q, s)``: input block size ``⌈n/b⌉``, block rank (default ``min(p, s)``), output block size ``⌈m/b⌉``."""
    n, m = _positive_int("in_features", in_features), _positive_int("out_features", out_features)
    b = _positive_int("nblocks", nblocks)
    if b > min(n, m):
        raise ConfigError(f"nblocks={b} exceeds min(in_features, out_features) = {min(n, m)}")
    p, s = -(-n // b), -(-m // b)
    return p, min(p, s) if block_rank is None else _positive_int("block_rank", block_rank), s


def _check_blocks(blocks1: Tensor, blocks2: Tensor) -> tuple[int, int, int, int]:
    """``(b, p, q, s)`` of a pair of factors, or a ConfigError naming the mismatch."""
    if blocks1.dim() != 3 or blocks2.dim() != 3 or blocks2.shape[0] != blocks1.shape[0] \
            or blocks2.shape[2] != blocks1.shape[1]:
        raise ConfigError(f"blocks1 {tuple(blocks1.shape)} and blocks2 {tuple(blocks2.shape)} must be "
                          f"(b, q, p) and (b, s, q)")
    b, q, p = blocks1.shape
    return b, p, q, blocks2.shape[1]


def _stage1(x2: Tensor, blocks1: Tensor) -> Tensor:
    """The intermediate values as a ``(b·q, N)`` matrix in ``t`` order (``(b, q, N)``)."""
    b, _, p = blocks1.shape
    # On the transposed input, stage 1 writes the intermediate with t as rows: the permutation is a view.
    return torch.bmm(blocks1, x2.t().reshape(b, p, x2.shape[0]))


def _stage2_input(h: Tensor, b: int) -> Tensor:
    """Stage 2's ``(b, N, q)`` input, a view of ``h``: block ``l`` reads ``t = l, l+b, ...``."""
    return h.view(h.shape[1], b, h.shape[2]).permute(1, 2, 0)  # (b, q, N) read as (q, b, N)


def _structured_plain(x2: Tensor, blocks1: Tensor, blocks2: Tensor) -> Tensor:
    """``(N, b·p) -> (N, b·s)`` with differentiable ops only (for compile, export, autocast)."""
    b, s = blocks2.shape[:2]
    y = torch.bmm(_stage2_input(_stage1(x2, blocks1), b), blocks2.transpose(1, 2))  # (b, N, s)
    return y.transpose(0, 1).reshape(x2.shape[0], b * s)  # the one copy: output chunks side by side


class _Monarch(torch.autograd.Function):
    """The same product with a hand-written backward: one cheap copy each way less than autograd's.

    Every GEMM writes a contiguous output, so batched BLAS applies (writing into strided views
    with ``out=`` avoids the copies but is slower on CPU, badly so on a busy machine). When a
    graph of the gradient is wanted (double backward) it differentiates the plain path instead.
    """

    @staticmethod
    def forward(ctx: Any, x2: Tensor, blocks1: Tensor, blocks2: Tensor) -> Tensor:
        h = _stage1(x2, blocks1)
        ctx.save_for_backward(x2, blocks1, blocks2, h)
        b, s = blocks2.shape[:2]
        y = torch.bmm(_stage2_input(h, b), blocks2.transpose(1, 2))  # (b, N, s)
        return y.transpose(0, 1).reshape(x2.shape[0], b * s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, blocks1, blocks2, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the differentiable path instead
            wanted = [t for t, need in zip((x2, blocks1, blocks2), ctx.needs_input_grad) if need]
            found = iter(torch.autograd.grad(_structured_plain(x2, blocks1, blocks2), wanted, grad,
                                             create_graph=True))
            return tuple(next(found) if need else None for need in ctx.needs_input_grad)
        b, q, p = blocks1.shape
        s, n_rows = blocks2.shape[1], x2.shape[0]
        grad_t = grad.contiguous().view(n_rows, b, s).transpose(0, 1)  # (b, N, s), a view
        grad_1 = grad_2 = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_2 = torch.bmm(grad_t.transpose(1, 2), _stage2_input(h, b))
        # back to t order: (l, r, N) -> (r, l, N) moves whole rows of N values
        grad_h = torch.bmm(blocks2.transpose(1, 2), grad_t.transpose(1, 2)).transpose(0, 1).reshape(b, q, n_rows)
        if ctx.needs_input_grad[1]:
            grad_1 = torch.bmm(grad_h, x2.reshape(n_rows, b, p).transpose(0, 1))
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_h.transpose(1, 2), blocks1).transpose(0, 1).reshape(n_rows, b * p)
        return grad_x, grad_1, grad_2


def _fast_path(x: Tensor, blocks1: Tensor, blocks2: Tensor) -> bool:
    """Whether the hand-written backward applies (compilers and autocast get plain ops)."""
    return (not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == blocks1.dtype == blocks2.dtype)


def monarch_multiply(x: Tensor, blocks1: Tensor, blocks2: Tensor, out_features: int) -> Tensor:
    """The Monarch product of ``x`` (``..., n``): ``(..., out_features)``, differentiable.

    ``blocks1`` is ``(b, q, p)`` with ``n <= b·p``, ``blocks2`` is ``(b, s, q)`` with
    ``out_features <= b·s``. Two batched GEMMs; the permutation between them costs no copy, and
    the output one copy (plus the padding of sizes that ``b`` doesn't divide).
    """
    b, p, _, s = _check_blocks(blocks1, blocks2)
    n = x.shape[-1]
    if not (b * (p - 1) < n <= b * p and b * (s - 1) < out_features <= b * s):
        raise ConfigError(f"input size {n} and out_features={out_features} don't fit blocks1 "
                          f"{tuple(blocks1.shape)} and blocks2 {tuple(blocks2.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if n < b * p:
        x2 = F.pad(x2, (0, b * p - n))
    fast = _fast_path(x, blocks1, blocks2)
    y = _Monarch.apply(x2, blocks1, blocks2) if fast else _structured_plain(x2, blocks1, blocks2)
    if out_features < b * s:
        y = y[:, :out_features].contiguous()  # row-major like nn.Linear's output: views keep working
    return y.reshape(*lead, out_features)


def _stage2_order(b: int, q: int, device: torch.device) -> Tensor:
    """For stage-2 position ``u = l·q + r``, the intermediate index ``t = r·b + l`` it reads."""
    u = torch.arange(b * q, device=device)
    return (u % q) * b + u // q


def monarch_to_dense(blocks1: Tensor, blocks2: Tensor, in_features: int, out_features: int) -> Tensor:
    """The ``(out_features, in_features)`` matrix ``M`` with ``monarch_multiply(x, ...) = x @ M.T``.

    Built as ``blockdiag(blocks2) · P · blockdiag(blocks1)`` (differentiable), independently of
    :func:`monarch_multiply`.
    """
    b, _, q, _ = _check_blocks(blocks1, blocks2)
    first = torch.block_diag(*blocks1.unbind(0))[_stage2_order(b, q, blocks1.device)]  # rows in stage-2 order
    return (torch.block_diag(*blocks2.unbind(0)) @ first)[:out_features, :in_features]


def _pair_positions(b: int, q: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each intermediate index ``t``: its stage-2 block ``l``, stage-1 block ``i``, and its rank
    in the (``l``, ``i``) pair's share (the indices of a pair, in increasing ``t``)."""
    t = torch.arange(b * q, device=device)
    stage2, stage1 = t % b, t // q
    first = torch.div(stage1 * q - stage2 + b - 1, b, rounding_mode="floor")  # the pair's smallest r
    return stage2, stage1, t // b - first


@torch.no_grad()
def project_monarch(weight: Tensor, nblocks: int, block_rank: int | None = None,
                    row_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(blocks1, blocks2)`` of the Monarch matrix nearest ``weight`` (``m × n``) in Frobenius norm.

    The (stage-2 block ``l``, stage-1 block ``i``) pair alone produces the sub-block
    ``W[l·s:(l+1)·s, i·p:(i+1)·p]``, through the ``c`` intermediate indices ``t`` in block ``i``
    with ``t mod b = l``, and no two pairs share a parameter: the optimum is each sub-block's
    best rank-``c`` approximation (Eckart–Young), ``√σ`` going to either factor. With
    ``row_weights`` (``m``, nonnegative) it minimises ``Σ_k w_k ‖W_k − M_k‖²``: the SVD of
    ``diag(√w)·W`` per sub-block, the left factor divided by ``√w`` again.
    """
    if weight.dim() != 2:
        raise ConfigError(f"weight of shape {tuple(weight.shape)}: must be an (out, in) matrix")
    m, n = weight.shape
    p, q, s = monarch_shapes(n, m, nblocks, block_rank)
    b = nblocks
    # the SVD in float64 only for float64 weights: float32 is twice as fast, and accurate to its own precision
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    padded = F.pad(weight.detach().to(compute), (0, b * p - n, 0, b * s - m))
    # the same row weighting as FWSVD (one rule for zero weights); padded rows are zero anyway
    scale = None if row_weights is None else F.pad(row_scale(row_weights, m, compute, weight.device), (0, b * s - m),
                                                   value=1.0)
    if scale is not None:
        padded = padded * scale[:, None]
    sub = padded.view(b, s, b, p).transpose(1, 2)  # (l, i, s, p)
    u, sigma, vh = torch.linalg.svd(sub, full_matrices=False)
    root = sigma.sqrt()
    left = u * root[..., None, :]  # (l, i, s, k)
    right = vh * root[..., :, None]  # (l, i, k, p)
    if scale is not None:
        left = left / scale.view(b, 1, s, 1)
    # A zero component past k = min(s, p): a pair with more indices than the sub-block's rank.
    k = sigma.shape[-1]
    left, right = F.pad(left, (0, 1)), F.pad(right, (0, 0, 0, 1))
    stage2, stage1, rank = _pair_positions(b, q, weight.device)
    rank = rank.clamp(max=k)
    blocks1 = right[stage2, stage1, rank].view(b, q, p)  # row t of the stacked blocks1 is (i, j)
    blocks2 = left[stage2, stage1, :, rank]  # (b·q, s) with t = r·b + l: regroup by l
    blocks2 = blocks2.view(q, b, s).permute(1, 2, 0)
    return blocks1.to(weight.dtype).contiguous(), blocks2.to(weight.dtype).contiguous()


class MonarchLinear(nn.Module):
    """``y = x · Mᵀ + bias`` with ``M`` (``out × in``) a Monarch matrix of ``nblocks`` blocks of rank ``block_rank``.

    Stores ``blocks1`` (``b × q × p``) and ``blocks2`` (``b × s × q``): ``q·(in + out)``
    parameters, as many as a rank-``q`` factorisation, yet ``M`` can reach rank ``b·q``.
    Build one from a trained weight with :meth:`from_dense`.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, block_rank: int | None = None,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        p, q, s = monarch_shapes(in_features, out_features, nblocks, block_rank)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.nblocks, self.block_rank = int(nblocks), q
        factory = {"device": device, "dtype": dtype}
        self.blocks1 = nn.Parameter(torch.empty(nblocks, q, p, **factory))
        self.blocks2 = nn.Parameter(torch.empty(nblocks, s, q, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform factors whose product has ``nn.Linear``'s output variance (``1/3`` for unit inputs).

        ``nn.Linear`` draws from ``±1/√n``: variance ``1/(3n)`` per weight, ``n/(3n) = 1/3`` per
        output. Here stage 1 has variance ``b/n`` per weight, so each intermediate value (a sum
        over ``n/b`` inputs on average) has variance 1, and stage 2 has ``1/(3q)``, so each output
        (a sum over ``q`` of them) has ``1/3``. Padding columns past ``in_features`` are zeroed.
        """
        bound1 = math.sqrt(3 * self.nblocks / self.in_features)
        self.blocks1.uniform_(-bound1, bound1)
        column = torch.arange(self.blocks1.shape[0] * self.blocks1.shape[2], device=self.blocks1.device)
        self.blocks1.masked_fill_(column.view(self.nblocks, 1, -1) >= self.in_features, 0)  # reads only padding
        self.blocks2.uniform_(-1 / math.sqrt(self.block_rank), 1 / math.sqrt(self.block_rank))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, nblocks: int = 4, block_rank: int | None = None,
                   row_weights: Tensor | None = None) -> MonarchLinear:
        """The layer whose matrix is the projection of ``weight`` (``out × in``), ``bias`` copied."""
        if weight.dim() != 2:
            raise ConfigError(f"weight of shape {tuple(weight.shape)}: must be an (out, in) matrix")
        layer = cls(weight.shape[1], weight.shape[0], nblocks, block_rank, bias is not None,
                    weight.device, weight.dtype)
        blocks1, blocks2 = project_monarch(weight, nblocks, block_rank, row_weights)
        with torch.no_grad():
            layer.blocks1.copy_(blocks1)
            layer.blocks2.copy_(blocks2)
            if bias is not None:
                assert layer.bias is not None, "the layer is built with a bias when the source has one"
                layer.bias.copy_(bias.detach())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        y = monarch_multiply(x, self.blocks1, self.blocks2, self.out_features)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> Tensor:
        """The ``out × in`` matrix (differentiable)."""
        return monarch_to_dense(self.blocks1, self.blocks2, self.in_features, self.out_features)

    def format_name(self) -> str:
        return f"monarch:{self.nblocks}x{self.block_rank}"

    def init_args(self) -> dict[str, Any]:
        """Plain values with which ``MonarchLinear(**init_args())`` rebuilds this layer's shapes."""
        return {"in_features": self.in_features, "out_features": self.out_features, "nblocks": self.nblocks,
                "block_rank": self.block_rank, "bias": self.bias is not None}

    def num_parameters(self) -> int:
        """Stored weights of both factors (the bias not counted)."""
        return self.blocks1.numel() + self.blocks2.numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"block_rank={self.block_rank}, bias={self.bias is not None}")
