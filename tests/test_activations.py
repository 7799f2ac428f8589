import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.activations import activation_density
from sparsenets.layers import TopK


def _mlp(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), activation, nn.Linear(32, 3))


def test_relu_density_counts_nonzero_outputs_over_all_batches():
    model = _mlp(nn.ReLU())
    batches = [(torch.randn(8, 10), None) for _ in range(3)]
    hidden = torch.cat([torch.relu(model[0](x)) for x, _ in batches])
    expected = (hidden > 0).float().mean().item()
    assert activation_density(model, batches) == {"1": pytest.approx(expected)}
    first_only = (hidden[:8] > 0).float().mean().item()
    assert activation_density(model, batches, max_batches=1)["1"] == pytest.approx(first_only)


def test_gelu_uses_the_threshold():
    model = _mlp(nn.GELU())
    x = torch.randn(16, 10)
    hidden = nn.functional.gelu(model[0](x))
    assert activation_density(model, [x])["1"] == 1.0
    density = activation_density(model, [x], threshold=0.1)["1"]
    assert density == pytest.approx((hidden.abs() > 0.1).float().mean().item())
    with pytest.raises(ValueError, match="-1"):
        activation_density(model, [x], threshold=-1)


def test_restores_training_mode_and_leaves_gradients_alone():
    model = _mlp(nn.ReLU()).train()
    activation_density(model, [torch.randn(4, 10)])
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_topk_keeps_the_k_largest_per_row():
    x = torch.tensor([[3.0, -1.0, 2.0, 5.0], [0.5, 0.1, -2.0, 0.4]], requires_grad=True)
    y = TopK(2)(x)
    assert torch.equal(y, torch.tensor([[3.0, 0.0, 0.0, 5.0], [0.5, 0.0, 0.0, 0.4]]))
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float())
    assert torch.equal(TopK(10)(x), x)
    with pytest.raises(ValueError, match="k must"):
        TopK(0)


def test_topk_density_is_k_over_width():
    model = _mlp(TopK(8))
    assert activation_density(model, [torch.randn(20, 10)])["1"] == pytest.approx(8 / 32)


def test_report_shows_input_density_only_with_data():
    model = _mlp(TopK(4))
    x = torch.randn(6, 10)
    plain, measured = sn.report(model), sn.report(model, [(x, torch.zeros(6))])
    assert "input density" not in str(plain) and all(r.input_density is None for r in plain.rows)
    rows = {r.name: r for r in measured.rows}
    assert rows["2"].input_density == pytest.approx(4 / 32)
    assert rows["0"].input_density == 1.0
    assert "input density" in str(measured) and "0.125" in str(measured)
    assert measured.to_dict()["layers"][1]["input_density"] == pytest.approx(0.125)
