"""Block-sparse layers compute what the masked dense layers compute, train, and save like any module."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsenets.kernels import block_keep, scatter_blocks
from sparsenets.layers import (
    BlockSparseConv1d,
    BlockSparseConv2d,
    BlockSparseLinear,
    SemiStructuredLinear,
    semi_structured_supported,
)


def block_mask(rows, cols, block, density, generator=None):
    """An element mask made of whole blocks (edge blocks cut to the shape)."""
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    keep = torch.rand(grid, generator=generator) < density
    return keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols].contiguous()


def kept_blocks(mask, block):
    r, c = block
    keep = block_keep(mask, block)
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: mask.shape[0], : mask.shape[1]]


# ---- Linear ---------------------------------------------------------------------------------------------


@given(out_features=st.integers(1, 70), in_features=st.integers(1, 70),
       block=st.sampled_from([(32, 32), (4, 4), (8, 1), (1, 8), (16, 32)]),
       density=st.sampled_from([0.0, 0.4, 1.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_masked_dense_forward_and_backward(out_features, in_features, block, density, bias, seed):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    mask = block_mask(out_features, in_features, block, density)
    layer = BlockSparseLinear.from_dense(dense.weight, mask, dense.bias, block)
    x = torch.randn(2, 5, in_features)

    y = layer(x)
    masked = (dense.weight * mask).detach().requires_grad_()
    y_ref = F.linear(x, masked, dense.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    # The layer's weight gradient is the dense gradient restricted to its kept blocks.
    grad_values = layer.values.grad if layer.values.grad is not None else torch.zeros_like(layer.values)
    kept = kept_blocks(mask, block)
    torch.testing.assert_close(scatter_blocks(grad_values, layer.layout), masked.grad * kept, atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, atol=1e-4, rtol=1e-4)


def test_from_dense_copies_masked_values_in_kept_blocks_only():
    weight = torch.randn(40, 50)
    mask = torch.zeros(40, 50, dtype=torch.bool)
    mask[0, 0] = mask[39, 49] = True  # two blocks, the second at both edges
    layer = BlockSparseLinear.from_dense(weight, mask, None, (16, 16))
    assert layer.values.shape == (2, 16, 16)
    assert layer.values.requires_grad
    torch.testing.assert_close(layer.dense_weight(), weight * mask)
    assert layer.density == pytest.approx(2 / (3 * 4))
    assert "block=16x16" in repr(layer)


def test_shapes_that_do_not_match_are_rejected():
    with pytest.raises(ValueError, match="out x in"):
        BlockSparseLinear.from_dense(torch.randn(4, 4), torch.ones(4, 5, dtype=torch.bool), None, 2)
    with pytest.raises(ValueError, match="block sides"):
        BlockSparseLinear(8, 8, (0, 4))
    layer = BlockSparseLinear(8, 8, 4)
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(3, 9))


def test_training_updates_only_kept_blocks():
    torch.manual_seed(0)
    mask = block_mask(64, 96, (16, 16), 0.5)
    layer = BlockSparseLinear.from_dense(torch.zeros(64, 96), mask, torch.zeros(64), (16, 16))
    teacher = torch.randn(64, 96) * mask * 0.1  # reachable: same kept blocks
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 96)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(layer(x), x @ teacher.t())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert (layer.dense_weight()[~kept_blocks(mask, (16, 16))] == 0).all()


def test_state_dict_round_trip_and_structure_adoption():
    torch.manual_seed(0)
    mask = block_mask(48, 80, (16, 16), 0.5)
    layer = BlockSparseLinear.from_dense(torch.randn(48, 80), mask, torch.randn(48), (16, 16))
    state = layer.state_dict()
    assert set(state) == {"values", "bias", "row_ptr", "col_idx"}
    x = torch.randn(7, 80)
    # Into a layer with other blocks kept: it takes the saved structure.
    other = BlockSparseLinear(80, 48, (16, 16), keep=torch.rand(3, 5) < 0.3)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x))
    assert torch.equal(other.t_block, layer.t_block)

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = BlockSparseLinear(80, 48, (16, 16))
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(x), layer(x))


def test_deepcopy_and_pickle():
    mask = block_mask(30, 20, (8, 4), 0.5, torch.Generator().manual_seed(0))
    layer = BlockSparseLinear.from_dense(torch.randn(30, 20), mask, torch.randn(30), (8, 4))
    x = torch.randn(4, 20)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x), layer(x))
        clone.values.data.zero_()
        assert layer.values.abs().sum() > 0  # the copy shares nothing


def test_double_precision_layer_and_gradcheck():
    mask = block_mask(6, 10, (4, 4), 0.6, torch.Generator().manual_seed(1))
    layer = BlockSparseLinear.from_dense(torch.randn(6, 10), mask, torch.randn(6), (4, 4)).double()
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(), layer.bias))


# ---- convolutions -----------------------------------------------------------------------------------------


CONVS = [
    lambda: nn.Conv2d(3, 20, 3, padding=1, stride=2),
    lambda: nn.Conv2d(4, 9, (3, 2), padding=(1, 2), dilation=(2, 1), padding_mode="circular", bias=False),
    lambda: nn.Conv2d(8, 16, 3, padding="same", padding_mode="reflect"),
    lambda: nn.Conv1d(5, 12, 4, padding="same", dilation=2),
    lambda: nn.Conv1d(6, 32, 3, stride=2, padding=1, padding_mode="replicate"),
]


@pytest.mark.parametrize("make_conv", CONVS)
@pytest.mark.parametrize("block", [(8, 4), (4, 9), (16, 16)])
def test_conv_matches_masked_conv(make_conv, block):
    torch.manual_seed(0)
    conv = make_conv()
    gemm_shape = (conv.out_channels, conv.weight[0].numel())
    mask = block_mask(*gemm_shape, block, 0.5).reshape(conv.weight.shape)
    cls = BlockSparseConv1d if isinstance(conv, nn.Conv1d) else BlockSparseConv2d
    layer = cls.from_dense(conv, conv.weight, mask, block)
    with torch.no_grad():
        conv.weight.mul_(mask)
    spatial = (11, 9) if cls is BlockSparseConv2d else (13,)
    x = torch.randn(2, conv.in_channels, *spatial, requires_grad=True)

    y, y_ref = layer(x), conv(x)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    assert y.is_contiguous()  # like nn.Conv: y.view(n, -1) must work
    torch.testing.assert_close(layer.dense_weight(), conv.weight.detach())
    torch.testing.assert_close(layer(x[0]), conv(x[0]), atol=1e-4, rtol=1e-4)  # unbatched input
    with torch.no_grad():  # inference gathers patches differently
        torch.testing.assert_close(layer(x), y_ref, atol=1e-4, rtol=1e-4)

    grad_out = torch.randn_like(y)
    grad_x, = torch.autograd.grad(y, x, grad_out, retain_graph=True)
    grad_x_ref, grad_w_ref = torch.autograd.grad(y_ref, (x, conv.weight), grad_out)
    torch.testing.assert_close(grad_x, grad_x_ref, atol=1e-4, rtol=1e-4)
    y.backward(grad_out)
    kept = kept_blocks(mask.reshape(gemm_shape), block).reshape(conv.weight.shape)
    grad_w = scatter_blocks(layer.values.grad, layer.layout).reshape(conv.weight.shape)
    torch.testing.assert_close(grad_w, grad_w_ref * kept, atol=1e-4, rtol=1e-4)


def test_conv_state_dict_and_pickle():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    mask = torch.rand_like(conv.weight) < 0.5
    layer = BlockSparseConv2d.from_dense(conv, conv.weight, mask, (4, 9))
    x = torch.randn(1, 3, 6, 6)
    clone = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(clone(x), layer(x))
    fresh = BlockSparseConv2d(3, 8, 3, (4, 9), padding=1)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x))


def test_grouped_conv_is_rejected():
    conv = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        BlockSparseConv2d.from_dense(conv, conv.weight, torch.ones_like(conv.weight, dtype=torch.bool), 4)


# ---- 2:4 -------------------------------------------------------------------------------------------------------


def test_semi_structured_falls_back_to_dense_on_cpu():
    weight = torch.randn(64, 128)
    mask = torch.zeros(64, 32, 4, dtype=torch.bool)
    mask[..., :2] = True
    mask = mask.reshape(64, 128)
    assert not semi_structured_supported(weight)
    layer = SemiStructuredLinear.from_dense(weight, mask, torch.randn(64))
    assert not layer.accelerated
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, weight * mask, layer.bias))
    with pytest.raises(ValueError, match="2:4"):
        SemiStructuredLinear.from_dense(weight, torch.ones_like(mask), None)
