"""N:M sparse training: SR-STE and progressive gradient flow keep N:M valid and train."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets import report
from sparsenets.masking import get_mask, masks
from sparsenets.methods import SRSTE, ProgressiveNM
from sparsenets.models import build_model


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("transformer", (40,), 10, dim=32, heads=4, layers=1, patch=4)


def _train(model, method, steps, on_step=None, lr=1e-2):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    method.on_train_begin(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=generator)
    y = (x[:, :20].sum(1) > 0).long()
    losses = []
    for step in range(1, steps + 1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        optimizer.step()
        method.step(step)
        losses.append(loss.item())
        if on_step:
            on_step(step)
    return losses


@pytest.mark.parametrize("pattern", ["2:4", "1:8", "3:16"])
def test_srste_is_nm_valid_after_every_step(pattern):
    model = _model()
    method = SRSTE(model, {"pattern": pattern, "exclude": ["embed"]})
    assert method.violations() == 0
    seen = []
    losses = _train(model, method, 15, on_step=lambda s: seen.append(method.violations()))
    assert seen == [0] * 15
    assert losses[-1] < losses[0]


def test_srste_gradient_reaches_pruned_weights_with_refined_decay():
    model = _model()
    method = SRSTE(model, {"pattern": "1:4", "exclude": ["embed"]}, decay=0.5)
    fc = model.blocks[0].mlp.fc1
    F.cross_entropy(model(torch.randn(8, 40)), torch.randint(0, 10, (8,))).backward()
    original = fc.parametrizations.weight.original
    mask = fc.parametrizations.weight[0].mask
    before = original.grad.clone()
    assert (before[~mask] != 0).any()  # straight-through: pruned weights have a gradient
    method.before_optimizer_step(1)
    added = original.grad - before
    torch.testing.assert_close(added[~mask], 0.5 * original.detach()[~mask])
    assert (added[mask] == 0).all()


def test_progressive_structure_and_decay_reach_nm_and_stay_valid():
    model = _model()
    method = ProgressiveNM(model, {"pattern": "1:16", "exclude": ["embed"]}, total_steps=24,
                           decay_end=0.5, structure=[4, 2, 1])
    p = method.parametrizations[0][2]
    assert (p.n, p.scale) == (4, 1.0)
    record = []
    _train(model, method, 24, on_step=lambda s: record.append((s, p.n, p.scale, method.violations())))
    assert [n for _, n, _, _ in record[:12]] == sorted([n for _, n, _, _ in record[:12]], reverse=True)
    assert {n for _, n, _, _ in record} == {4, 2, 1}
    assert all(scale > 0 and v > 0 for s, _, scale, v in record if s < 12)  # pruned weights still flow
    assert all(n == 1 and scale == 0 and v == 0 for s, n, scale, v in record if s >= 12)


def test_pruned_weights_gradient_is_scaled():
    model = _model()
    method = ProgressiveNM(model, {"pattern": "1:4", "exclude": ["embed"]}, total_steps=10)
    method.step(3)  # scale = 1 − 3/5 (the decay ends half-way)
    fc = model.blocks[0].mlp.fc1
    p = fc.parametrizations.weight[0]
    weight = fc.parametrizations.weight.original
    effective = fc.weight
    torch.testing.assert_close(effective[~p.mask], p.scale * weight.detach()[~p.mask])
    effective.sum().backward()
    torch.testing.assert_close(weight.grad[~p.mask], torch.full_like(weight.grad[~p.mask], p.scale))
    assert 0 < p.scale < 1


@pytest.mark.parametrize("make", [lambda m: SRSTE(m, {"pattern": "2:8", "exclude": ["embed"]}),
                                  lambda m: ProgressiveNM(m, {"pattern": "2:8", "exclude": ["embed"]}, total_steps=6)])
def test_finalize_gives_core_nm_masks(make):
    model = _model()
    method = make(model)
    _train(model, method, 6)
    x = torch.randn(5, 40)
    model.eval()
    expected = model(x)
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    method.finalize()
    found = list(masks(model))
    assert len(found) == len(method.parametrizations) and all(m.pattern == "2:8" for *_, m in found)
    torch.testing.assert_close(model(x), expected)
    layers = {layer.name: layer for layer in report(model).rows}
    assert layers["blocks.0.mlp.fc1"].density == pytest.approx(0.25)
    assert get_mask(model.embed, "weight") is None


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="'unstructured'"):
        SRSTE(_model(), {"sparsity": 0.5})
    with pytest.raises(ValueError, match="embed"):  # 4 inputs per output: not a multiple of 8
        SRSTE(_model(), {"pattern": "1:8"})
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        ProgressiveNM(_model(), {"pattern": "1:16", "exclude": ["embed"]}, total_steps=10, structure=[2, 4])
    with pytest.raises(ValueError, match="update_every"):
        SRSTE(_model(), {"pattern": "2:4", "exclude": ["embed"]}, update_every=0)
