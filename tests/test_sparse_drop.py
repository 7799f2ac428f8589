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
