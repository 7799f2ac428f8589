"""Achieved sparsity, pattern structure and selection for every pattern × criterion × allocation."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsenets as sn
from sparsenets.allocation import layer_sparsities
from sparsenets.config import CRITERIA
from sparsenets.targets import find_units, to_gemm

from helpers import batches, convnet, mask_of, mlp

PATTERNS = ["unstructured", "block:4x3", "block:4x1", "block:1x4", "channel", "2:4"]


def _pruned(model, unit) -> int:
    return sum(int((~mask_of(model, m.qualname)).sum()) for m in unit.weights)


# N:M fixes each layer's sparsity, so it only pairs with uniform allocation (others are rejected)
COMBOS = [(p, a) for p in PATTERNS for a in ("uniform", "global", "erk") if p != "2:4" or a == "uniform"]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("pattern,allocation", COMBOS)
def test_achieved_sparsity_within_one_group(kind, pattern, criterion, allocation):
    model = mlp() if kind == "mlp" else convnet()
    exclude = ["0"] if (pattern == "2:4" and kind == "conv") else []  # 3·3·3 = 27 inputs: not a multiple of 4
    config = sn.SparsityConfig(pattern=pattern, sparsity=0.5 if pattern == "2:4" else 0.7, criterion=criterion,
                               allocation=allocation, exclude=exclude, rounds=4 if criterion == "synflow" else None)
    units = find_units(model, config)
    targets = layer_sparsities(units, config.sparsity, config.allocation)
    sn.sparsify_(model, config, data=batches(kind))
    if allocation == "global":
        pruned = sum(_pruned(model, u) for u in units)
        total = sum(u.numel for u in units)
        biggest = max(float(u.group_sizes().max()) for u in units)
        assert abs(pruned - config.sparsity * total) <= biggest
    else:
        for unit in units:
            biggest = 1 if pattern == "2:4" else float(unit.group_sizes().max())
            assert abs(_pruned(model, unit) - targets[unit.name] * unit.numel) <= biggest, unit.name


def test_erk_scales_densities_by_the_kernel_ratio_and_caps_at_dense():
    model = convnet()
    config = sn.SparsityConfig(sparsity=0.5, allocation="erk")
    units = find_units(model, config)
    targets = layer_sparsities(units, 0.5, "erk")
    total = sum(u.numel for u in units)
    kept = sum((1 - targets[u.name]) * u.numel for u in units)
    assert kept == pytest.approx(0.5 * total)
    assert targets["9"] == 0.0  # the 12→5 classifier's ratio (17/60) would exceed density 1
    ratios = {"0": 17 / 216, "3": 30 / 1152, "7": 268 / 3072}
    scales = [(1 - targets[n]) / r for n, r in ratios.items()]
    assert scales == pytest.approx([scales[0]] * 3)


def _linear(rows: int, cols: int) -> nn.Module:
    layer = nn.Linear(cols, rows)
    nn.init.normal_(layer.weight)
    return nn.Sequential(layer)


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), r=st.integers(1, 9), c=st.integers(1, 9),
       sparsity=st.floats(0, 0.95), seed=st.integers(0, 3))
def test_block_masks_are_constant_on_blocks_and_hit_the_target(rows, cols, r, c, sparsity, seed):
    torch.manual_seed(seed)
    model = _linear(rows, cols)
    if r > rows or c > cols:
        with pytest.raises(ValueError, match=f"block {r}x{c} is larger"):
            sn.sparsify_(model, {"pattern": f"block:{r}x{c}", "sparsity": sparsity})
        return
    sn.sparsify_(model, {"pattern": f"block:{r}x{c}", "sparsity": sparsity})
    mask = mask_of(model, "0.weight")
    for i in range(0, rows, r):
        for j in range(0, cols, c):
            tile = mask[i:i + r, j:j + c]
            assert tile.all() or not tile.any()
    assert abs(int((~mask).sum()) - sparsity * rows * cols) <= r * c
    assert mask.any()


@given(n=st.integers(1, 7), extra=st.integers(1, 6), groups=st.integers(1, 6), rows=st.integers(1, 12),
       criterion=st.sampled_from(["magnitude", "random"]))
def test_nm_groups_hold_exactly_n_nonzeros(n, extra, groups, rows, criterion):
    m = n + extra
    model = _linear(rows, m * groups)
    before = model[0].weight.detach().clone()
    sn.sparsify_(model, {"pattern": f"{n}:{m}", "criterion": criterion})
    weight = model[0].weight.detach()
    per_group = (weight != 0).reshape(rows, groups, m).sum(-1)
    assert (per_group == n).all()
    if criterion == "magnitude":  # the kept ones are the n largest of each group
        runs = before.abs().reshape(rows, groups, m)
        kept = (weight != 0).reshape(rows, groups, m)
        nth_largest = runs.topk(n, dim=-1).values[..., -1:]
        assert (runs[kept] >= nth_largest.expand_as(runs)[kept]).all()


@given(rows=st.integers(2, 30), cols=st.integers(1, 30), sparsity=st.floats(0, 0.95))
def test_channel_masks_cover_whole_rows_and_bias(rows, cols, sparsity):
    model = _linear(rows, cols)
    sn.sparsify_(model, {"pattern": "channel", "sparsity": sparsity})
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    mask = mask_of(model, "0.weight")
    assert (mask.all(1) | ~mask.any(1)).all()
    assert (bias[~mask.all(1)] == 0).all()
    assert abs(int((~mask.all(1)).sum()) - sparsity * rows) <= 1


def test_conv_weights_are_pruned_in_gemm_form():
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    sn.sparsify_(model, {"pattern": "2:4"})
    gemm = to_gemm(model[0], model[0].weight.detach())
    assert gemm.shape == (6, 36)
    assert ((gemm != 0).reshape(6, 9, 4).sum(-1) <= 2).all()
    sn.sparsify_(model := nn.Sequential(nn.Conv2d(4, 6, 3)), {"pattern": "block:3x12", "sparsity": 0.5})
    gemm = to_gemm(model[0], mask_of(model, "0.weight"))
    assert all(gemm[i:i + 3, j:j + 12].unique().numel() == 1 for i in (0, 3) for j in (0, 12, 24))


def test_magnitude_keeps_the_largest_weights():
    model = _linear(10, 10)
    before = model[0].weight.detach().clone()
    sn.sparsify_(model, {"sparsity": 0.6})
    kept = model[0].weight.detach() != 0
    assert int(kept.sum()) == 40
    assert before.abs()[kept].min() > before.abs()[~kept].max()
    assert torch.equal(model[0].weight.detach()[kept], before[kept])


def test_wanda_prunes_every_output_row_equally():
    model = _linear(7, 16)
    data = [(torch.randn(32, 16) * torch.linspace(0.1, 3, 16), torch.randint(0, 7, (32,)))]
    sn.sparsify_(model, {"criterion": "wanda", "sparsity": 0.5}, data=data)
    per_row = (model[0].weight != 0).sum(1)
    assert (per_row == 8).all()


def test_repeated_sparsify_keeps_pruned_weights_pruned():
    for criterion in ("magnitude", "random"):
        model = mlp()
        sn.sparsify_(model, {"sparsity": 0.5, "criterion": criterion, "seed": 1})
        first = {n: mask_of(model, f"{n}.weight").clone() for n in ("0", "2", "4")}
        sn.sparsify_(model, {"sparsity": 0.8, "criterion": criterion, "seed": 2})
        for n, before in first.items():
            after = mask_of(model, f"{n}.weight")
            assert not (after & ~before).any()  # nothing regrows
            assert abs((~after).float().mean().item() - 0.8) < 0.02


def test_iterative_rounds_reach_the_target():
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.9, "criterion": "synflow", "rounds": 10, "input_shape": [20]})
    report = sn.report(model)
    assert report.sparsity == pytest.approx(0.9, abs=0.01)


def test_global_never_empties_a_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(1e-6)  # a layer global magnitude would wipe out
    sn.sparsify_(model, {"sparsity": 0.5, "allocation": "global"})
    assert mask_of(model, "2.weight").any()


def test_overrides_fix_a_layer_and_the_allocation_shares_the_rest():
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.8, "overrides": {"4": 0.0, "0": {"sparsity": 0.5, "pattern": "block:4x4"}}})
    rows = {r.name: r for r in sn.report(model).rows}
    assert rows["4"].pattern == "dense" and rows["4"].density == 1.0
    assert rows["0"].pattern == "block:4x4" and rows["0"].density == pytest.approx(0.5, abs=16 / 640)
    assert rows["2"].density == pytest.approx(0.2, abs=1 / 768)


def test_include_exclude_types_and_first_last():
    model = convnet()
    sn.sparsify_(copy.deepcopy(model), {"include": ["3", "7"]})
    for config, expected in [
        ({"include": ["3", "7"]}, {"3", "7"}),
        ({"exclude": ["0", "9"]}, {"3", "7"}),
        ({"module_types": ["Conv2d"]}, {"0", "3"}),
        ({"keep_first_last_dense": True}, {"3", "7"}),
    ]:
        m = sn.sparsify_(copy.deepcopy(model), config)
        assert {r.name for r in sn.report(m).rows if r.pattern != "dense"} == expected, config


def test_same_seed_same_masks():
    a = sn.sparsify_(mlp(), {"criterion": "random", "seed": 3})
    b = sn.sparsify_(mlp(), {"criterion": "random", "seed": 3})
    c = sn.sparsify_(mlp(), {"criterion": "random", "seed": 4})
    assert torch.equal(mask_of(a, "0.weight"), mask_of(b, "0.weight"))
    assert not torch.equal(mask_of(a, "0.weight"), mask_of(c, "0.weight"))


def test_tied_weights_are_left_dense_with_a_warning():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight  # tied input/output embedding
    before = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="layer '2' shares its weight"):
        sn.sparsify_(model, {"sparsity": 0.5})
    assert torch.equal(model[0].weight, before)
    assert {r.name for r in sn.report(model).rows if r.pattern != "dense"} == {"1"}


def test_an_override_of_zero_keeps_a_layer_dense_under_nm():
    model = sn.sparsify_(mlp(), {"pattern": "2:4", "overrides": {"4": 0}})
    rows = {r.name: r for r in sn.report(model).rows}
    assert rows["4"].pattern == "dense" and rows["0"].density == 0.5


def test_a_bare_layer_is_a_model_too():
    layer = nn.Linear(16, 8)
    sn.sparsify_(layer, {"sparsity": 0.75, "pattern": "block:4x4"})
    assert (layer.weight == 0).float().mean().item() == 0.75
    assert [r.name for r in sn.report(layer).rows] == ["(model)"]
