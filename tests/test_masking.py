"""Masks without copies: the stored weight is kept zero where masked, returned as it is, and its
gradient masked in place; every way the weight can change must still give exactly ``original * mask``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.masking import attach, finalize_, parametrization_list


def _masked_linear(density: float = 0.3, seed: int = 0, dtype=torch.float32) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(37, 29).to(dtype)
    mask = torch.rand(29, 37) < density
    attach(layer, "weight", mask, "unstructured")
    return layer, mask


def _original(layer: nn.Module) -> torch.Tensor:
    return parametrization_list(layer, "weight").original


def _reference(layer: nn.Module, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute: the product with ``original * mask``."""
    return F.linear(x, _original(layer).detach() * mask, layer.bias.detach())


def test_the_weight_is_the_stored_tensor_not_a_copy():
    layer, mask = _masked_linear()
    assert layer.weight.data_ptr() == _original(layer).data_ptr()
    assert torch.equal(layer.weight, _original(layer) * mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda p: torch.optim.Adam(p, lr=0.01),
                                  lambda p: torch.optim.AdamW(p, lr=0.01, foreach=False)])
def test_gradients_are_masked_and_masked_weights_stay_zero(dtype, make):
    layer, mask = _masked_linear(dtype=dtype)
    optimizer = make(layer.parameters())
    for _ in range(4):
        x = torch.randn(8, 37, dtype=dtype)
        loss = layer(x).square().sum()
        optimizer.zero_grad()
        loss.backward()
        grad = _original(layer).grad
        assert torch.all(grad[~mask] == 0) and torch.any(grad[mask] != 0)
        optimizer.step()
    assert torch.all(_original(layer)[~mask] == 0)


def test_gradient_equals_the_masked_product_gradient():
    layer, mask = _masked_linear()
    reference = nn.Linear(37, 29)
    with torch.no_grad():
        reference.weight.copy_(_original(layer) * mask)
        reference.bias.copy_(layer.bias)
    x = torch.randn(6, 37)
    layer(x).sin().sum().backward()
    reference(x).sin().sum().backward()
    torch.testing.assert_close(_original(layer).grad, reference.weight.grad * mask)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def _trained_then_pruned(optimizer_class=torch.optim.SGD, **options):
    """A layer trained dense with an optimizer that keeps state, then masked sparser: the state
    (momentum) still holds values where the weights are now pruned."""
    layer, _ = _masked_linear(density=1.0)
    optimizer = optimizer_class(layer.parameters(), **options)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 37)).square().sum().backward()
        optimizer.step()
    sparser = torch.rand(29, 37) < 0.2
    attach(layer, "weight", sparser, "unstructured")  # zeroes the weights, not the optimizer's momentum
    return layer, sparser, optimizer


@pytest.mark.parametrize("optimizer_class, options", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                                      (torch.optim.Adam, {"lr": 0.01})])
def test_momentum_left_over_from_a_denser_mask_cannot_revive_pruned_weights(optimizer_class, options):
    layer, sparser, optimizer = _trained_then_pruned(optimizer_class, **options)
    x = torch.randn(5, 37)
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(8, 37)).square().sum().backward()
        optimizer.step()
        state = optimizer.state[_original(layer)]
        moments = [v for v in state.values() if v.shape == sparser.shape]
        assert moments and all(torch.all(v[~sparser] == 0) for v in moments)  # zeroed before the step
        assert torch.all(_original(layer)[~sparser] == 0)
        torch.testing.assert_close(layer(x), _reference(layer, sparser, x))


def test_a_gradient_changed_after_masking_is_caught_by_the_forward(monkeypatch):
    """Gradient centralisation subtracts the mean: masked entries get a gradient, and momentum."""
    layer, sparser, optimizer = _trained_then_pruned(torch.optim.SGD, lr=0.1, momentum=0.9)
    x = torch.randn(5, 37)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 37)).square().sum().backward()
        grad = _original(layer).grad
        grad -= grad.mean(1, keepdim=True)
        optimizer.step()
        assert torch.any(_original(layer)[~sparser] != 0)  # the optimizer moved pruned weights...
        torch.testing.assert_close(layer(x), _reference(layer, sparser, x))  # ...the forward does not see them
        assert torch.all(_original(layer)[~sparser] == 0)  # and they are zero again


def test_a_plain_training_loop_reads_the_weight_for_no_check(monkeypatch):
    from sparsenets import mask_upkeep

    layer, mask = _masked_linear()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    checks = []
    check = mask_upkeep.kernels.zero_dropped_
    monkeypatch.setattr(mask_upkeep.kernels, "zero_dropped_", lambda t, k: checks.append(1) or check(t, k))
    x = torch.randn(5, 37)
    for _ in range(4):
        optimizer.zero_grad()
        layer(torch.randn(8, 37)).square().sum().backward()
        optimizer.step()
    assert len(checks) == 1  # the first forward; after that every step is known to keep zeros
    torch.testing.assert_close(layer(x), _reference(layer, mask, x))
    assert torch.all(_original(layer)[~mask] == 0)


class _DenseUpdate(torch.optim.Optimizer):
    """Moves every weight, zero gradient or not (as Muon's or Shampoo's matrix updates do)."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01 * torch.ones_like(p))


def test_an_optimizer_that_moves_every_weight_changes_nothing_masked():
    layer, mask = _masked_linear()
    optimizer = _DenseUpdate(layer.parameters())
    x = torch.randn(5, 37)
    for _ in range(2):
        layer(x).sum().backward()
        optimizer.step()
        torch.testing.assert_close(layer(x), _reference(layer, mask, x))


def test_loading_a_dense_state_or_writing_the_weight_keeps_the_mask():
    layer, mask = _masked_linear()
    x = torch.randn(5, 37)
    state = layer.state_dict()
    state["parametrizations.weight.original"] = torch.randn(29, 37)  # dense values everywhere
    layer.load_state_dict(state)
    torch.testing.assert_close(layer(x), _reference(layer, mask, x))
    with torch.no_grad():
        _original(layer).fill_(1.0)
    torch.testing.assert_close(layer(x), _reference(layer, mask, x))
    assert torch.all(_original(layer)[~mask] == 0)


def test_a_gradient_shared_with_another_tensor_is_not_masked_for_it():
    """``weight + delta``: autograd hands both the same gradient; delta's must stay whole."""
    layer, mask = _masked_linear()
    delta = torch.zeros(29, 37, requires_grad=True)
    x = torch.randn(4, 37)
    F.linear(x, layer.weight + delta).square().sum().backward()
    assert torch.all(delta.grad[~mask] != 0)
    assert torch.all(_original(layer).grad[~mask] == 0)


def test_autograd_grad_of_the_effective_weight_is_dense():
    layer, mask = _masked_linear()
    weight = layer.weight
    (grad,) = torch.autograd.grad(F.linear(torch.randn(4, 37), weight).square().sum(), [weight])
    assert torch.any(grad[~mask] != 0)  # what RigL and SNIP-style criteria read


def test_frozen_then_trained_again_masks_gradients():
    layer, mask = _masked_linear()
    _original(layer).requires_grad_(False)
    layer(torch.randn(3, 37)).sum()  # no hook on a tensor without gradients, and no error
    _original(layer).requires_grad_(True)
    layer(torch.randn(3, 37)).square().sum().backward()
    assert torch.all(_original(layer).grad[~mask] == 0)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_mask_their_own_gradients(copier):
    layer, mask = _masked_linear()
    layer(torch.randn(3, 37)).sum().backward()  # the original is hooked
    twin = copier(layer)
    twin(torch.randn(3, 37)).square().sum().backward()
    assert torch.all(_original(twin).grad[~mask] == 0)
    assert _original(twin).data_ptr() != _original(layer).data_ptr()


def test_finalize_removes_the_gradient_masking():
    layer, mask = _masked_linear()
    layer(torch.randn(3, 37)).sum().backward()
    finalize_(layer)
    layer.weight.grad = None
    layer(torch.randn(3, 37)).square().sum().backward()
    assert torch.any(layer.weight.grad[~mask] != 0)  # a plain weight again, trained everywhere
