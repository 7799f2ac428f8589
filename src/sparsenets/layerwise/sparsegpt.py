"""SparseGPT (Frantar & Alistarh 2023): prune one layer and rebuild its output from calibration inputs.

Every output row is an independent least-squares problem with the same Hessian ``H = Σ xxᵀ``, so the
optimal-brain-surgeon (OBS) update for pruning input ``j`` is ``δ = -w_j / [H⁻¹]_jj · [H⁻¹]_j,:``,
shared by all rows. Processing the inputs left to right, the inverse Hessian of the inputs not yet
visited is read off the upper Cholesky factor ``U`` of ``H⁻¹`` (row ``j`` of ``U``, scaled by ``U_jj``,
is that inverse's first row), so one factorisation serves every step. Updates are applied eagerly
inside a lazy block of ``blocksize`` inputs and to the rest of the matrix once per block (one GEMM),
which keeps the work memory-bound on a small tile instead of the whole weight.

Masks are chosen as the paper does: at the start of each lazy block for unstructured and block
patterns (lowest OBS score ``w² / [H⁻¹]_jj²`` over the rows × block tile), and at each group's first
input for N:M (inside a group, with the values already updated by the inputs before it).

With a ``quantizer`` the same sweep is GPTQ (Frantar et al. 2023), jointly with the pruning: each
input's target is 0 where pruned and its quantized value where kept, and the OBS update spreads
the difference over the inputs still to come (at sparsity 0, plain GPTQ).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ConfigError, SparsenetsError
from ..patterns import Pattern

_RETRIES = 3  # extra Cholesky attempts, each with ten times the dampening
_INNER = 16  # inputs updated one by one; the rest of a lazy block takes their updates as one GEMM


class Quantizer(Protocol):
    """Rounds one input's weights at a time. ``begin(block, start)`` comes before any input of a
    group is rounded, with that group's current (already updated) weights, inputs × outputs, the
    entries pruned so far zeroed; ``group_size`` None: one group, begun at input 0 with the whole
    matrix. ``quantizer(values, j)`` returns input ``j``'s outputs (rows,) on the grid."""

    group_size: int | None

    def begin(self, block: Tensor, start: int) -> None: ...

    def __call__(self, values: Tensor, j: int) -> Tensor: ...


def sparsegpt_prune_(weight: Tensor, gram: Tensor, pattern: Pattern, sparsity: float, *,
                     keep: Tensor | None = None, blocksize: int = 128, damp: float = 0.01,
                     quantizer: Quantizer | None = None) -> Tensor:
    """Prune ``weight`` (GEMM form, rows × cols) in place to ``sparsity`` with ``pattern`` and
    return its keep-mask; ``gram`` is Σ xxᵀ over the calibration inputs (cols × cols).

    The math runs in float32 (float64 for a float64 weight; float64 for inverting a gram of up to
    ``_FACTOR_DTYPE_LIMIT`` inputs) and the
    result is written back in ``weight``'s dtype, pruned entries exactly 0. ``gram``'s scale does not
    matter: ``damp`` is relative to the mean of its live diagonal. ``keep`` (bool, rows × cols) holds
    entries pruned earlier: they are pruned here too (with compensation, should they still be
    nonzero), count towards ``sparsity``, and the mask returned is a subset of it.

    Patterns: unstructured (exactly ``round(sparsity · rows · cols)`` entries pruned, unless ``keep``
    already prunes more), N:M (``sparsity`` must be ``1 - N/M``; groups already holding more pruned
    entries than ``M - N`` stay so), and ``r × c`` blocks (whole tiles; the pruned element count is
    the target to within a tile; a tile with any entry that ``keep`` prunes is pruned whole, the
    only way to both conform and stay inside ``keep``). ``blocksize`` is rounded down to a multiple
    of M or c (at least one).

    Dead inputs (``gram[i, i] == 0``, never active in calibration) have no effect on the layer's
    output there, so their weights are set to 0 at no cost. They are not forced out of the mask: at
    OBS score 0 the selection prunes them first, but if the pattern or the target leaves some of them
    kept, the mask says kept (value 0) so that the mask keeps the pattern and the exact sparsity.

    ``quantizer`` (see :class:`Quantizer`): the kept weights end on its grid, each input's rounding
    error compensated like a pruned weight's. Its groups begin where every input of the group is up
    to date: the group size is a multiple of the inner block, or the inner block is made a multiple
    of it; the lazy block is rounded down to a multiple of both.
    """
    rows, cols = _check_args(weight, gram, pattern, sparsity, keep, damp)
    pattern.check(rows, cols, "sparsegpt weight")
    if blocksize < 1:
        raise ConfigError(f"blocksize must be >= 1, got {blocksize}")
    nm, shape = pattern.n_m, pattern.block_shape
    step = nm[1] if nm else shape[1] if shape else 1
    inner = step * max(1, _INNER // step)  # N:M groups must not straddle inner blocks either
    group = quantizer.group_size if quantizer is not None else None
    if group is not None:
        # a group must begin where all its inputs are current: at an inner block's start (the rest of
        # the lazy block is then up to date) with the group inside the lazy block, or inside one inner block
        if group % inner:
            inner = math.lcm(step, group * max(1, _INNER // group))
        step = math.lcm(inner, group)
    blocksize = max(step, blocksize // step * step)
    device = weight.device
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    # Work on the transpose (inputs × outputs): one input is then a contiguous row.
    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=device)
    if keep is not None:
        pruned |= ~keep.to(device).t()
    target = min(rows * cols, round(sparsity * rows * cols))
    if nm is None and target <= int(pruned.sum()):
        target = int(pruned.sum())
        if not pruned.any() and quantizer is None:
            return torch.ones(rows, cols, dtype=torch.bool, device=device)  # nothing to prune

    exact = dtype == torch.float64 or cols <= _FACTOR_DTYPE_LIMIT
    dead = gram.diagonal() == 0
    u = _upper_cholesky_of_inverse(gram.detach().to(device), dead.to(device), damp,
                                   torch.float64 if exact else torch.float32).to(dtype)
    d = u.diagonal().clone()  # d_j² = [H_F⁻¹]_jj, F = the inputs not yet visited at step j

    w = torch.empty(cols, rows, dtype=dtype, device=device)
    w.copy_(weight.detach().t())  # a fresh copy even where the transpose is already contiguous
    w[dead] = 0
    quotas = _quotas(blocksize, cols, rows, pattern, pruned, target) if nm is None else []

    if quantizer is not None and group is None:
        quantizer.begin(w.masked_fill(pruned, 0), 0)
    carry = 0.0
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        if shape is not None:
            carry = _select_tiles_(pruned[i1:i2], w[i1:i2], d[i1:i2], shape, quotas[b] + carry)
        elif nm is None:
            _select_lowest_(pruned[i1:i2], w[i1:i2], d[i1:i2], quotas[b])
        err = torch.empty(i2 - i1, rows, dtype=dtype, device=device)
        for k1 in range(i1, i2, inner):
            k2 = min(k1 + inner, i2)
            wb, pb, ub, db, eb = w[k1:k2], pruned[k1:k2], u[k1:k2, k1:k2], d[k1:k2], err[k1 - i1:k2 - i1]
            for j in range(k2 - k1):
                if nm is not None and j % nm[1] == 0:
                    _select_nm_(pb[j:j + nm[1]], wb[j:j + nm[1]], db[j:j + nm[1]], nm)
                e = eb[j]
                if quantizer is None:
                    torch.mul(wb[j], pb[j], out=e)
                else:
                    if group is not None and (k1 + j) % group == 0:
                        g2 = min(k1 + j + group, cols)
                        quantizer.begin(w[k1 + j:g2].masked_fill(pruned[k1 + j:g2], 0), k1 + j)
                    q = quantizer(wb[j], k1 + j).to(dtype).masked_fill(pb[j], 0)
                    torch.sub(wb[j], q, out=e)
                e /= db[j]
                wb[j + 1:].addr_(ub[j, j + 1:], e, alpha=-1)  # OBS update of the inputs still to come
                if quantizer is None:
                    wb[j].masked_fill_(pb[j], 0)
                else:
                    wb[j].copy_(q)
            if k2 < i2:
                w[k2:i2].addmm_(u[k1:k2, k2:i2].t(), eb, alpha=-1)
        if i2 < cols:
            w[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)  # the lazy block's updates, once, to the rest

    weight.copy_(w.t())
    return (~pruned).t().contiguous()


def _check_args(weight: Tensor, gram: Tensor, pattern: Pattern, sparsity: float,
                keep: Tensor | None, damp: float) -> tuple[int, int]:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise SparsenetsError(f"SparseGPT needs a 2-D float weight (rows x cols), got {tuple(weight.shape)} "
                              f"{weight.dtype}")
    rows, cols = weight.shape
    if tuple(gram.shape) != (cols, cols):
        raise SparsenetsError(f"gram must be cols x cols = {cols}x{cols} for a {rows}x{cols} weight, "
                              f"got {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise SparsenetsError("gram has non-finite entries (inf/nan in the calibration inputs?)")
    if keep is not None and (tuple(keep.shape) != (rows, cols) or keep.dtype != torch.bool):
        raise SparsenetsError(f"keep must be a bool {rows}x{cols} mask, got {tuple(keep.shape)} {keep.dtype}")
    if not pattern.elementwise and pattern.n_m is None and pattern.block_shape is None:
        raise ConfigError(f"SparseGPT supports unstructured, N:M and block patterns, not pattern "
                          f"'{pattern.name}'")
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity}")
    if pattern.n_m is not None:
        n, m = pattern.n_m
        if abs(sparsity - (1 - n / m)) > 1e-6:
            raise ConfigError(f"pattern {pattern.name} prunes {1 - n / m:g} of each layer, but sparsity "
                              f"{sparsity:g} was asked for")
    if damp < 0:
        raise ConfigError(f"damp must be >= 0, got {damp}")
    return rows, cols


# The gram is factored in float64 up to this many inputs; above, in float32 as the SparseGPT
# paper does (with dampening it is well conditioned), since float64 copies of a 5632-wide gram
# alone would be a gigabyte.
_FACTOR_DTYPE_LIMIT = 2048


def _upper_cholesky_of_inverse(gram: Tensor, dead: Tensor, damp: float, dtype: torch.dtype) -> Tensor:
    """Upper ``U`` with ``UᵀU = (H + damp·mean(diag H)·I)⁻¹`` in ``dtype``, where H is ``gram`` with
    each dead input's diagonal set to the live mean (uncoupled from the live inputs, its value only
    sets the scale of its own step). Retries with more dampening, since a gram from few samples
    (rank < cols) or with near-collinear inputs may be numerically singular.

    H = V Vᵀ with V upper (the Cholesky factor of H with the order reversed), so U = V⁻¹: one
    factorisation and one triangular solve, no explicit H⁻¹. A large layer's gram is hundreds of
    MB, so at most two matrices of its size are alive at once (besides ``gram``).
    """
    diagonal = gram.diagonal().flip(0).to(dtype)
    live = ~dead.flip(0)
    scale = float(diagonal[live].mean()) if bool(live.any()) else 1.0
    diagonal[~live] = scale
    levels = [damp] + [max(damp, 1e-4) * 10 ** k for k in range(1, _RETRIES + 1)]
    for level in levels:
        reversed_h = gram.flip(0, 1).to(dtype)  # the one copy of H; dampening goes onto its diagonal
        reversed_h.diagonal().copy_(diagonal + level * scale)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) == 0:
            del reversed_h  # no retry: free it before the next copies
            upper = lower.flip(0, 1)
            del lower
            eye = torch.eye(upper.shape[0], dtype=dtype, device=upper.device)
            inverse = torch.linalg.solve_triangular(upper, eye, upper=True, out=eye)  # in place of eye
            if bool(torch.isfinite(inverse).all()):
                return inverse
    raise SparsenetsError(
        f"SparseGPT could not factor the calibration gram ({gram.shape[0]}x{gram.shape[0]}), even with the "
        f"dampening raised from {damp:.3g} to {levels[-1]:.3g} (x mean diagonal); is it a real Σ xxᵀ "
        f"(symmetric, non-negative diagonal)? Try more calibration samples or a larger damp"
    )


def _quotas(blocksize: int, cols: int, rows: int, pattern: Pattern, pruned: Tensor, target: int) -> list[int]:
    """Pruned entries per lazy block, summing to ``target`` exactly: each block gets the same fraction,
    except where ``keep`` already prunes more there (water-filling), then largest-remainder rounding.
    For block patterns, an entry ``keep`` prunes forces its whole tile out, which counts here."""
    starts = range(0, cols, blocksize)
    sizes = [(min(s + blocksize, cols) - s) * rows for s in starts]
    forced = pruned
    if pattern.block_shape is not None:
        forced = _tile_any(pruned, pattern.block_shape)
    per_input = forced.sum(1).tolist()
    pre = [sum(per_input[s:s + blocksize]) for s in starts]
    target = min(max(target, sum(pre)), sum(sizes))

    def filled(level: float) -> float:
        return sum(max(p, level * n) for p, n in zip(pre, sizes))

    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid) < target else (lo, mid)
    exact = [max(p, hi * n) for p, n in zip(pre, sizes)]
    out = [min(n, max(p, math.floor(e))) for p, n, e in zip(pre, sizes, exact)]
    order = sorted(range(len(out)), key=lambda k: exact[k] - out[k], reverse=True)
    rest = target - sum(out)
    while rest > 0:
        for k in order:
            if rest and out[k] < sizes[k]:
                out[k] += 1
                rest -= 1
    return out


def _scores(wb: Tensor, db: Tensor) -> Tensor:
    """OBS saliency ``w² / [H⁻¹]_jj²``: the output error of pruning that entry alone."""
    return (wb / db[:, None]).square_()


def _select_lowest_(pb: Tensor, wb: Tensor, db: Tensor, count: int) -> None:
    """Unstructured: prune the ``count`` lowest scores of the whole tile, ``keep``'s pruned ones first."""
    scores = _scores(wb, db).masked_fill_(pb, -math.inf).view(-1)
    if count > 0:
        pb.view(-1)[scores.topk(count, largest=False, sorted=False).indices] = True


def _select_nm_(pg: Tensor, wg: Tensor, dg: Tensor, nm: tuple[int, int]) -> None:
    """N:M: in one group of M inputs (rows of ``pg``), prune the M - N lowest scores of every output."""
    n, m = nm
    scores = _scores(wg, dg).masked_fill_(pg, -math.inf)
    pg.scatter_(0, scores.topk(m - n, dim=0, largest=False, sorted=False).indices, True)


def _tile_any(pb: Tensor, shape: tuple[int, int]) -> Tensor:
    """Spread to its whole tile every True of a transposed (inputs × outputs) mask; tiles are r × c in
    GEMM form, so c × r here, with smaller edge tiles."""
    return _untile(_tile_sum(pb.float(), shape) > 0, shape, *pb.shape)


def _tile_sum(x: Tensor, shape: tuple[int, int]) -> Tensor:
    """Sum a transposed (inputs × outputs) tensor over its c × r tiles (zero-padded at the edges)."""
    r, c = shape
    cols, rows = x.shape
    if cols % c or rows % r:
        x = torch.nn.functional.pad(x, (0, -rows % r, 0, -cols % c))
    return x.view(-1, x.shape[1] // r, r).sum(-1).view(x.shape[0] // c, c, -1).sum(1)  # contiguous first


def _untile(grid: Tensor, shape: tuple[int, int], cols: int, rows: int) -> Tensor:
    """A per-tile tensor spread back to the transposed (inputs × outputs) elements."""
    r, c = shape
    n_c, n_r = grid.shape
    return grid[:, None, :, None].expand(n_c, c, n_r, r).reshape(n_c * c, n_r * r)[:cols, :rows]


def _tile_sizes(shape: tuple[int, int], cols: int, rows: int, device: torch.device) -> Tensor:
    """Elements per tile of a transposed (inputs × outputs) block: c × r, less at the edges."""
    r, c = shape
    along_cols = torch.full((-(-cols // c),), float(c), device=device)
    along_cols[-1] = cols - c * (len(along_cols) - 1)
    along_rows = torch.full((-(-rows // r),), float(r), device=device)
    along_rows[-1] = rows - r * (len(along_rows) - 1)
    return torch.outer(along_cols, along_rows)


def _select_tiles_(pb: Tensor, wb: Tensor, db: Tensor, shape: tuple[int, int], want: float) -> float:
    """Blocks: prune whole tiles, lowest mean score first (edge tiles are smaller), tiles holding an
    entry ``keep`` prunes before all; take as many as bring the pruned count nearest ``want``.
    Returns what is left over (positive or negative), carried to the next lazy block."""
    cols, rows = pb.shape
    sizes = _tile_sizes(shape, cols, rows, pb.device)
    mean = _tile_sum(_scores(wb, db), shape) / sizes
    n_forced = 0
    if bool(pb.any()):
        forced = _tile_sum(pb.float(), shape) > 0
        mean.masked_fill_(forced, -math.inf)
        n_forced = int(forced.sum())
    order = mean.view(-1).argsort()
    cum = torch.cat([sizes.new_zeros(1), sizes.view(-1)[order].cumsum(0)])
    take = n_forced + int((cum[n_forced:] - want).abs().argmin())
    grid = torch.zeros(sizes.numel(), dtype=torch.bool, device=pb.device)
    grid[order[:take]] = True
    pb |= _untile(grid.view(sizes.shape), shape, cols, rows)
    return want - float(cum[take])
