"""Sparse training from scratch: static masks, SET and RigL (unstructured and block), in a user loop and a recipe."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from sparsenets import SparsityConfig, sparsify_
from sparsenets.config import ConfigError
from sparsenets.experiments import load_recipe, run_recipe
from sparsenets.masking import get_mask, masks
from sparsenets.methods import SET, RigL, StaticSparse

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def mask_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: mask.mask.clone() for name, _, _, mask in masks(model)}


def train(model, method, steps: int, optimizer_name: str = "sgd", on_step=None, seed: int = 0):
    """A plain user loop: optimizer built after the method, on_train_begin, step() after optimizer.step()."""
    generator = torch.Generator().manual_seed(seed)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    method.on_train_begin(model, optimizer)
    for step in range(1, steps + 1):
        x = torch.randn(32, 16, generator=generator)
        loss = F.cross_entropy(model(x), x[:, :4].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        before = mask_state(model)
        method.step(step)
        if on_step is not None:
            on_step(step, before, mask_state(model), optimizer)
    return optimizer


ALGORITHMS = [SET, RigL]
PATTERNS = ["unstructured", "block:4x4"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_update_keeps_each_layer_exactly_at_its_count_and_moves_the_drop_fraction(algorithm, pattern):
    model = mlp()
    method = algorithm(model, {"sparsity": 0.8, "pattern": pattern}, update_every=3, drop_fraction=0.4, end_step=30)
    counts = {name: int(m.sum()) for name, m in mask_state(model).items()}
    updates = []

    def check(step, before, after, optimizer):
        assert {name: int(m.sum()) for name, m in after.items()} == counts
        if method.is_update_step(step):
            updates.append(step)
            fraction = method.drop_fraction_at(step)
            for name, old in before.items():
                new = after[name]
                # what is dropped is not regrown in the same update, so dropped + grown = 2 × the drop count
                active_groups = int(old.sum()) // (16 if pattern != "unstructured" else 1)
                expected = round(fraction * active_groups) * (16 if pattern != "unstructured" else 1)
                assert int((old & ~new).sum()) == int((new & ~old).sum()) == expected
        else:
            assert all(torch.equal(before[n], after[n]) for n in before)

    train(model, method, 31, on_step=check)
    assert updates == list(range(3, 30, 3))
    assert len(method.updates) == len(updates)


def test_rigl_drop_fraction_decays_on_a_cosine():
    method = RigL(mlp(), {"sparsity": 0.9}, update_every=10, drop_fraction=0.3, end_step=100)
    assert method.drop_fraction_at(0) == pytest.approx(0.3)
    assert method.drop_fraction_at(50) == pytest.approx(0.15)
    assert method.drop_fraction_at(100) == pytest.approx(0.0)
    assert method.is_update_step(90) and not method.is_update_step(100) and not method.is_update_step(95)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_regrown_weights_start_at_zero_with_fresh_optimizer_state(algorithm, optimizer_name):
    model = mlp()
    method = algorithm(model, {"sparsity": 0.7}, update_every=5, drop_fraction=0.5)
    seen = []

    def check(step, before, after, optimizer):
        if not method.is_update_step(step):
            return
        for (name, module, tensor, _), (_, old), (_, new) in zip(masks(model), before.items(), after.items()):
            grown, dropped = new & ~old, old & ~new
            assert grown.any()
            original = module.parametrizations[tensor].original
            assert (original[grown] == 0).all() and (original[dropped] == 0).all()
            assert (getattr(module, tensor)[grown] == 0).all()
            state = optimizer.state[original]
            keys = ["momentum_buffer"] if optimizer_name == "sgd" else ["exp_avg", "exp_avg_sq"]
            for key in keys:
                assert (state[key][grown] == 0).all()
                assert state[key][new & old].abs().sum() > 0  # only the regrown entries are reset
            seen.append(name)

    train(model, method, 10, optimizer_name, on_step=check)
    assert len(seen) == 2 * 3


def test_rigl_grows_where_the_dense_gradient_is_largest_and_drops_the_smallest_weights():
    model = nn.Sequential(nn.Linear(10, 1, bias=False))
    layer = model[0]
    method = RigL(model, {"sparsity": 0.5, "allocation": "uniform"}, update_every=1, drop_fraction=0.4)
    mask = get_mask(layer, "weight").mask.clone()
    active, inactive = mask[0].nonzero().flatten(), (~mask[0]).nonzero().flatten()
    with torch.no_grad():
        # active weights 1..5 in magnitude: the two smallest go
        layer.parametrizations.weight.original[0, active] = torch.tensor([3.0, -1.0, 5.0, 0.5, -4.0])
    gradient = torch.zeros(1, 10)
    gradient[0, inactive] = torch.tensor([0.1, -9.0, 0.2, 7.0, 0.3])  # signs don't matter: |grad|
    gradient[0, active] = 100.0  # active positions never count as growth candidates
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    method.on_train_begin(model, optimizer)
    (layer.weight * gradient).sum().backward()  # d loss / d effective weight = gradient, masked or not
    optimizer.step()
    method.step(1)
    new = get_mask(layer, "weight").mask[0]
    kept = set(active[[0, 2, 4]].tolist())
    grown = set(inactive[[1, 3]].tolist())
    assert set(new.nonzero().flatten().tolist()) == kept | grown


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_block_variants_move_whole_blocks(algorithm):
    model = mlp()
    method = algorithm(model, {"sparsity": 0.75, "pattern": "block:4x8"}, update_every=2, drop_fraction=0.5)
    start = mask_state(model)
    train(model, method, 8)
    end = mask_state(model)
    assert any(not torch.equal(start[n], end[n]) for n in start)
    for mask in end.values():
        rows, cols = mask.shape
        blocks = mask.reshape(rows // 4, 4, cols // 8, 8).permute(0, 2, 1, 3).reshape(rows // 4, cols // 8, 32)
        assert (blocks.all(-1) | ~blocks.any(-1)).all()


def test_rigl_block_grows_the_block_with_the_largest_mean_gradient():
    model = nn.Sequential(nn.Linear(8, 2, bias=False))  # four 2x2 blocks side by side
    layer = model[0]
    method = RigL(model, {"sparsity": 0.5, "pattern": "block:2x2", "allocation": "uniform"},
                  update_every=1, drop_fraction=0.5)
    mask = get_mask(layer, "weight").mask.clone()
    block_on = mask[0, ::2]  # one entry per block
    off = (~block_on).nonzero().flatten()
    gradient = torch.zeros(2, 8)
    gradient[:, 2 * off[0]:2 * off[0] + 2] = 1.0
    gradient[:, 2 * off[1]:2 * off[1] + 2] = 2.0
    gradient[0, 2 * off[0]] = 9.0  # block means 3.0 and 2.0: the largest entry alone doesn't decide, the mean does
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    method.on_train_begin(model, optimizer)
    (layer.weight * gradient).sum().backward()
    optimizer.step()
    method.step(1)
    new_on = get_mask(layer, "weight").mask[0, ::2]
    assert int(new_on.sum()) == 2 and bool(new_on[off[0]])


def test_same_seed_same_masks_other_seed_other_masks():
    def run(seed: int) -> dict:
        model = mlp()
        train(model, SET(model, {"sparsity": 0.9, "seed": seed}, update_every=2), 10)
        return mask_state(model)

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


RANDOM_ERK = {"criterion": "random", "allocation": "erk"}


@pytest.mark.parametrize("method", [StaticSparse, SET, RigL])
def test_a_dict_config_and_the_same_sparsity_config_give_the_same_masks(method):
    a, b = mlp(), mlp()
    method(a, {"sparsity": 0.9})
    method(b, SparsityConfig(sparsity=0.9))
    assert all(torch.equal(x, y) for x, y in zip(mask_state(a).values(), mask_state(b).values()))
    assert get_mask(a[0], "weight").pattern == "unstructured"
    magnitude = sparsify_(mlp(), {"sparsity": 0.9})  # the config's defaults: magnitude, uniform
    assert torch.equal(get_mask(a[0], "weight").mask, get_mask(magnitude[0], "weight").mask)


def test_static_keeps_its_random_erk_mask_and_the_model_stays_copyable():
    model = mlp()
    method = StaticSparse(model, {"sparsity": 0.9, **RANDOM_ERK})
    start = mask_state(model)
    densities = [float(m.float().mean()) for m in start.values()]
    assert densities[0] < densities[-1]  # ERK: the small last layer is denser
    train(model, method, 5)
    assert all(torch.equal(start[n], m) for n, m in mask_state(model).items())
    rigl_model = mlp()
    train(rigl_model, RigL(rigl_model, {"sparsity": 0.9}, update_every=4), 5)
    for copied in (copy.deepcopy(rigl_model), pickle.loads(pickle.dumps(rigl_model))):
        assert all(torch.equal(a, b) for a, b in zip(mask_state(copied).values(), mask_state(rigl_model).values()))


def test_rigl_without_a_backward_pass_says_what_to_call():
    model = mlp()
    method = RigL(model, {"sparsity": 0.9}, update_every=1)
    with pytest.raises(RuntimeError, match="on_train_begin"):
        method.step(1)


@pytest.mark.parametrize("bad, message", [
    ({"pattern": "2:4"}, "2:4"), ({"update_every": 0}, "update_every"), ({"drop_fraction": 1.5}, "drop_fraction"),
])
def test_bad_input_is_named(bad, message):
    config = {"sparsity": 0.5, "pattern": bad.pop("pattern", "unstructured")}
    with pytest.raises(ValueError, match=message):
        SET(mlp(), config, **bad)


def _options(method: dict) -> str:
    return "".join(f", {k}: {v}" for k, v in method.items())


def tiny_dst_recipe(tmp_path, **method):
    path = tmp_path / "dst.yaml"
    path.write_text(
        "name: tiny_dst\nseeds: [0]\n"
        "data: {name: teacher, train_samples: 256, test_samples: 128, inputs: 12, classes: 4}\n"
        "model: {name: lenet_300_100, hidden: [24, 16]}\n"
        "train: {optimizer: adam, lr: 0.01, epochs: 2, batch_size: 64}\n"
        f"method: {{name: sparse_training, sparsities: [0.8], update_every: 2{_options(method)}}}\n"
        "sparsity: {criterion: random, allocation: erk}\n")
    return path


def test_recipe_runs_every_arm_and_resumes(tmp_path):
    recipe = load_recipe(tiny_dst_recipe(tmp_path))
    results = run_recipe(recipe, tmp_path / "run", Console(quiet=True))
    assert results["complete"]
    assert [row["arm"] for row in results["jobs"]] == ["dense", "static", "set", "rigl"]
    sparse = [row for row in results["jobs"] if row["arm"] != "dense"]
    assert all(0.1 < row["remaining"] <= 0.2 + 1e-6 for row in sparse)  # nonzeros: at most the mask's 20%
    assert (tmp_path / "run" / "plots" / "accuracy_vs_remaining.png").exists()
    assert run_recipe(recipe, tmp_path / "run", Console(quiet=True)) == results
    with pytest.raises(ConfigError, match="algorithms"):
        load_recipe(tiny_dst_recipe(tmp_path, algorithms="[snip]"))
