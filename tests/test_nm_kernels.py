"""The N:M C kernels and ``NMSparseLinear``, against float64 dense products.

Also the layer's contract: exact N:M masks only (errors name the offending group), state_dict,
deepcopy and pickle, torch fallbacks for other dtypes, torch.compile and torch.export.
"""

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsenets.kernels import nm
from sparsenets.kernels.cpu import gather
from sparsenets.layers import NMSparseLinear
from sparsenets.patterns import parse_pattern

from helpers import assert_compiled_matches_eager

needs_kernels = pytest.mark.skipif(not gather.available(), reason="no C compiler for the CPU kernels")
PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (3, 8), (2, 3)]


def _mask(out_features: int, in_features: int, n: int, m: int) -> torch.Tensor:
    return parse_pattern(f"{n}:{m}").select(torch.rand(out_features, in_features))


def _layer(out_features: int, in_features: int, n: int, m: int, bias: bool = True) -> NMSparseLinear:
    weight = torch.randn(out_features, in_features)
    return NMSparseLinear.from_dense(weight, _mask(out_features, in_features, n, m),
                                     torch.randn(out_features) if bias else None, n, m)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _strided(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "transposed":
        return x.t().contiguous().t()
    if how == "strided":
        wide = torch.zeros(x.shape[0], 3 * x.shape[1])
        wide[:, 1::3] = x
        return wide[:, 1::3]
    return x


@needs_kernels
@given(rows=st.sampled_from([0, 1, 2, 3, 9, 16, 17, 40, 64, 65, 129]), out_features=st.integers(1, 24),
       groups=st.integers(1, 12), pattern=st.sampled_from(PATTERNS), how=st.sampled_from(["contiguous",
       "transposed", "strided"]), seed=st.integers(0, 2**16))
def test_kernels_match_float64(rows, out_features, groups, pattern, how, seed):
    torch.manual_seed(seed)
    n, m = pattern
    layer = _layer(out_features, groups * m, n, m)
    values, indices, bias = layer.values.detach(), layer.indices, layer.bias.detach()
    w64 = layer.dense_weight().detach().double()
    x = _strided(torch.randn(rows, groups * m), how)
    grad_out = _strided(torch.randn(rows, out_features), how)
    for transposed in (False, True):
        got = gather.nm_linear(x, values, indices, bias, n, m, transposed=transposed)
        _close(got, x.double() @ w64.T + bias.double())
    _close(gather.nm_input_grad(grad_out, values, indices, n, m, groups * m), grad_out.double() @ w64)
    want = (grad_out.double().T @ x.double()).gather(1, nm.columns(indices, n, m))
    _close(gather.nm_values_grad(grad_out, x, indices, n, m), want)


@needs_kernels
def test_threads_split_the_work(monkeypatch):
    monkeypatch.setattr(gather, "WORK_PER_THREAD", 1)
    torch.set_num_threads(2)
    layer = _layer(33, 4 * 70, 2, 4)  # several chunks of inputs and of outputs
    x = torch.randn(150, 280, requires_grad=True)
    grad_out = torch.randn(150, 33)
    y = layer(x)
    gx, gv = torch.autograd.grad(y, (x, layer.values), grad_out)
    w64 = layer.dense_weight().detach().double()
    _close(y, x.double() @ w64.T + layer.bias.double())
    _close(gx, grad_out.double() @ w64)
    _close(gv, (grad_out.double().T @ x.double()).gather(1, nm.columns(layer.indices, 2, 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_trains_with_leading_dims(dtype):
    layer = _layer(10, 16, 2, 4).to(dtype)
    x = torch.randn(2, 3, 16, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 3, 10, dtype=dtype)
    y = layer(x)
    gx, gv, gb = torch.autograd.grad(y, (x, layer.values, layer.bias), grad_out)
    dense = layer.dense_weight().detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ dense.T + layer.bias.detach().double()
    want_x, want_w = torch.autograd.grad(y64, (x64, dense), grad_out.double())
    _close(y, y64.detach())
    _close(gx, want_x)
    _close(gv, want_w.gather(1, nm.columns(layer.indices, 2, 4)))
    _close(gb, grad_out.double().sum((0, 1)))
    with torch.no_grad():
        _close(layer(x), y64.detach())


def test_from_dense_keeps_the_masked_entries():
    weight = torch.randn(6, 12)
    mask = _mask(6, 12, 2, 4)
    layer = NMSparseLinear.from_dense(weight, mask, n=2, m=4)
    torch.testing.assert_close(layer.dense_weight(), weight * mask)
    assert torch.equal(layer.mask(), mask) and layer.indices.dtype == torch.uint8
    assert bool((layer.indices.view(6, 3, 2).diff(dim=-1) > 0).all())  # ascending within each group
    # Without a mask: the nonzeros, groups short of n filled with zeros.
    sparse = weight * mask
    sparse[0, :4] = torch.tensor([0.0, 0.0, 0.0, 5.0])
    torch.testing.assert_close(NMSparseLinear.from_dense(sparse).dense_weight(), sparse)


def test_validation_names_the_bad_group():
    mask = _mask(4, 16, 2, 4)
    mask[2, 9] = not mask[2, 9]  # row 2, group 2 keeps 1 or 3
    with pytest.raises(ValueError, match=r"row 2, group 2 \(inputs 8\.\.11\)"):
        NMSparseLinear.from_dense(torch.randn(4, 16), mask)
    with pytest.raises(ValueError, match="multiple of M=4"):
        NMSparseLinear.from_dense(torch.randn(4, 10), torch.ones(4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 <= N < M"):
        NMSparseLinear(8, 4, n=4, m=4)
    dense = torch.randn(3, 8)
    with pytest.raises(ValueError, match="at most 2"):
        NMSparseLinear.from_dense(dense)  # no mask: more than n nonzeros in a group
    with pytest.raises(ValueError, match="does not match"):
        NMSparseLinear.from_dense(dense, torch.ones(3, 4, dtype=torch.bool))


def test_state_dict_deepcopy_and_pickle():
    layer = _layer(5, 12, 1, 4)
    other = NMSparseLinear(12, 5, n=1, m=4)
    other.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"values", "indices", "bias"}
    x = torch.randn(3, 12)
    for copied in (other, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(copied(x), layer(x))
        assert torch.equal(copied.indices, layer.indices)


def _model() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(_layer(24, 16, 2, 4), nn.ReLU(), _layer(8, 24, 1, 4, bias=False))


def test_compile_fullgraph_matches_eager():
    model = _model()
    assert_compiled_matches_eager(model, torch.randn(70, 16, requires_grad=True))


def test_export_captures_the_op():
    model = _model()
    batch = torch.export.Dim("batch", min=2)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    assert sum(str(node.target) == "sparsenets.nm_linear.default" for node in program.graph.nodes) == 2
    x = torch.randn(9, 16)
    torch.testing.assert_close(program.module()(x), model(x))


def test_opcheck():
    layer = _layer(6, 8, 2, 4)
    args = (torch.randn(5, 8), layer.values, layer.bias, layer.indices, 2, 4)
    torch.library.opcheck(nm.nm_linear, args)


def test_compress_offers_and_builds_the_nm_kernel(monkeypatch):
    import sparsenets
    from sparsenets.compression import choose
    from sparsenets.masking import attach

    linear = nn.Linear(32, 16)
    assert "nm" not in choose.candidates(linear, "2:4")  # dense weights are not 2:4
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    attach(model[0], "weight", _mask(16, 32, 2, 4), "2:4")
    attach(model[2], "weight", torch.rand(8, 16) < 0.3, "unstructured")
    monkeypatch.setattr(choose, "rule", lambda module, pattern, kinds: "nm" if "nm" in kinds else "dense")
    x = torch.randn(5, 32)
    compressed = sparsenets.compress(model, x, autotune=False)
    assert isinstance(compressed[0], NMSparseLinear) and type(compressed[2]) is nn.Linear
    torch.testing.assert_close(compressed(x), model(x))
