"""Monarch matrices: the structured product, its dense form, the closed-form projection, the layer."""

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsenets.errors import ConfigError
from sparsenets.formats import monarch
from sparsenets.formats.monarch import (
    MonarchLinear,
    monarch_multiply,
    monarch_shapes,
    monarch_to_dense,
    project_monarch,
)

from helpers import assert_compiled_matches_eager

F64 = torch.float64
# (in, out, nblocks, block_rank): square, n < m, n > m, sizes b doesn't divide, q < b, q > b,
# and a pair with more intermediate values than its sub-block has rank (q = 10 > p, s)
SHAPES = [(16, 16, 4, None), (12, 40, 4, None), (40, 12, 4, 2), (10, 23, 3, 2), (23, 10, 4, 5),
          (7, 9, 2, 1), (64, 32, 4, 8), (33, 17, 8, 3), (8, 6, 2, 10)]


def naive_monarch(x: torch.Tensor, blocks1: torch.Tensor, blocks2: torch.Tensor, m: int) -> torch.Tensor:
    """The definition, one block and one vector at a time (independent of both implementations)."""
    b, q, p = blocks1.shape
    rows = []
    for v in x.reshape(-1, x.shape[-1]):
        v = torch.cat([v, v.new_zeros(b * p - v.numel())])
        h = torch.cat([blocks1[i] @ v[i * p:(i + 1) * p] for i in range(b)])  # t = i·q + j
        rows.append(torch.cat([blocks2[k] @ h[k::b] for k in range(b)])[:m])  # block k reads t = k, k+b, ...
    return torch.stack(rows).reshape(*x.shape[:-1], m)


def random_blocks(n: int, m: int, b: int, q: int | None, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    p, q, s = monarch_shapes(n, m, b, q)
    return torch.randn(b, q, p, dtype=dtype), torch.randn(b, s, q, dtype=dtype)


def frob(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm())


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def path(request, monkeypatch):
    """Run a test through the copy-free autograd Function and through plain autograd ops."""
    if not request.param:
        monkeypatch.setattr(monarch, "_fast_path", lambda *args: False)
    return request.param


# ---- the product and its dense form ------------------------------------------------------------


@pytest.mark.parametrize("n, m, b, q", SHAPES)
def test_forward_matches_dense_and_definition(n, m, b, q, path):
    layer = MonarchLinear(n, m, b, q, dtype=F64)
    x = torch.randn(2, 3, n, dtype=F64)
    y = layer(x)
    assert y.shape == (2, 3, m) and y.is_contiguous()
    dense = layer.dense_weight()
    assert dense.shape == (m, n)
    torch.testing.assert_close(y, x @ dense.T + layer.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y - layer.bias, naive_monarch(x, layer.blocks1, layer.blocks2, m),
                               rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs(path):
    layer = MonarchLinear(24, 20, 4, dtype=F64)
    base = torch.randn(24, 30, dtype=F64)
    for x in (base.t(), base.t()[::2], torch.randn(5, 30, 48, dtype=F64)[..., ::2]):
        assert not x.is_contiguous()
        torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes(dtype, path):
    layer = MonarchLinear(40, 36, 4, dtype=dtype)
    x = torch.randn(6, 40, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    ref = copy.deepcopy(layer).to(F64)(x.detach().to(F64))
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(y.to(F64), ref, rtol=tol, atol=tol)
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype


@pytest.mark.parametrize("n, m, b, q", SHAPES[:6])
def test_gradients_match_dense_autograd(n, m, b, q, path):
    layer = MonarchLinear(n, m, b, q, dtype=F64)
    x = torch.randn(4, 5, n, dtype=F64, requires_grad=True)
    weights = torch.randn(4, 5, m, dtype=F64)  # a non-uniform output gradient
    params = [x, layer.blocks1, layer.blocks2, layer.bias]
    got = torch.autograd.grad((layer(x) * weights).sum(), params)
    dense = monarch_to_dense(layer.blocks1, layer.blocks2, n, m)
    want = torch.autograd.grad(((x @ dense.T + layer.bias) * weights).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_double_backward(path):
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)
    blocks1, blocks2 = (t.requires_grad_() for t in random_blocks(10, 7, 3, 2))
    fn = lambda a, b1, b2: monarch_multiply(a, b1, b2, 7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, blocks1, blocks2))
    assert torch.autograd.gradgradcheck(fn, (x, blocks1, blocks2))


def test_gradients_only_where_wanted():
    layer = MonarchLinear(16, 12, 4)
    x = torch.randn(5, 16)  # no grad wanted for the input
    layer(x).sum().backward()
    assert layer.blocks1.grad is not None and layer.blocks2.grad is not None
    layer.blocks2.requires_grad_(False)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(layer(x).sum(), [x])
    assert grad_x.shape == x.shape


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 30), m=st.integers(1, 30), b=st.integers(1, 6), q=st.none() | st.integers(1, 9),
       batch=st.integers(0, 3))
def test_shapes_property(n, m, b, q, batch):
    if b > min(n, m):
        with pytest.raises(ConfigError, match=f"nblocks={b}"):
            MonarchLinear(n, m, b, q)
        return
    layer = MonarchLinear(n, m, b, q, dtype=F64)
    p, q_, s = monarch_shapes(n, m, b, q)
    assert layer.num_parameters() == b * q_ * (p + s) and layer.block_rank == q_
    x = torch.randn(batch, n, dtype=F64)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-12, atol=1e-12)


def test_more_expressive_than_low_rank_at_same_parameters():
    layer = MonarchLinear(16, 16, nblocks=4, block_rank=1, dtype=F64)
    assert layer.num_parameters() == 1 * (16 + 16)  # what a rank-1 factorisation stores
    assert int(torch.linalg.matrix_rank(layer.dense_weight())) == 4


# ---- projection --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m, b, q", SHAPES)
def test_projection_is_exact_on_monarch_matrices(n, m, b, q):
    blocks1, blocks2 = random_blocks(n, m, b, q)
    target = monarch_to_dense(blocks1, blocks2, n, m)
    got1, got2 = project_monarch(target, b, q)
    assert got1.shape == blocks1.shape and got2.shape == blocks2.shape
    assert frob(monarch_to_dense(got1, got2, n, m), target) < 1e-10 * float(target.norm())


def test_projection_beats_perturbations_and_gradient_descent():
    n, m, b, q = 12, 10, 3, 2
    weight = torch.randn(m, n, dtype=F64)
    blocks1, blocks2 = project_monarch(weight, b, q)
    best = frob(monarch_to_dense(blocks1, blocks2, n, m), weight)
    assert best < 0.95 * float(weight.norm())  # not trivially zero
    for scale in (1e-4, 1e-2, 1e-1):
        for _ in range(10):
            moved = monarch_to_dense(blocks1 + scale * torch.randn_like(blocks1),
                                     blocks2 + scale * torch.randn_like(blocks2), n, m)
            assert frob(moved, weight) >= best - 1e-12
    factors = [t.requires_grad_() for t in random_blocks(n, m, b, q)]
    for t in factors:
        t.data.mul_(0.3)
    optimizer = torch.optim.Adam(factors, lr=0.03)
    for _ in range(400):
        optimizer.zero_grad()
        loss = (monarch_to_dense(*factors, n, m) - weight).square().sum()
        loss.backward()
        optimizer.step()
    descended = frob(monarch_to_dense(*factors, n, m).detach(), weight)
    assert best <= descended + 1e-9
    assert descended < 1.05 * best  # gradient descent gets close: the optimum is the one found


def test_row_weighted_projection():
    n, m, b = 16, 12, 4
    weight = torch.randn(m, n, dtype=F64)
    rows = torch.rand(m, dtype=F64) * 10
    rows[:3] = 0  # zero weights must not divide by zero

    def weighted_error(blocks):
        return float((rows[:, None] * (monarch_to_dense(*blocks, n, m) - weight).square()).sum())

    plain, weighted = project_monarch(weight, b, 2), project_monarch(weight, b, 2, row_weights=rows)
    assert all(torch.isfinite(t).all() for t in weighted)
    assert weighted_error(weighted) < weighted_error(plain) - 1e-6
    for _ in range(10):  # and it is optimal for the weighted error too
        moved = [t + 1e-2 * torch.randn_like(t) for t in weighted]
        assert weighted_error(moved) >= weighted_error(weighted) - 1e-12
    uniform = project_monarch(weight, b, 2, row_weights=torch.full((m,), 3.0, dtype=F64))
    torch.testing.assert_close(monarch_to_dense(*uniform, n, m), monarch_to_dense(*plain, n, m),
                               rtol=1e-10, atol=1e-10)


def test_projection_keeps_dtype_and_float32_is_accurate():
    blocks1, blocks2 = random_blocks(40, 24, 4, None, dtype=torch.float32)
    target = monarch_to_dense(blocks1, blocks2, 40, 24)
    got = project_monarch(target, 4)
    assert all(t.dtype == torch.float32 for t in got)
    assert frob(monarch_to_dense(*got, 40, 24), target) < 1e-5 * float(target.norm())


def test_from_dense_builds_the_projected_layer():
    weight, bias = torch.randn(20, 24, dtype=F64), torch.randn(20, dtype=F64)
    layer = MonarchLinear.from_dense(weight, bias, nblocks=4, block_rank=3)
    blocks1, blocks2 = project_monarch(weight, 4, 3)
    torch.testing.assert_close(layer.dense_weight(), monarch_to_dense(blocks1, blocks2, 24, 20))
    torch.testing.assert_close(layer.bias, bias)
    assert layer.format_name() == "monarch:4x3" and layer.blocks1.dtype == F64
    assert MonarchLinear.from_dense(weight, nblocks=2).bias is None


# ---- the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m, b", [(512, 256, 4), (300, 301, 8)])
def test_init_output_variance_matches_linear(n, m, b):
    x = torch.randn(2048, n)
    with torch.no_grad():
        ours = torch.stack([MonarchLinear(n, m, b, bias=False)(x).var() for _ in range(6)]).mean()
        linear = torch.stack([nn.Linear(n, m, bias=False)(x).var() for _ in range(6)]).mean()
    assert abs(float(linear) - 1 / 3) < 0.03  # nn.Linear: n · 1/(3n)
    assert abs(float(ours) / float(linear) - 1) < 0.1


def test_layer_api_and_defaults():
    layer = MonarchLinear(2048, 2048)
    assert (layer.nblocks, layer.block_rank) == (4, 512) and layer.format_name() == "monarch:4x512"
    assert layer.num_parameters() == 512 * (2048 + 2048) == 2048 * 2048 // 2
    args = MonarchLinear(10, 23, 3, 2, bias=False).init_args()
    assert args == {"in_features": 10, "out_features": 23, "nblocks": 3, "block_rank": 2, "bias": False}
    rebuilt = MonarchLinear(**args)
    assert rebuilt.blocks1.shape == (3, 2, 4) and rebuilt.blocks2.shape == (3, 8, 2) and rebuilt.bias is None
    assert "bias" in dict(rebuilt.named_parameters(recurse=False)) or rebuilt.bias is None
    assert "nblocks=3" in repr(rebuilt) and "block_rank=2" in repr(rebuilt)


def test_state_dict_deepcopy_pickle():
    layer = MonarchLinear(18, 14, 3)
    x = torch.randn(4, 18)
    other = MonarchLinear(**layer.init_args())
    other.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"blocks1", "blocks2", "bias"}
    for twin in (other, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)


def test_torch_compile_matches_eager():
    assert_compiled_matches_eager(MonarchLinear(20, 14, 4), torch.randn(6, 20, requires_grad=True))


def test_torch_export():
    layer = MonarchLinear(20, 14, 4).eval()
    x = torch.randn(6, 20)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x), layer(x))


def test_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="nblocks=0"):
        MonarchLinear(8, 8, nblocks=0)
    with pytest.raises(ConfigError, match="nblocks=5"):
        MonarchLinear(8, 4, nblocks=5)
    with pytest.raises(ConfigError, match="block_rank=0"):
        monarch_shapes(8, 8, 2, 0)
    with pytest.raises(ConfigError, match="row_weights"):
        project_monarch(torch.randn(6, 8), 2, row_weights=torch.ones(8))
    with pytest.raises(ConfigError, match="row_weights"):
        project_monarch(torch.randn(6, 8), 2, row_weights=-torch.ones(6))
    blocks1, blocks2 = random_blocks(8, 8, 2, None)
    with pytest.raises(ConfigError, match="input size 9"):
        monarch_multiply(torch.randn(3, 9, dtype=F64), blocks1, blocks2, 8)
    with pytest.raises(ConfigError, match="weight of shape"):
        MonarchLinear.from_dense(torch.randn(8))
