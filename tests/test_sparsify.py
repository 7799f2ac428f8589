"""Achieved sparsity, pattern structure and selection for every pattern × criterion × allocation."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsenets as sn
from sparsenets.allocation import layer_sparsities
from sparsenets.criteria import CRITERIA
from sparsenets.targets import find_units, to_gemm

from helpers import batches, convnet, mask_of, mlp

PATTERNS = ["unstructured", "block:4x3", "block:4x1", "block:1x4", "channel", "2:4"]


def _pruned(model, unit) -> int:
    return sum(int((~mask_of(model, m.qualname)).sum()) for m in unit.weights)


# N:M fixes each layer's sparsity, so it only pairs with uniform allocation (others are rejected)
COMBOS = [(p, a) for p in PATTERNS for a in ("uniform", "global", "erk") if p != "2:4" or a == "uniform"]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("pattern,allocation", COMBOS)
def test_achieved_sparsity_within_one_group(kind, pattern, criterion, allocation):
    model = mlp() if kind == "mlp" else convnet()
    exclude = ["0"] if (pattern == "2:4" and kind == "conv") else []  # 3·3·3 = 27 inputs: not a multiple of 4
    config = sn.SparsityConfig(pattern=pattern, sparsity=0.5 if pattern == "2:4" else 0.7, criterion=criterion,
                               allocation=allocation, exclude=exclude, rounds=4 if criterion == "synflow" else None)
    units = find_units(model, config)
    targets = layer_sparsities(units, config.sparsity, config.allocation)
    if criterion == "sparsegpt" and (allocation == "global" or pattern == "channel"):
        # it never holds every layer's scores at once, and rebuilds rows it keeps, not whole channels
        with pytest.raises(sn.ConfigError, match="global|channel"):
            sn.sparsify_(model, config, data=batches(kind))
        return
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
    bias = model[0].bias.detach()
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


# ---- iterative pruning with a coarser pattern ------------------------------------------------------

@pytest.mark.parametrize("pattern, label", [("block:4x4", "mixed"), ("channel", "mixed"), ("2:4", "2:4")])
def test_a_coarser_second_pass_never_brings_a_weight_back(pattern, label):
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "criterion": "random"})
    before = {n: mask_of(model, f"{n}.weight").clone() for n in ("0", "2", "4")}
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": pattern})
    rows = {r.name: r for r in sn.report(model).rows}
    for n, first in before.items():
        assert not (mask_of(model, f"{n}.weight") & ~first).any(), n
        assert rows[n].pattern == label, n
        assert (model.get_submodule(n).weight[~first] == 0).all()


def test_a_coarser_pass_lands_on_its_target_counting_what_is_already_pruned():
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "criterion": "random"})
    sn.sparsify_(model, {"sparsity": 0.7, "pattern": "block:4x4"})
    for row in sn.report(model).rows:
        assert abs((1 - row.density) * row.numel - 0.7 * row.numel) <= 16, row.name


def test_a_pass_whose_structure_survives_keeps_its_pattern_name():
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "block:4x4"})
    sn.sparsify_(model, {"sparsity": 0.75, "pattern": "block:2x2"})  # 4x4 blocks are unions of 2x2 blocks
    assert {r.pattern for r in sn.report(model).rows} == {"block:2x2"}
    sn.sparsify_(model, {"sparsity": 0.8, "pattern": "channel"})
    assert {r.pattern for r in sn.report(model).rows} == {"mixed"}
    sn.sparsify_(model, {"sparsity": 0.9})
    assert {r.pattern for r in sn.report(model).rows} == {"unstructured"}


def test_a_mixed_model_compresses_and_saves(tmp_path):
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "criterion": "random"})
    sn.sparsify_(model, {"sparsity": 0.6, "pattern": "block:4x4"})
    x = torch.randn(3, 20)
    expected = model.eval()(x)
    sn.save(model, tmp_path / "m.safetensors")
    assert torch.allclose(sn.load(tmp_path / "m.safetensors", model=mlp()).eval()(x), expected, atol=1e-6)
    assert torch.allclose(sn.compress(model, example_input=x)(x), expected, atol=1e-5)


# ---- config sources, registries, report ----------------------------------------------------------

def test_a_missing_config_file_says_file_not_found(tmp_path):
    for call in (lambda p: sn.sparsify_(mlp(), p), sn.SparsityConfig.from_yaml):
        for path in ("nope.yaml", tmp_path / "nope.yml", "nope"):
            with pytest.raises(sn.ConfigError, match="file not found"):
                call(path)


@pytest.fixture
def registered():
    """Undo registrations a test makes in the criterion, allocation and pattern registries."""
    from sparsenets import allocation, criteria, patterns
    saved = dict(criteria.CRITERIA), dict(allocation.ALLOCATIONS), list(patterns._REGISTRY)
    yield
    criteria.CRITERIA.clear(), criteria.CRITERIA.update(saved[0])
    allocation.ALLOCATIONS.clear(), allocation.ALLOCATIONS.update(saved[1])
    patterns._REGISTRY[:] = saved[2]


def test_a_registered_criterion_is_a_config_choice_and_is_used(registered):
    from sparsenets.criteria import criterion

    @criterion("first_columns")
    def first_columns(model, weights, *_):  # keep the leftmost inputs
        return {k: -torch.arange(getattr(m, p).shape[1]).float().expand_as(getattr(m, p))
                for k, (m, p) in weights.items()}

    model = sn.sparsify_(mlp(), {"sparsity": 0.5, "criterion": "first_columns"})
    assert mask_of(model, "0.weight")[:, :10].all() and not mask_of(model, "0.weight")[:, 10:].any()
    with pytest.raises(sn.ConfigError, match="first_columns"):
        sn.SparsityConfig(criterion="nope")


def test_a_registered_allocation_is_a_config_choice_and_is_used(registered):
    from sparsenets.allocation import allocation

    @allocation("last_dense")
    def last_dense(units, sparsity):
        return {u.name: 0.0 if u is units[-1] else sparsity for u in units}

    model = sn.sparsify_(mlp(), {"sparsity": 0.5, "allocation": "last_dense"})
    densities = {r.name: r.density for r in sn.report(model).rows}
    assert densities == {"0": 0.5, "2": 0.5, "4": 1.0}


def test_a_registered_pattern_parses_and_prunes(registered):
    from dataclasses import dataclass

    from sparsenets.patterns import Pattern, parse_pattern, register_pattern

    @register_pattern
    @dataclass(frozen=True)
    class RowPairs(Pattern):
        syntax = "rowpairs"

        def group_ids(self, rows, cols):
            return (torch.arange(rows) // 2)[:, None].expand(rows, cols), -(-rows // 2)

    assert parse_pattern("RowPairs") == RowPairs()
    model = sn.sparsify_(mlp(), {"sparsity": 0.5, "pattern": "rowpairs"})
    kept_rows = mask_of(model, "0.weight").any(1).view(-1, 2)
    assert (kept_rows[:, 0] == kept_rows[:, 1]).all() and sn.report(model).rows[0].pattern == "rowpairs"
    with pytest.raises(sn.PatternError, match="rowpairs"):
        parse_pattern("nope")


def test_report_counts_a_tied_weight_once():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    model[2].weight = model[0].weight
    with pytest.warns(UserWarning):
        sn.sparsify_(model, {"sparsity": 0.5})
    report = sn.report(model)
    assert report.numel == 80 + 64 and report.nonzeros == 80 + 32
    assert [r.tied_to for r in report.rows] == [None, None, "0"] and "2 (= 0)" in str(report)


@given(rows=st.integers(1, 30), cols=st.integers(1, 30), r=st.integers(1, 6), c=st.integers(1, 6),
       conv=st.booleans(), seed=st.integers(0, 10))
def test_group_scores_of_a_plain_grid_equal_the_indexed_sums(rows, cols, r, c, conv, seed):
    """Units of one weight sum, select and expand their blocks by reshaping; every other unit goes
    through the group index of each entry. Both must give the same results."""
    from sparsenets.targets import Unit

    layer = nn.Conv1d(cols, rows, 1) if conv else nn.Linear(cols, rows)
    pattern = f"block:{min(r, rows)}x{min(c, cols)}" if seed % 3 else "unstructured"
    (unit,) = find_units(layer, sn.SparsityConfig(sparsity=0.5, pattern=pattern))
    scores = {unit.weights[0].qualname: torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(seed))}
    indexed = Unit(unit.name, unit.pattern, unit.members, unit.n_groups)
    indexed._grid = lambda: None  # the general path, as for units of several weights
    torch.testing.assert_close(unit.group_sizes(), indexed.group_sizes())
    torch.testing.assert_close(unit.group_scores(scores), indexed.group_scores(scores))
    name = unit.weights[0].qualname
    pruned = {name: scores[name].masked_fill(scores[name] < 0.3, float("-inf"))}  # some already pruned
    for got, want in zip(unit.live_groups(pruned), indexed.live_groups(pruned)):
        torch.testing.assert_close(got, want)
    keep = torch.rand(unit.n_groups, generator=torch.Generator().manual_seed(seed)) < 0.5
    masks = unit.expand(keep)
    assert torch.equal(masks[name], indexed.expand(keep)[name]) and masks[name].shape == layer.weight.shape
    assert unit.conforms(masks) and indexed.conforms(masks)
    ragged = {name: torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(seed)) < 0.5}
    assert unit.conforms(ragged) == indexed.conforms(ragged)
    assert unit.weights[0].group_ids is None  # the ids of every entry are never held
