"""int8 kernels and layers against exact integer references.

Every path must give the int32 product of the quantized operands exactly, so the float
results match the reference up to the rounding of the final scaling; against fp32 they must
stay within the quantization error bound. Nothing here depends on which vector path this CPU
compiled: the other paths (plain C, AVX2, AVX-VNNI) are built with other flags where the CPU
can run them.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.errors import ConfigError
from sparsenets.kernels import BlockLayout, scatter_blocks
from sparsenets.kernels import int8 as K
from sparsenets.kernels.cpu import build
from sparsenets.kernels.cpu import int8 as C
from sparsenets.layers import BlockSparseLinear
from sparsenets.layers.int8 import BlockSparseInt8Linear, Int8Linear

needs_c = pytest.mark.skipif(not C.available(), reason="no C compiler for the int8 kernels")


def exact(x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 product computed in int64 and scaled in float64: what every path must match."""
    q, sx = K._quantize_rows_torch(x.reshape(-1, x.shape[-1]))
    acc = q.long() @ q_w.long().t()
    y = acc.double() * sx.double().unsqueeze(1) * w_scale.double().unsqueeze(0)
    y = y if bias is None else y + bias.double()
    return y.reshape(*x.shape[:-1], q_w.shape[0])


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding of the scaling (relative to the row's magnitude)."""
    assert y.shape == ref.shape and y.dtype == torch.float32
    tol = 1e-5 * (ref.abs().amax(-1, keepdim=True) + 1)
    assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max()


def quantization_bound(x, w, q_w, w_scale):
    """|int8 result - fp32 result| bound: x̂ŵ - xw = dx·w + x̂·dw with |dx| <= sx/2 per row."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    _, sx = K._quantize_rows_torch(x2)
    dw = (w.double() - q_w.double() * w_scale.double().unsqueeze(1)).abs()
    half = sx.double().unsqueeze(1) / 2
    bound = half * w.double().abs().sum(1).unsqueeze(0) + (x2.abs() + half) @ dw.t()
    return (bound * (1 + 1e-4) + 1e-4).reshape(*x.shape[:-1], w.shape[0])


def random_layout(out_f, in_f, block, density, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    grid = (-(-out_f // block[0]), -(-in_f // block[1]))
    return BlockLayout.from_keep(torch.rand(grid, generator=g) < density, (out_f, in_f), block)


# ---- quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 7, 33), (4, 130)])
def test_quantize_rows_matches_reference_bytes(shape):
    x = torch.randn(shape) * 3
    x[..., 0, :] = 0  # an all-zero row
    q, s = K.quantize_rows(x)
    q_ref, s_ref = K._quantize_rows_torch(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.abs().max() <= 127 and (s[..., 0] == 0).all() and (q[..., 0, :] == 0).all()
    assert ((x - q.float() * s.unsqueeze(-1)).abs() <= s.unsqueeze(-1) / 2 * (1 + 1e-6)).all()


def test_quantize_rows_extremes_and_ties():
    x = torch.tensor([[1e30, -1e30, 1.0, 0.0], [-3.0, 1.5, 0.5, -0.5], [127.0, 0.5, 1.5, 2.5]])
    q, s = K.quantize_rows(x)
    assert q[0].tolist() == [127, -127, 0, 0]
    assert torch.equal(q, K._quantize_rows_torch(x)[0])
    assert q[2].tolist() == [127, 0, 2, 2]  # ties round half to even, like torch.round
    x = torch.randn(5, 64)[:, ::2]  # a strided view
    assert torch.equal(K.quantize_rows(x)[0], K._quantize_rows_torch(x)[0])


def test_quantize_weight_int8():
    w = torch.randn(6, 10)
    w[2] = 0
    q, s = K.quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.shape == (6,) and s[2] == 0
    assert (q.abs().amax(1)[[0, 1, 3, 4, 5]] == 127).all()
    assert ((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()
    with pytest.raises(ConfigError, match="out_features, in_features"):
        K.quantize_weight_int8(torch.randn(3))
    with pytest.raises(ConfigError, match="floating-point"):
        K.quantize_weight_int8(torch.ones(3, 3, dtype=torch.int8))


# ---- dense ------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,out_f", [((1, 37), 5), ((17, 64), 24), ((2, 3, 33), 7), ((40, 1), 3),
                                           ((5, 2100), 9)])
@pytest.mark.parametrize("path", ["auto", "torch"])
def test_int8_linear_exact(x_shape, out_f, path):
    x, w, b = torch.randn(x_shape), torch.randn(out_f, x_shape[-1]), torch.randn(out_f)
    q_w, s_w = K.quantize_weight_int8(w)
    y = K.int8_linear(x, q_w, s_w, b, path=path)
    assert_matches(y, exact(x, q_w, s_w, b))
    assert ((y - F.linear(x, w, b)).abs() <= quantization_bound(x, w, q_w, s_w)).all()
    assert_matches(K.int8_linear(x, q_w, s_w, path=path), exact(x, q_w, s_w, None))


def test_int8_linear_extremes_and_empty():
    q_w = torch.full((8, 40), 127, dtype=torch.int8)
    q_w[1::2] = -128
    s_w = torch.rand(8)
    x = torch.full((20, 40), -7.0)
    x[3] = 0
    for path in ("auto", "torch"):
        assert_matches(K.int8_linear(x, q_w, s_w, path=path), exact(x, q_w, s_w, None))
        assert K.int8_linear(torch.randn(0, 40), q_w, s_w, path=path).shape == (0, 8)


def test_int8_linear_errors():
    q_w, s_w = torch.zeros(4, 6, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ConfigError, match="int8"):
        K.int8_linear(torch.randn(2, 6), q_w.float(), s_w)
    with pytest.raises(ConfigError, match="5 features"):
        K.int8_linear(torch.randn(2, 5), q_w, s_w)
    with pytest.raises(ConfigError, match=r"w_scale must have shape \(4,\)"):
        K.int8_linear(torch.randn(2, 6), q_w, torch.ones(3))
    with pytest.raises(ConfigError, match=r"bias must have shape \(4,\)"):
        K.int8_linear(torch.randn(2, 6), q_w, s_w, torch.ones(2))
    with pytest.raises(ConfigError, match="'fast'"):
        K.int8_linear(torch.randn(2, 6), q_w, s_w, path="fast")


def test_emulated_int_product_is_exact_at_the_limits():
    a = torch.full((3, 3000), -127, dtype=torch.int8)
    b = torch.full((2, 3000), -128, dtype=torch.int8)
    assert torch.equal(K.int_matmul_emulated(a, b), (a.long() @ b.long().t()).int())


# ---- block-sparse -----------------------------------------------------------------------------

BLOCKS = [(32, 32), (16, 16), (8, 12), (5, 7), (3, 64), (40, 20), (16, 80), (64, 64)]


def block_case(out_f, in_f, block, density, seed=0):
    w = torch.randn(out_f, in_f)
    layout = random_layout(out_f, in_f, block, density, seed)
    keep = scatter_blocks(torch.ones(layout.nnz, *block), layout) != 0
    q_w, s_w = K.quantize_weight_int8(w * keep)
    return w * keep, q_w * keep, s_w, layout


@needs_c
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("path", ["c", "simd", "scalar", "torch"])
def test_block_sparse_exact(block, path):
    b = torch.randn(70)
    for density, x_shape in ((0.4, (29, 101)), (1.0, (1, 101)), (0.0, (3, 101)), (0.3, (2, 13, 101))):
        w, q_w, s_w, layout = block_case(70, 101, block, density)
        packed = K.pack_block_int8(q_w, layout)
        x = torch.randn(x_shape)
        x[..., 0, :] = 0
        y = K.block_sparse_int8_linear(x, packed, s_w, b, path=path)
        assert_matches(y, exact(x, q_w, s_w, b))
        assert ((y - F.linear(x, w, b)).abs() <= quantization_bound(x, w, q_w, s_w)).all()
        assert_matches(K.block_sparse_int8_linear(x, packed, s_w, path=path), exact(x, q_w, s_w, None))


@needs_c
@pytest.mark.parametrize("path", ["c", "simd", "scalar"])
def test_block_sparse_extremes(path):
    """±127/-128 weights with activations at ±127 in every column: the largest int32 sums."""
    layout = random_layout(64, 300, (16, 32), 1.0)
    q_w = torch.full((64, 300), 127, dtype=torch.int8)
    q_w[::2] = -128
    q_w[5, ::3] = -127
    s_w = torch.rand(64) + 0.5
    packed = K.pack_block_int8(q_w, layout)
    x = torch.full((13, 300), 2.0)
    x[1] *= -1
    x[2, 0] = 1e20  # saturating: one huge value, the rest round to 0
    y = K.block_sparse_int8_linear(x, packed, s_w, path=path)
    assert_matches(y, exact(x, q_w, s_w, None))


def test_pack_block_int8_forms_and_errors():
    _, q_w, _, layout = block_case(40, 50, (16, 8), 0.5)
    from_dense = K.pack_block_int8(q_w, layout, lanes=16)
    from_values = K.pack_block_int8(from_dense.values, layout, lanes=16)
    assert torch.equal(from_dense.panels, from_values.panels) and torch.equal(from_dense.dense(), q_w)
    assert from_dense.panels.shape == (layout.nnz, 2, 16, 4)
    assert torch.equal(from_dense.colsum[:, :16].sum(), q_w.sum(dtype=torch.int32))
    with pytest.raises(ConfigError, match="neither"):
        K.pack_block_int8(q_w[:, :10], layout)
    with pytest.raises(ConfigError, match="int8"):
        K.pack_block_int8(q_w.float(), layout)
    with pytest.raises(ConfigError, match="pack_block_int8"):
        K.block_sparse_int8_linear(torch.randn(2, 50), q_w, torch.ones(40))


@needs_c
def test_block_sparse_torch_fallback_for_foreign_panels():
    """Panels packed for another vector width run on the torch path (auto) or are refused (c)."""
    _, q_w, s_w, layout = block_case(24, 40, (8, 8), 0.6)
    lanes = 8 if C.lanes() != 8 else 16
    packed = K.pack_block_int8(q_w, layout, lanes=lanes)
    x = torch.randn(4, 40)
    assert_matches(K.block_sparse_int8_linear(x, packed, s_w), exact(x, q_w, s_w, None))
    with pytest.raises(ConfigError, match="lanes"):
        K.block_sparse_int8_linear(x, packed, s_w, path="c")


# ---- the other compiled paths -----------------------------------------------------------------


def _cpu_has(*flags: str) -> bool:
    have = K._cpu_flags()
    return have is not None and all(f in have for f in flags)


VARIANTS = [
    ("-O3 -fopenmp", "scalar", ()),
    ("-O3 -mavx2 -mfma -fopenmp", "avx2", ("avx2", "fma")),
    ("-O3 -mavx2 -mfma -mavxvnni -fopenmp", "avx-vnni", ("avx2", "fma", "avx_vnni")),
]


@pytest.mark.parametrize("flags,expected,cpu_flags", VARIANTS, ids=[v[1] for v in VARIANTS])
def test_other_builds(flags, expected, cpu_flags, monkeypatch):
    import platform

    if platform.machine() not in ("x86_64", "AMD64") and expected != "scalar":
        pytest.skip("an x86 vector path")
    if not _cpu_has(*cpu_flags):
        pytest.skip(f"this CPU lacks {' '.join(cpu_flags)}")
    monkeypatch.setenv("SPARSENETS_CFLAGS", flags)
    try:
        lib = C.declare(build.load(Path(C.__file__).with_name("int8.c")))
    except build.BuildError as err:  # a compiler without these flags
        pytest.skip(f"can't build with {flags}: {err}")
    assert C.path(lib) == expected and not C.amx(lib)
    assert K.int8_capabilities(lib)["kernel_path"] == expected
    x = torch.randn(3, 9, 77)
    x[0, 0] = 0
    q, s = C.quantize_rows(x.reshape(-1, 77), lib=lib)
    q_ref, s_ref = K._quantize_rows_torch(x.reshape(-1, 77))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    for block in ((16, 16), (32, 32), (5, 7), (8, 12)):
        _, q_w, s_w, layout = block_case(45, 77, block, 0.5)
        q_w[0, :7] = -128
        packed = K.pack_block_int8(q_w, layout, lanes=C.lanes(lib))
        b = torch.randn(45)
        for mode in C.MODES:
            y = C.bsp_linear(x.reshape(-1, 77), 77, 45, block, layout.row_ptr, layout.col_idx, packed.panels,
                             packed.colsum, s_w, b, mode=mode, lib=lib)
            assert_matches(y, exact(x.reshape(-1, 77), q_w, s_w, b))


def test_capabilities():
    caps = K.int8_capabilities()
    assert set(caps) >= {"cpu", "flags", "torch_cpu_capability", "int_mm", "kernel_path", "kernel_lanes", "kernel_amx"}
    assert caps["kernel_path"] in (None, "avx512-vnni", "avx-vnni", "avx2", "scalar")
    assert set(caps["flags"]) >= {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}
    assert "int8: kernel path" in K.describe()


# ---- layers -----------------------------------------------------------------------------------


def test_int8_linear_layer():
    lin = nn.Linear(50, 30)
    layer = Int8Linear.from_float(lin)
    x = torch.randn(4, 6, 50)
    y = layer(x)
    assert y.shape == (4, 6, 30)
    assert ((y - lin(x).detach()).abs() <= quantization_bound(x, lin.weight.detach(), layer.q_weight,
                                                                  layer.w_scale)).all()
    assert (layer.dense_weight() - lin.weight).abs().max() <= layer.w_scale.max() / 2 + 1e-6
    again = Int8Linear.from_quantized(layer.q_weight, layer.w_scale, lin.bias)
    assert torch.equal(again(x), y)
    fresh = Int8Linear(50, 30)
    fresh.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"q_weight", "w_scale", "bias"}
    for other in (fresh, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), y)
    no_bias = Int8Linear.from_float(nn.Linear(50, 30, bias=False))
    assert no_bias.bias is None and no_bias(x).shape == (4, 6, 30)


def test_layers_are_inference_only():
    layer = Int8Linear.from_float(nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)
    with torch.no_grad():
        layer(x)
    assert not layer.eval()(x).requires_grad
    with pytest.raises(ConfigError, match="nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="per output channel"):
        Int8Linear.from_quantized(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))


def test_block_sparse_int8_layer():
    w = torch.randn(70, 90)
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[:32, 16:48] = True
    mask[40:, :16] = True
    b = torch.randn(70)
    sparse = BlockSparseLinear.from_dense(w, mask, b, (16, 16))
    layer = BlockSparseInt8Linear.from_float(sparse)
    assert layer.row_ptr.data_ptr() != sparse.row_ptr.data_ptr()  # not shared with the float layer
    x = torch.randn(3, 5, 90)
    y = layer(x)
    ref = sparse(x).detach()
    dense_w = sparse.dense_weight().detach()
    q_dense = scatter_blocks(layer.q_values, layer.layout)
    assert ((y - ref).abs() <= quantization_bound(x, dense_w, q_dense, layer.w_scale)).all()
    assert_matches(y, exact(x, q_dense, layer.w_scale, b))
    assert (layer.dense_weight() - dense_w).abs().max() <= layer.w_scale.max() / 2 + 1e-6
    from_dense = BlockSparseInt8Linear.from_dense(w, mask, (16, 16), b)
    assert torch.equal(from_dense(x), y)
    from_q = BlockSparseInt8Linear.from_quantized(q_dense, layer.w_scale, (16, 16), b)
    assert torch.equal(from_q(x), y)

    fresh = BlockSparseInt8Linear(90, 70, (16, 16))  # all blocks: adopts the checkpoint's structure
    fresh.load_state_dict(layer.state_dict())
    for other in (fresh, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), y)
    assert pickle.loads(pickle.dumps(layer))._packed_cache is None

    layer.q_values.mul_(-1)  # an in-place change repacks
    assert_matches(layer(x), exact(x, -q_dense, layer.w_scale, b))
    with pytest.raises(ConfigError, match="BlockSparseLinear"):
        BlockSparseInt8Linear.from_float(nn.Linear(3, 3))


@needs_c
@pytest.mark.parametrize("rows", [5, 64, 100])  # few tiles (row-blocks shared) and many (tiles shared)
@pytest.mark.parametrize("path", ["c", "simd"])
def test_block_sparse_threads(rows, path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, q_w, s_w, layout = block_case(640, 1024, (32, 32), 0.8)  # enough work for two threads
        x = torch.randn(rows, 1024)
        y = K.block_sparse_int8_linear(x, K.pack_block_int8(q_w, layout), s_w, path=path)
        assert_matches(y, exact(x, q_w, s_w, None))
    finally:
        torch.set_num_threads(threads)


def test_without_the_c_kernels(monkeypatch):
    """No compiler: the same products from torch ops (and torch._int_mm for the dense one)."""
    monkeypatch.setattr(C, "available", lambda: False)
    x, w, b = torch.randn(2, 9, 40), torch.randn(12, 40), torch.randn(12)
    q_w, s_w = K.quantize_weight_int8(w)
    assert torch.equal(K.quantize_rows(x)[0], K._quantize_rows_torch(x)[0])
    assert_matches(K.int8_linear(x, q_w, s_w, b), exact(x, q_w, s_w, b))
    layout = random_layout(12, 40, (8, 8), 0.5)
    packed = K.pack_block_int8(q_w, layout)
    assert packed.lanes == 8
    assert_matches(K.block_sparse_int8_linear(x, packed, s_w, b), exact(x, packed.dense(), s_w, b))
    with pytest.raises(ConfigError, match="compiled int8 kernels"):
        K.block_sparse_int8_linear(x, packed, s_w, path="c")
    assert K.int8_capabilities()["kernel_path"] is None


@needs_c
def test_dense_without_int_mm(monkeypatch):
    """A torch without _int_mm: the dense product runs on the block kernel, every block kept."""
    monkeypatch.delattr(torch, "_int_mm")
    x, w = torch.randn(3, 20, 70), torch.randn(45, 70)
    q_w, s_w = K.quantize_weight_int8(w)
    assert_matches(K.int8_linear(x, q_w, s_w), exact(x, q_w, s_w, None))
    assert_matches(K.int8_linear(x[:1, :1], q_w, s_w), exact(x[:1, :1], q_w, s_w, None))  # packed once, reused
    with pytest.raises(ConfigError, match="_int_mm"):
        K.int8_linear(x, q_w, s_w, path="c")


@needs_c
def test_amx_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(C, "AMX_ALLOWED", False)
    assert not C.amx() and not K.int8_capabilities()["kernel_amx"]
    _, q_w, s_w, layout = block_case(64, 96, (32, 32), 0.5)
    x = torch.randn(40, 96)
    assert_matches(K.block_sparse_int8_linear(x, K.pack_block_int8(q_w, layout), s_w), exact(x, q_w, s_w, None))
