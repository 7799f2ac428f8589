"""BLK-REW: the reweighted group-lasso penalty, its refresh, and the block structure it prunes to."""

from pathlib import Path

import pytest
import torch
from torch import nn

from sparsenets import report
from sparsenets.methods import BlockReweighted
from sparsenets.targets import to_gemm

CONFIG = {"sparsity": 0.75, "pattern": "block:2x1", "criterion": "magnitude", "allocation": "uniform"}


def hand_penalty(weight: torch.Tensor, old: torch.Tensor, rows: int, strength: float, eps: float) -> torch.Tensor:
    """λ Σ_g ‖W_g‖² / (‖W_g^old‖² + ε), groups = columns inside blocks of ``rows`` rows, by loops."""
    total = torch.zeros((), dtype=weight.dtype)
    for r in range(0, weight.shape[0], rows):
        for c in range(weight.shape[1]):
            total = total + (weight[r:r + rows, c] ** 2).sum() / ((old[r:r + rows, c] ** 2).sum() + eps)
    return strength * total


def test_penalty_and_gradient_match_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    layer = model[0]
    old = layer.weight.detach().clone()
    method = BlockReweighted(model, CONFIG, strength=0.5, eps=0.1)
    with torch.no_grad():
        layer.weight.mul_(1.5).add_(0.1)  # W moves away from W^old, which is not refreshed yet
    assert torch.allclose(method.penalty(), hand_penalty(layer.weight.detach(), old, 2, 0.5, 0.1))

    expected = layer.weight.detach().clone().requires_grad_()
    hand_penalty(expected, old, 2, 0.5, 0.1).backward()
    layer.weight.grad = torch.ones_like(layer.weight)  # the loss's gradient, which the penalty adds to
    method.before_optimizer_step(1)
    assert torch.allclose(layer.weight.grad, 1 + expected.grad)


def test_refresh_every_steps_takes_the_new_weights_as_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    layer = model[0]
    with torch.no_grad():
        layer.weight.normal_()  # groups far larger than ε, so each contributes ≈ ‖W_g‖² / ‖W_g^old‖²
    method = BlockReweighted(model, CONFIG, strength=1.0, refresh_every=3, eps=1e-6)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert torch.allclose(method.penalty(), torch.tensor(4.0) * _group_count(layer), rtol=1e-2)
    method.step(2)  # not a refresh step
    assert method.penalty().item() > 3.9 * _group_count(layer)
    method.step(3)  # refresh: W^old = W, so each group contributes ‖W_g‖² / (‖W_g‖² + ε) ≈ 1
    assert torch.allclose(method.penalty(), hand_penalty(layer.weight.detach(), layer.weight.detach(), 2, 1.0, 1e-6))
    assert torch.allclose(method.penalty(), torch.tensor(1.0) * _group_count(layer), rtol=1e-2)


def _group_count(layer: nn.Linear) -> float:
    rows, cols = layer.weight.shape
    return float(-(-rows // 2) * cols)


def test_penalty_shrinks_small_groups_faster_than_large_ones():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.1], [1.0, 0.1]]))
    method = BlockReweighted(model, CONFIG, strength=1e-3, eps=1e-6)
    layer.weight.grad = None
    method.before_optimizer_step(1)
    relative = layer.weight.grad / layer.weight.detach()
    assert relative[0, 1] > 50 * relative[0, 0]


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)),
                                  lambda: nn.Sequential(nn.Conv1d(4, 16, 3), nn.ReLU(), nn.Conv1d(16, 8, 3))])
def test_prune_leaves_column_strips_within_row_blocks_at_exact_sparsity(make):
    torch.manual_seed(0)
    model = make()
    config = {"sparsity": 0.75, "pattern": "block:8x1", "criterion": "magnitude", "allocation": "uniform"}
    method = BlockReweighted(model, config, strength=1e-2, refresh_every=2, prune_at=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 12) if isinstance(model[0], nn.Linear) else torch.randn(32, 4, 12)
    for step in range(1, 8):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.step(step)
    assert method.done
    assert report(model).density == pytest.approx(0.25)
    for layer in (model[0], model[2]):
        gemm = to_gemm(layer, layer.weight.detach())
        strips = (gemm != 0).reshape(gemm.shape[0] // 8, 8, gemm.shape[1])
        kept = strips.any(dim=1)
        assert torch.equal(strips, kept[:, None, :].expand_as(strips))  # all 8 rows or none
        assert kept.float().mean().item() == pytest.approx(0.25)


def test_decoupled_penalty_is_a_proximal_step_at_the_current_learning_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    layer = model[0]
    old = layer.weight.detach().clone()
    method = BlockReweighted(model, CONFIG, strength=0.5, eps=0.1, refresh_every=100, decoupled=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.2)
    method.on_train_begin(model, optimizer)
    optimizer.param_groups[0]["lr"] = 0.05  # a scheduler moved it: the shrink must use the new value
    layer.weight.grad = torch.ones_like(layer.weight)
    method.before_optimizer_step(1)
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))  # gradients untouched
    before = layer.weight.detach().clone()
    method.step(1)
    norms = torch.stack([(old[r:r + 2] ** 2).sum(0) for r in (0, 2)])  # blocks of 2 rows, per column
    coefficient = (1 / (norms + 0.1)).repeat_interleave(2, dim=0)
    assert torch.allclose(layer.weight.detach(), before / (1 + 2 * 0.05 * 0.5 * coefficient))


def test_decoupled_penalty_needs_the_optimizer():
    model = nn.Sequential(nn.Linear(4, 4))
    method = BlockReweighted(model, CONFIG, decoupled=True)
    with pytest.raises(RuntimeError, match="on_train_begin"):
        method.step(1)


def test_recurrent_weights_are_penalised_and_pruned_in_column_strips():
    torch.manual_seed(0)
    model = nn.LSTM(6, 8, num_layers=2)  # four gates stacked: weight_ih_l0 is 32 x 6
    config = {"sparsity": 0.5, "pattern": "block:8x1", "criterion": "magnitude", "allocation": "uniform"}
    method = BlockReweighted(model, config, strength=0.1, eps=0.1)
    assert [m.param for m in method.members] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    old = {name: getattr(model, name).detach().clone() for name in ("weight_ih_l0", "weight_hh_l1")}
    assert torch.allclose(method.penalty(), sum(
        hand_penalty(w, w, 8, 0.1, 0.1) for w in [getattr(model, m.param).detach() for m in method.members]))
    model(torch.randn(5, 3, 6))[0].sum().backward()
    method.before_optimizer_step(1)
    method.apply()
    for name, weight in old.items():
        pruned = getattr(model, name).detach()
        strips = (pruned != 0).reshape(pruned.shape[0] // 8, 8, pruned.shape[1])
        assert torch.equal(strips, strips.any(dim=1, keepdim=True).expand_as(strips))
        assert torch.equal(pruned[pruned != 0], weight[pruned != 0])
    assert report(model).density == pytest.approx(0.5)


def test_penalty_stops_after_pruning_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    layer = model[0]
    method = BlockReweighted(model, CONFIG, strength=1.0)
    method.apply()
    layer.parametrizations.weight.original.grad = None
    method.before_optimizer_step(1)
    assert layer.parametrizations.weight.original.grad is None
    assert (layer.weight == 0).float().mean().item() == pytest.approx(0.75)


def test_bad_options_name_the_value():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="-1"):
        BlockReweighted(model, CONFIG, strength=-1)
    with pytest.raises(ValueError, match="refresh_every"):
        BlockReweighted(model, CONFIG, refresh_every=0)
    with pytest.raises(ValueError, match="2:4"):
        BlockReweighted(model, {"sparsity": 0.5, "pattern": "2:4"})
    with pytest.raises(ValueError, match="'yes'"):
        BlockReweighted(model, CONFIG, decoupled="yes")


def test_protocol_lists_dense_blkrew_and_oneshot_arms():
    from sparsenets.experiments.protocols import PROTOCOLS
    from sparsenets.experiments.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "blkrew_mnist1d_mlp.yaml")
    jobs = PROTOCOLS["blkrew"].jobs(recipe)
    assert {(j.arm, j.target) for j in jobs} == {("dense", 0.0), ("blkrew", 0.8), ("blkrew", 0.9),
                                                  ("oneshot", 0.8), ("oneshot", 0.9)}
    assert all(j.parent == f"seed{j.seed}-dense" for j in jobs if j.arm == "oneshot")
