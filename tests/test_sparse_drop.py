import copy
import pickle

import pytest
import torch
from torch import nn

from sparsenets.layers import SparseDrop


def _masked_dense(layer: SparseDrop, x, keep_blocks):
    mask = keep_blocks.repeat_interleave(layer.block)[: layer.in_features].to(x.dtype)
    return (x * mask / (1 - layer.p)) @ layer.weight.T + layer.bias


@pytest.mark.parametrize("in_features, block, p", [(64, 16, 0.5), (70, 16, 0.3), (33, 1, 0.2), (40, 64, 0.6)])
def test_matches_masked_dense_forward_and_backward(in_features, block, p):
    torch.manual_seed(0)
    layer = SparseDrop(in_features, 12, p=p, block=block)
    reference = copy.deepcopy(layer)
    x = torch.randn(9, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for seed in range(5):  # several draws, so both kept and dropped blocks are exercised
        torch.manual_seed(seed)
        y = layer(x)
        torch.manual_seed(seed)
        keep = layer.sample_keep()
        y_ref = _masked_dense(reference, x_ref, keep)
        torch.testing.assert_close(y, y_ref)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)


def test_drops_whole_blocks_at_rate_p():
    torch.manual_seed(0)
    layer = SparseDrop(4096, 1, p=0.3, block=8)
    keeps = torch.stack([layer.sample_keep() for _ in range(50)])
    assert keeps.shape == (50, 512)
    assert keeps.float().mean().item() == pytest.approx(0.7, abs=0.01)
    # Dropped blocks: weight columns get exactly zero gradient, kept ones don't.
    x = torch.randn(4, 4096)
    torch.manual_seed(1)
    layer(x).sum().backward()
    torch.manual_seed(1)
    keep = layer.sample_keep().repeat_interleave(8)
    column_touched = layer.weight.grad.abs().sum(0) > 0
    assert torch.equal(column_touched, keep)


def test_eval_is_plain_linear_and_from_linear_shares_parameters():
    linear = nn.Linear(20, 5)
    layer = SparseDrop.from_linear(linear, p=0.5, block=4).eval()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), linear(x))
    assert layer.train()(x).shape == (3, 5)
    no_bias = SparseDrop.from_linear(nn.Linear(20, 5, bias=False), p=0.1, block=4)
    assert no_bias.bias is None and no_bias(x).shape == (3, 5)


def test_keeps_state_dict_deepcopy_pickle_and_leading_dims():
    layer = SparseDrop(16, 8, p=0.5, block=4)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(layer)))
    assert (clone.p, clone.block) == (0.5, 4)
    linear = nn.Linear(16, 8)
    linear.load_state_dict(layer.state_dict())  # same keys as nn.Linear
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 8)


@pytest.mark.parametrize("kwargs, message", [({"p": 1.0}, "p must be"), ({"p": -0.1}, "p must be"),
                                             ({"block": 0}, "block must be")])
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseDrop(8, 8, **kwargs)
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseDrop.from_linear(nn.Conv1d(1, 1, 1))


# ---- swapping layers in, and the dropout protocol ------------------------------------------------


def test_sparse_drop_swaps_every_linear_but_the_first_and_keeps_the_weights():
    from sparsenets.layers import sparse_drop_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    keys, weight = list(model.state_dict()), model[2].weight
    assert sparse_drop_(model, p=0.25, block=4) == ["2", "4"]
    assert type(model[0]) is nn.Linear and isinstance(model[2], SparseDrop) and isinstance(model[4], SparseDrop)
    assert model[2].weight is weight and (model[2].p, model[2].block) == (0.25, 4)
    assert list(model.state_dict()) == keys
    assert sparse_drop_(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), include=["0"]) == ["0"]
    with pytest.raises(ValueError, match="linear layers"):
        sparse_drop_(nn.Sequential(nn.Linear(4, 4)), include=["nothing*"])


def _recipe(tmp_path, **method):
    from sparsenets.experiments import load_recipe

    return load_recipe({
        "name": "drop", "seeds": [0],
        "data": {"name": "teacher", "train_samples": 128, "test_samples": 64, "inputs": 12, "classes": 4},
        "model": {"name": "lenet_300_100", "hidden": [64, 64]},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 32},
        "method": {"name": "dropout", "p": 0.5, "block": 8, **method},
    })


def test_dropout_protocol_puts_the_same_dropout_on_the_same_layers(tmp_path):
    from sparsenets.experiments.protocols import PROTOCOLS, Job

    recipe = _recipe(tmp_path)
    assert [j.arm for j in PROTOCOLS["dropout"].jobs(recipe)] == ["dense", "dropout", "sparsedrop"]
    built = {}

    class Context:  # records the model each arm would train, without training it
        steps_per_epoch = 4

        def __init__(self):
            self.recipe = recipe

        def new_model(self, seed):
            from sparsenets.models import build_model
            torch.manual_seed(seed)
            return build_model("lenet_300_100", (12,), 4, hidden=[64, 64])

        def calibration(self, seed):
            return []

        def train(self, model, job, **_):
            built[job.arm] = model
            return []

    for arm in ("dense", "dropout", "sparsedrop"):
        PROTOCOLS["dropout"].run(Job(0, arm), Context())
    x = torch.randn(16, 12)
    first = {arm: m.eval()(x) for arm, m in built.items()}  # eval: all three are the same network
    assert torch.equal(first["dense"], first["dropout"]) and torch.equal(first["dense"], first["sparsedrop"])
    assert [type(m).__name__ for m in built["sparsedrop"].modules() if isinstance(m, nn.Linear)] == \
        ["Linear", "SparseDrop", "SparseDrop"]
    dropout = built["dropout"].train()  # training: the hidden inputs of fc2 and fc3 are dropped
    seen = []
    dropout.fc2.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    dropout(x)
    hidden = torch.relu(dropout.fc1(x))
    dropped = seen[0] == 0
    assert 0.3 < (dropped & (hidden != 0)).float().sum() / (hidden != 0).float().sum() < 0.7
    assert torch.allclose(seen[0][~dropped], 2 * hidden[~dropped])


def test_dropout_protocol_options_name_bad_values(tmp_path):
    from sparsenets.config import ConfigError

    with pytest.raises(ConfigError, match="1.5"):
        _recipe(tmp_path, p=1.5)
    with pytest.raises(ConfigError, match="'gaussian'"):
        _recipe(tmp_path, arms=["dense", "gaussian"])
    with pytest.raises(ConfigError, match="block"):
        _recipe(tmp_path, block=0)
