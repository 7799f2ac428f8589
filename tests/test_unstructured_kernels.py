"""The unstructured (CSR) C kernels and ``CSRLinear`` on them, against float64 dense products.

Shapes are small but cover one and several batch tiles, odd sizes, empty rows and matrices,
strided and transposed inputs; the reduction-in-chunks path, the multi-threaded split and the
AVX2/generic builds each get a test of their own.
"""

import platform
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsenets.kernels import csr
from sparsenets.kernels.cpu import build, gather
from sparsenets.layers import CSRLinear

from helpers import assert_compiled_matches_eager

pytestmark = pytest.mark.skipif(not gather.available(), reason="no C compiler for the CPU kernels")


def _csr(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = weight.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=weight.shape[0])
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), cols.to(torch.int32), weight[rows, cols]


def _sparse(out_features: int, in_features: int, density: float) -> torch.Tensor:
    return torch.randn(out_features, in_features) * (torch.rand(out_features, in_features) < density)


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` with the same values, stored contiguous, transposed, or as a strided view."""
    if how == "transposed":
        return x.t().contiguous().t()
    if how == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1])
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _check_all(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grad_out: torch.Tensor) -> None:
    """Forward (both output layouts), input gradient and values gradient against float64."""
    ptr, col, values = _csr(weight)
    w64, x64, g64 = weight.double(), x.double(), grad_out.double()
    want = x64 @ w64.T + (0 if bias is None else bias.double())
    for transposed in (False, True):
        _close(gather.csr_linear(x, ptr, col, values, bias, weight.shape[0], transposed=transposed), want)
    t_ptr, t_row, perm = csr.by_column(ptr, col, weight.shape[1])
    _close(gather.csr_linear(grad_out, t_ptr, t_row, values, None, weight.shape[1], perm), g64 @ w64)
    rows, cols = weight.nonzero(as_tuple=True)
    _close(gather.csr_values_grad(grad_out, x, ptr, col), (g64.T @ x64)[rows, cols])


@given(rows=st.sampled_from([0, 1, 2, 3, 7, 16, 17, 33, 64, 65, 130]), out_features=st.integers(1, 40),
       in_features=st.integers(1, 50), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       how=st.sampled_from(["contiguous", "transposed", "strided"]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernels_match_float64(rows, out_features, in_features, density, how, bias, seed):
    torch.manual_seed(seed)
    weight = _sparse(out_features, in_features, density)
    x = _layout(torch.randn(rows, in_features), how)
    grad_out = _layout(torch.randn(rows, out_features), how)
    _check_all(x, weight, torch.randn(out_features) if bias else None, grad_out)


def test_threads_split_the_work(monkeypatch):
    monkeypatch.setattr(gather, "WORK_PER_THREAD", 1)  # every product on all threads
    torch.set_num_threads(2)
    weight = _sparse(37, 45, 0.2)
    weight[3] = 0  # an empty row
    _check_all(torch.randn(150, 45), weight, torch.randn(37), torch.randn(150, 37))


def test_reduction_in_chunks_with_unsorted_columns():
    """Inputs wider than one cached slice of a tile are reduced in chunks; columns out of order
    within a row cost speed, not correctness."""
    in_features = 40_000
    weight = _sparse(5, in_features, 0.002)
    ptr, col, values = _csr(weight)
    order = torch.cat([torch.arange(a, b).flip(0) for a, b in zip(ptr[:-1].tolist(), ptr[1:].tolist())])
    x = torch.randn(6, in_features)
    got = gather.csr_linear(x, ptr, col[order].contiguous(), values[order].contiguous(), None, 5)
    _close(got, x.double() @ weight.double().T)
    _check_all(x, weight, None, torch.randn(6, 5))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 builds")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 (8 lanes), SSE (4 lanes)
def test_narrower_vector_builds(monkeypatch, march):
    if march == "x86-64-v3" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("SPARSENETS_CFLAGS", f"-O3 -march={march} -fopenmp")  # a build of its own
    gather.library.cache_clear()
    try:
        assert gather.library().sn_vector_width() == (8 if march == "x86-64-v3" else 4)
        for rows in (3, 9, 20, 41):
            weight = _sparse(13, 29, 0.3)
            _check_all(torch.randn(rows, 29), weight, torch.randn(13), torch.randn(rows, 13))
    finally:
        monkeypatch.delenv("SPARSENETS_CFLAGS")
        gather.library.cache_clear()


def test_missing_compiler_warns_once_and_falls_back(monkeypatch):
    def no_compiler(source):
        raise build.BuildError("no C compiler found")

    gather.library.cache_clear()
    monkeypatch.setattr(build, "load", no_compiler)
    try:
        layer = CSRLinear.from_dense(_sparse(6, 9, 0.4), bias=torch.randn(6))
        x = torch.randn(4, 9)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, y_again = layer(x), layer(x)
        assert [str(w.message) for w in caught if "unavailable" in str(w.message)] != []
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
        _close(y, x.double() @ layer.dense_weight().double().T + layer.bias.double())
        torch.testing.assert_close(y, y_again)
    finally:
        gather.library.cache_clear()


@pytest.mark.parametrize("bias", [True, False])
def test_layer_gradients_with_leading_dims(bias):
    weight = _sparse(12, 20, 0.25)
    weight[0] = 0
    b = torch.randn(12) if bias else None
    layer = CSRLinear.from_dense(weight, weight != 0, b)
    x = torch.randn(3, 5, 20, requires_grad=True)
    grad_out = torch.randn(3, 5, 12)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)
    x64, w64 = x.detach().double().requires_grad_(), weight.double().requires_grad_()
    y64 = x64 @ w64.T + (b.double() if bias else 0)
    want_x, want_w = torch.autograd.grad(y64, (x64, w64), grad_out.double())
    _close(y, y64.detach())
    _close(grads[0], want_x)
    _close(grads[1], want_w[weight != 0])
    if bias:
        _close(grads[2], grad_out.double().sum((0, 1)))
    with torch.no_grad():  # eager inference calls the kernel without the op
        _close(layer(x), y64.detach())


def test_other_dtypes_use_torch_sparse():
    weight = _sparse(7, 11, 0.4).double()
    layer = CSRLinear.from_dense(weight, bias=torch.randn(7, dtype=torch.float64))
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias)


def test_state_dict_round_trip_keeps_the_kernel_index_fresh():
    layer = CSRLinear.from_dense(_sparse(9, 14, 0.3), bias=torch.randn(9))
    x = torch.randn(70, 14, requires_grad=True)
    layer(x).sum().backward()  # caches the index by column
    other = CSRLinear.from_dense(_sparse(9, 14, 0.5), bias=torch.randn(9))
    layer.load_state_dict(other.state_dict())
    assert set(layer.state_dict()) == {"values", "crow_indices", "col_indices", "bias"}
    grad_x, = torch.autograd.grad(layer(x).sum(), x)
    _close(grad_x, torch.ones(70, 9, dtype=torch.float64) @ other.dense_weight().double())


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(CSRLinear.from_dense(_sparse(24, 16, 0.3), bias=torch.randn(24)), nn.ReLU(),
                         CSRLinear.from_dense(_sparse(8, 24, 0.3)))


def test_compile_fullgraph_and_export():
    model = _model()
    assert_compiled_matches_eager(model, torch.randn(70, 16, requires_grad=True), backend="aot_eager")
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(5, 16),))
    ops = {str(node.target) for node in program.graph.nodes}
    assert "sparsenets.csr_linear.default" in ops
    x = torch.randn(5, 16)
    torch.testing.assert_close(program.module()(x), model(x))


def test_bench_rows_have_every_implementation():
    from sparsenets.bench import sparse as bench_sparse

    cases = [bench_sparse.SparseCase("unstructured", 0.9, 3, mode, (16, 8)) for mode in bench_sparse.MODES]
    cases.append(bench_sparse.SparseCase("2:4", 0.5, 2, "forward", (16, 8)))
    found = bench_sparse.rows(threads=1, repeats=1, cases=cases, warmup=0, budget_s=0.1)
    assert [(r["pattern"], r["mode"]) for r in found] == [(c.pattern, c.mode) for c in cases]
    assert all({"dense", "sparsenets", "torch_csr"} <= set(r["ms"]) for r in found)
    assert found[2]["sparsity"] == 0.5
