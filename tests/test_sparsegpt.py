"""SparseGPT: it must rebuild a layer's output better than mask-only pruning, follow the paper's
math exactly (checked against a slow textbook OBS loop), and honour patterns, keep-masks and dtypes."""

import math

import pytest
import torch

from sparsenets.errors import ConfigError, PatternError, SparsenetsError
from sparsenets.layerwise.sparsegpt import sparsegpt_prune_
from sparsenets.patterns import parse_pattern


def _inputs(n: int, cols: int, mixing: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Correlated inputs (samples × cols) with a few large-magnitude outlier features, as in LLMs."""
    x = torch.randn(n, cols, generator=gen) @ mixing
    x[:, :3] *= 15.0
    return x


def _problem(rows: int = 64, cols: int = 128, n: int = 1024, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / math.sqrt(cols) + 0.3 * torch.eye(cols)
    calib, held_out = _inputs(n, cols, mixing, gen), _inputs(n, cols, mixing, gen)
    weight = torch.randn(rows, cols, generator=gen)
    return weight, calib.T @ calib, calib, held_out


def _rel_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((weight - pruned.float()) @ x.T).norm() / (weight @ x.T).norm())


def _baseline_mask(score: torch.Tensor, spec: str, sparsity: float, per_row: bool) -> torch.Tensor:
    """Mask-only pruning by ``score`` (keep the highest), in plain torch."""
    pattern = parse_pattern(spec)
    rows, cols = score.shape
    if pattern.n_m is not None:
        n, m = pattern.n_m
        groups = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, -1).indices, True)
        return keep.reshape(rows, cols)
    if pattern.block_shape is not None:
        r, c = pattern.block_shape
        tiles = score.reshape(rows // r, r, cols // c, c).sum((1, 3))
        k = round((1 - sparsity) * tiles.numel())
        keep = torch.zeros(tiles.numel(), dtype=torch.bool)
        keep[tiles.flatten().topk(k).indices] = True
        return keep.view_as(tiles).repeat_interleave(r, 0).repeat_interleave(c, 1)
    if per_row:
        k = round((1 - sparsity) * cols)
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, 1).indices, True)
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[score.flatten().topk(round((1 - sparsity) * score.numel())).indices] = True
    return keep.view_as(score)


def _tiles_conform(mask: torch.Tensor, r: int, c: int) -> bool:
    rows, cols = mask.shape
    ids = (torch.arange(rows) // r)[:, None] * cols + (torch.arange(cols) // c)[None, :]
    kept = torch.zeros(ids.max() + 1).index_add_(0, ids.flatten(), mask.flatten().float())
    size = torch.bincount(ids.flatten()).float()
    return bool(((kept == 0) | (kept == size)).all())


@pytest.mark.parametrize("spec", ["unstructured", "2:4", "block:2x2", "block:4x1"])
def test_rebuilds_held_out_outputs_better_than_magnitude_and_wanda(spec):
    weight, gram, calib, held_out = _problem()
    pattern = parse_pattern(spec)
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, gram, pattern, 0.5, blocksize=32)

    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (pruned[~mask] == 0).all()
    assert int((~mask).sum()) == weight.numel() // 2
    assert pattern.conforms(mask)
    if pattern.block_shape is not None:
        assert _tiles_conform(mask, *pattern.block_shape)

    ours = _rel_error(weight, pruned, held_out)
    magnitude = _rel_error(weight, weight * _baseline_mask(weight.abs(), spec, 0.5, per_row=False), held_out)
    wanda_score = weight.abs() * calib.norm(dim=0)
    wanda = _rel_error(weight, weight * _baseline_mask(wanda_score, spec, 0.5, per_row=True), held_out)
    same_mask_unrebuilt = _rel_error(weight, weight * mask, held_out)
    print(f"{spec}: sparsegpt {ours:.4f}  magnitude {magnitude:.4f} ({ours / magnitude:.2f}x)  "
          f"wanda {wanda:.4f} ({ours / wanda:.2f}x)  own mask without update {same_mask_unrebuilt:.4f}")
    assert ours < 0.7 * magnitude
    assert ours < 0.9 * wanda
    assert ours < 0.93 * same_mask_unrebuilt  # the OBS update itself helps, not just the mask


def _textbook(weight: torch.Tensor, gram: torch.Tensor, damp: float, spec: str, sparsity: float):
    """Slow OBS loop straight from the paper, float64: prune column by column and update the rest
    with the explicitly reduced inverse Hessian. Masks: one selection over the whole layer at the start
    (unstructured, i.e. one lazy block), or per group of M at its first column (N:M)."""
    w = weight.double().clone()
    rows, cols = w.shape
    h = gram.double() + damp * gram.diagonal().double().mean() * torch.eye(cols, dtype=torch.float64)
    inverses, hinv = [], torch.linalg.inv(h)
    for _ in range(cols):
        inverses.append(hinv)
        hinv = hinv[1:, 1:] - torch.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]
    d2 = torch.tensor([inv[0, 0] for inv in inverses], dtype=torch.float64)
    pattern = parse_pattern(spec)
    prune = torch.zeros(rows, cols, dtype=torch.bool)
    if pattern.n_m is None:
        scores = w.square() / d2  # OBS saliency w_q² / [H⁻¹]_qq
        prune.view(-1)[scores.flatten().topk(round(sparsity * w.numel()), largest=False).indices] = True
    for j in range(cols):
        if pattern.n_m is not None and j % pattern.n_m[1] == 0:
            n, m = pattern.n_m
            scores = w[:, j:j + m].square() / d2[j:j + m]
            prune[:, j:j + m].scatter_(1, scores.topk(m - n, 1, largest=False).indices, True)
        inv = inverses[j]
        err = torch.where(prune[:, j], w[:, j], 0.0) / inv[0, 0]
        w[:, j:] -= torch.outer(err, inv[0])
        w[:, j] = torch.where(prune[:, j], 0.0, w[:, j])
    return w, ~prune


@pytest.mark.parametrize(("spec", "blocksizes"), [("unstructured", [48]), ("2:4", [4, 8, 20, 48])])
def test_matches_textbook_obs_loop(spec, blocksizes):
    """The Cholesky trick and the lazy (and inner) batching are exact rewrites of the OBS loop."""
    weight, gram, _, _ = _problem(rows=12, cols=48, n=256, seed=1)
    weight = weight.double()
    expected, expected_mask = _textbook(weight, gram, 0.01, spec, 0.5)
    for blocksize in blocksizes:
        pruned = weight.clone()
        mask = sparsegpt_prune_(pruned, gram, parse_pattern(spec), 0.5, blocksize=blocksize)
        assert torch.equal(mask, expected_mask), blocksize
        torch.testing.assert_close(pruned, expected, rtol=1e-7, atol=1e-9)


def test_unstructured_lazy_blocks_rebuild_exactly_given_their_masks():
    """With several lazy blocks the masks are chosen block by block, but the rebuild of a fixed mask
    is still the textbook one: rerun the textbook loop with that mask."""
    weight, gram, _, _ = _problem(rows=10, cols=40, n=256, seed=2)
    weight = weight.double()
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, gram, parse_pattern("unstructured"), 0.6, blocksize=16)
    w = weight.clone()
    h = gram.double() + 0.01 * gram.diagonal().double().mean() * torch.eye(40, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    for j in range(40):
        err = torch.where(mask[:, j], 0.0, w[:, j]) / hinv[0, 0]
        w[:, j:] -= torch.outer(err, hinv[0])
        w[:, j] = torch.where(mask[:, j], w[:, j], 0.0)
        hinv = hinv[1:, 1:] - torch.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]
    torch.testing.assert_close(pruned, w, rtol=1e-7, atol=1e-9)
    assert int((~mask).sum()) == round(0.6 * 400)
    per_block = (~mask).reshape(10, -1).sum(0).split([16, 16, 8])
    assert [int(b.sum()) for b in per_block] == [96, 96, 48]  # the target fraction in every lazy block


@pytest.mark.parametrize(("shape", "sparsity", "blocksize"),
                         [((37, 100), 0.37, 32), ((37, 100), 0.9, 128), ((5, 7), 0.5, 3), ((64, 96), 0.25, 40),
                          ((1, 12), 0.5, 128), ((9, 1), 1.0, 128)])
def test_unstructured_sparsity_is_exact(shape, sparsity, blocksize):
    rows, cols = shape
    weight = torch.randn(rows, cols)
    x = torch.randn(2 * cols, cols)
    mask = sparsegpt_prune_(weight, x.T @ x, parse_pattern("unstructured"), sparsity, blocksize=blocksize)
    assert int((~mask).sum()) == round(sparsity * rows * cols)
    assert (weight[~mask] == 0).all()


def test_unstructured_keep_is_respected_and_counted():
    rows, cols = 37, 100
    weight, x = torch.randn(rows, cols), torch.randn(300, cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    keep[:, :20] = torch.rand(rows, 20) > 0.8  # earlier pruning, all in the first lazy block
    keep[:, 90:] = torch.rand(rows, 10) > 0.5  # and some in the last
    weight *= keep
    mask = sparsegpt_prune_(weight, x.T @ x, parse_pattern("unstructured"), 0.4, keep=keep, blocksize=32)
    assert not (mask & ~keep).any()
    assert int((~mask).sum()) == round(0.4 * rows * cols)
    assert (weight[~mask] == 0).all()

    # keep already prunes more than asked: nothing more goes, and the rest is rebuilt around it
    before = weight.clone()
    mask = sparsegpt_prune_(weight, x.T @ x, parse_pattern("unstructured"), 0.1, keep=mask)
    assert int((~mask).sum()) == round(0.4 * rows * cols)
    assert torch.equal(weight, before)  # pruned entries were already 0: no error to spread


def test_keep_entries_still_nonzero_are_pruned_with_compensation():
    weight, gram, _, held_out = _problem(rows=32, cols=64, seed=3)
    keep = torch.rand(32, 64) > 0.3
    pruned = weight.clone()  # not yet zero where keep is False
    mask = sparsegpt_prune_(pruned, gram, parse_pattern("unstructured"), 0.3, keep=keep)
    assert torch.equal(mask, keep)
    assert (pruned[~keep] == 0).all()
    assert _rel_error(weight, pruned, held_out) < 0.8 * _rel_error(weight, weight * keep, held_out)


def test_nm_keep_and_conformance():
    weight, gram, _, _ = _problem(rows=32, cols=64, seed=4)
    keep = torch.rand(32, 64) > 0.3
    weight *= keep
    pattern = parse_pattern("2:4")
    mask = sparsegpt_prune_(weight, gram, pattern, 0.5, keep=keep, blocksize=30)  # rounded to 28
    assert pattern.conforms(mask)
    assert not (mask & ~keep).any()
    assert (weight[~mask] == 0).all()
    kept_per_group = mask.reshape(32, -1, 4).sum(-1)
    assert (kept_per_group <= 2).all()
    # where keep leaves at least 2 of a group, exactly 2 stay
    assert (kept_per_group[keep.reshape(32, -1, 4).sum(-1) >= 2] == 2).all()


def test_blocks_with_edge_tiles_and_keep():
    rows, cols = 38, 100  # block:2x3 leaves edge tiles; blocksize 50 rounds to 48
    weight, x = torch.randn(rows, cols), torch.randn(400, cols)
    gram = x.T @ x
    pattern = parse_pattern("block:2x3")
    mask = sparsegpt_prune_(weight.clone(), gram, pattern, 0.5, blocksize=50)
    assert pattern.conforms(mask) and _tiles_conform(mask, 2, 3)
    assert abs(int((~mask).sum()) - round(0.5 * rows * cols)) <= 6

    earlier = sparsegpt_prune_(weight, gram, pattern, 0.25, blocksize=50)
    keep = earlier.clone()
    keep[7, 13] = False  # not tile-shaped: its whole tile must go
    mask = sparsegpt_prune_(weight, gram, pattern, 0.6, keep=keep, blocksize=50)
    assert pattern.conforms(mask) and not (mask & ~keep).any()
    assert not mask[6:8, 12:15].any()
    assert abs(int((~mask).sum()) - round(0.6 * rows * cols)) <= 6
    assert (weight[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    weight, gram, _, held_out = _problem(seed=5)
    half = weight.to(dtype)
    as_float = half.float()
    mask = sparsegpt_prune_(half, gram, parse_pattern("2:4"), 0.5)
    mask32 = sparsegpt_prune_(as_float, gram, parse_pattern("2:4"), 0.5)
    assert half.dtype == dtype
    assert torch.equal(mask, mask32)
    assert torch.equal(half, as_float.to(dtype))  # the same float32 math, rounded once at the end
    assert (half[~mask] == 0).all()
    magnitude = _rel_error(weight, weight * _baseline_mask(weight.abs(), "2:4", 0.5, per_row=False), held_out)
    assert _rel_error(weight, half, held_out) < 0.7 * magnitude


def test_dead_inputs_and_gram_scale():
    weight, _, calib, held_out = _problem(rows=32, cols=64, seed=6)
    dead = [5, 17, 40]
    calib[:, dead] = 0
    held_out[:, dead] = 0
    gram = calib.T @ calib
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, gram, parse_pattern("unstructured"), 0.5, blocksize=16)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, dead] == 0).all()
    assert not mask[:, dead].any()  # free to prune, so pruned first
    assert int((~mask).sum()) == 32 * 32
    magnitude = _rel_error(weight, weight * _baseline_mask(weight.abs(), "unstructured", 0.5, False), held_out)
    assert _rel_error(weight, pruned, held_out) < 0.7 * magnitude

    # a mean instead of a sum (or any scale) gives the same result
    scaled = weight.clone()
    mask_scaled = sparsegpt_prune_(scaled, gram * 1e-6, parse_pattern("unstructured"), 0.5, blocksize=16)
    assert torch.equal(mask, mask_scaled)
    torch.testing.assert_close(scaled, pruned, rtol=1e-4, atol=1e-5)


def test_more_dead_inputs_than_the_pattern_prunes():
    weight, x = torch.randn(8, 16), torch.randn(64, 16)
    x[:, :12] = 0  # the first three groups of 4 inputs are all dead
    pattern = parse_pattern("2:4")
    mask = sparsegpt_prune_(weight, x.T @ x, pattern, 0.5)
    assert pattern.conforms(mask) and int(mask.sum()) == 8 * 8
    assert int(mask[:, :12].sum()) == 8 * 6  # 2 of 4 stay in the mask (at value 0): the pattern holds
    assert (weight[:, :12] == 0).all() and torch.isfinite(weight).all()


def test_rank_deficient_gram_works_thanks_to_dampening():
    weight, _, _, _ = _problem(rows=32, cols=64, seed=7)
    x = torch.randn(20, 64)  # fewer samples than inputs
    pruned = weight.clone()
    mask = sparsegpt_prune_(pruned, x.T @ x, parse_pattern("unstructured"), 0.5)
    assert torch.isfinite(pruned).all()
    assert int((~mask).sum()) == 32 * 32
    magnitude = _rel_error(weight, weight * _baseline_mask(weight.abs(), "unstructured", 0.5, False), x)
    assert _rel_error(weight, pruned, x) < 0.5 * magnitude


def test_bad_grams_raise():
    weight = torch.randn(4, 8)
    with pytest.raises(SparsenetsError, match="could not factor"):
        sparsegpt_prune_(weight, -torch.eye(8), parse_pattern("unstructured"), 0.5)
    gram = torch.eye(8)
    gram[2, 3] = math.nan
    with pytest.raises(SparsenetsError, match="non-finite"):
        sparsegpt_prune_(weight, gram, parse_pattern("unstructured"), 0.5)
    with pytest.raises(SparsenetsError, match="gram must be"):
        sparsegpt_prune_(weight, torch.eye(4), parse_pattern("unstructured"), 0.5)


@pytest.mark.parametrize("spec", ["channel", "head"])
def test_other_patterns_raise_config_error(spec):
    with pytest.raises(ConfigError, match=f"SparseGPT supports unstructured, N:M and block.*'{spec}'"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), parse_pattern(spec), 0.5)


def test_nm_argument_errors():
    with pytest.raises(ConfigError, match="sparsity"):
        sparsegpt_prune_(torch.randn(4, 8), torch.eye(8), parse_pattern("2:4"), 0.7)
    with pytest.raises(PatternError, match="multiple of 4"):
        sparsegpt_prune_(torch.randn(4, 10), torch.eye(10), parse_pattern("2:4"), 0.5)


def test_zero_sparsity_leaves_the_weight_alone():
    weight = torch.randn(4, 8)
    before = weight.clone()
    mask = sparsegpt_prune_(weight, torch.eye(8), parse_pattern("unstructured"), 0.0)
    assert mask.all() and torch.equal(weight, before)
