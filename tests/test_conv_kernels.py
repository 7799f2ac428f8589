"""The convolution kernels match float64 torch convolutions, forward and backward, and compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsenets.kernels import BlockLayout, gather_blocks, scatter_blocks
from sparsenets.kernels import conv as conv_ops
from sparsenets.kernels.cpu import conv as conv_kernels
from sparsenets.layers import BlockSparseConv1d, BlockSparseConv2d

pytestmark = pytest.mark.skipif(not conv_kernels.available(), reason="no C compiler for the convolution kernels")

BLOCKS = [(32, 32), (4, 4), (8, 4), (3, 5), (1, 8)]


def random_layer(cls, in_channels, out_channels, kernel, block, density, generator, **conv_args):
    """A layer keeping random blocks with random values (zero in the padding of edge blocks)."""
    taps = kernel[0] * kernel[1] if isinstance(kernel, tuple) else kernel
    grid = (-(-out_channels // block[0]), -(-in_channels * taps // block[1]))
    keep = torch.rand(grid, generator=generator) < density
    layer = cls(in_channels, out_channels, kernel, block, keep, **conv_args)
    with torch.no_grad():
        layer.values.normal_(generator=generator)
        layer.values.copy_(gather_blocks(scatter_blocks(layer.values, layer.layout), layer.layout))
        if layer.bias is not None:
            layer.bias.normal_(generator=generator)
    return layer


def reference(layer, x):
    """The float64 torch convolution with the layer's dense weight, and its gradients."""
    conv = F.conv2d if layer.dims == 2 else F.conv1d
    weight = layer.dense_weight().detach().double().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    padded = F.pad(x, layer._pad) if any(layer._pad) else x
    y = conv(padded, weight, bias, stride=layer.stride, dilation=layer.dilation)
    return y, x, weight, bias


def check(layer, x):
    """Forward and every gradient (input, kept blocks, bias) against float64."""
    x = x.requires_grad_()
    y = layer(x)
    y_ref, x_ref, weight_ref, bias_ref = reference(layer, x)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    assert y.is_contiguous()
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-4, rtol=1e-4)
    expected = gather_blocks(weight_ref.grad.reshape(layer.out_channels, -1), layer.layout)
    got = layer.values.grad if layer.values.grad is not None else torch.zeros_like(layer.values)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad.double(), bias_ref.grad, atol=1e-4, rtol=1e-4)


@pytest.fixture
def direct_only(monkeypatch):
    """Fails a test that reaches the unfolded-patches path at stride 1."""
    unfolded = BlockSparseConv2d._unfolded

    def guarded(self, x, kernel, stride, dilation):
        assert stride != (1, 1), "a stride-1 convolution unfolded its input"
        return unfolded(self, x, kernel, stride, dilation)
    monkeypatch.setattr(BlockSparseConv2d, "_unfolded", guarded)


@settings(max_examples=30, deadline=None)
@given(in_channels=st.integers(1, 40), out_channels=st.integers(1, 40), block=st.sampled_from(BLOCKS),
       kernel=st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 2)]), padding=st.sampled_from([0, 1, "same"]),
       stride=st.sampled_from([1, 1, 2]), dilation=st.sampled_from([1, 2]), batch=st.sampled_from([1, 3]),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)), density=st.sampled_from([0.0, 0.3, 1.0]),
       bias=st.booleans(), strided_input=st.booleans(), seed=st.integers(0, 2**16))
def test_conv2d_matches_float64(in_channels, out_channels, block, kernel, padding, stride, dilation, batch, size,
                                density, bias, strided_input, seed):
    if padding == "same" and stride != 1:
        stride = 1
    pad = [(k - 1) * dilation // 2 for k in kernel] if padding == "same" else [padding, padding]
    if any(s + 2 * p < dilation * (k - 1) + 1 for s, p, k in zip(size, pad, kernel)):
        return  # no output pixel: torch refuses too
    generator = torch.Generator().manual_seed(seed)
    layer = random_layer(BlockSparseConv2d, in_channels, out_channels, kernel, block, density, generator,
                         stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(batch, *size, in_channels, generator=generator)
    x = x.permute(0, 3, 1, 2) if strided_input else x.permute(0, 3, 1, 2).contiguous()
    check(layer, x)


@settings(max_examples=15, deadline=None)
@given(in_channels=st.integers(1, 24), out_channels=st.integers(1, 24), block=st.sampled_from(BLOCKS),
       kernel=st.sampled_from([1, 3, 4]), padding=st.sampled_from([0, 1, "same"]), dilation=st.sampled_from([1, 2]),
       length=st.integers(1, 40), batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_conv1d_matches_float64(in_channels, out_channels, block, kernel, padding, dilation, length, batch, seed):
    pad = (kernel - 1) * dilation // 2 if padding == "same" else padding
    if length + 2 * pad < dilation * (kernel - 1) + 1:
        return
    generator = torch.Generator().manual_seed(seed)
    layer = random_layer(BlockSparseConv1d, in_channels, out_channels, kernel, block, 0.5, generator,
                         padding=padding, dilation=dilation)
    check(layer, torch.randn(batch, in_channels, length, generator=generator))


def test_stride_one_reads_the_input_in_place(direct_only):
    generator = torch.Generator().manual_seed(1)
    layer = random_layer(BlockSparseConv2d, 37, 45, (3, 3), (32, 32), 0.6, generator, padding=1)
    check(layer, torch.randn(3, 37, 11, 13, generator=generator))


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_other_padding_modes(mode, direct_only):
    generator = torch.Generator().manual_seed(7)
    layer = random_layer(BlockSparseConv2d, 6, 9, (3, 3), (4, 4), 0.6, generator, padding=(1, 2), padding_mode=mode)
    dense = nn.Conv2d(6, 9, 3, padding=(1, 2), padding_mode=mode)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 5, 7, generator=generator, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_tiny_images_and_big_ones_agree(direct_only):
    generator = torch.Generator().manual_seed(2)
    layer = random_layer(BlockSparseConv2d, 20, 70, (3, 3), (32, 32), 0.5, generator, padding=1)
    for size in [(1, 1), (2, 3), (45, 50), (64, 64)]:  # the big ones: more pixels than one run of Z
        layer.zero_grad()
        check(layer, torch.randn(2, 20, *size, generator=generator))


def test_all_empty_weight_gives_the_bias_and_zero_gradients(direct_only):
    layer = BlockSparseConv2d(6, 10, 3, block=(4, 4), keep=torch.zeros(3, 14, dtype=torch.bool), padding=1)
    assert layer.layout.nnz == 0
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, layer.bias.detach().view(1, -1, 1, 1).expand_as(y))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    layer.zero_grad()
    check(layer, torch.randn(1, 6, 4, 3))


def test_kernels_alone_with_uneven_padding():
    """The ctypes wrappers alone: ragged edge blocks, dilation, bias, a different zero pad per side."""
    generator = torch.Generator().manual_seed(3)
    keep = torch.rand(3, 9, generator=generator) < 0.5
    keep[0, 0] = True
    layout = BlockLayout.from_keep(keep, (11, 7 * 6), (4, 5))
    values = gather_blocks(torch.randn(11, 42, generator=generator), layout)
    weight = scatter_blocks(values, layout).reshape(11, 7, 2, 3)
    x, bias = torch.randn(2, 7, 9, 10, generator=generator), torch.randn(11, generator=generator)
    padding, pad = (1, 0, 2, 3), [2, 3, 1, 0]  # top, bottom, left, right; F.pad's order
    y = conv_kernels.forward(x, values, layout, bias, (2, 3), (2, 1), padding)
    torch.testing.assert_close(y, F.conv2d(F.pad(x, pad), weight, bias, dilation=(2, 1)), atol=1e-4, rtol=1e-4)
    grad_out = torch.randn_like(y)
    x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
    F.conv2d(F.pad(x_ref, pad), w_ref, dilation=(2, 1)).backward(grad_out)
    dx = conv_kernels.input_grad(grad_out, values, layout, (9, 10), (2, 3), (2, 1), padding)
    torch.testing.assert_close(dx, x_ref.grad, atol=1e-4, rtol=1e-4)
    dv = conv_kernels.values_grad(grad_out, x, layout, (2, 3), (2, 1), padding)
    torch.testing.assert_close(dv, gather_blocks(w_ref.grad.reshape(11, -1), layout), atol=1e-4, rtol=1e-4)


def test_threads_split_the_work_without_changing_the_result():
    generator = torch.Generator().manual_seed(4)
    layer = random_layer(BlockSparseConv2d, 64, 64, (3, 3), (32, 32), 0.5, generator, padding=1)
    x = torch.randn(1, 64, 30, 30, generator=generator, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            layer.zero_grad()
            x.grad = None
            y = layer(x)
            y.square().sum().backward()
            results.append((y.detach(), x.grad, layer.values.grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-5)


def _model():
    generator = torch.Generator().manual_seed(5)
    return nn.Sequential(random_layer(BlockSparseConv2d, 5, 12, (3, 3), (4, 4), 0.5, generator, padding=1),
                         nn.ReLU(), random_layer(BlockSparseConv2d, 12, 6, (1, 3), (4, 4), 0.5, generator,
                                                 padding="same", dilation=2))


def _ops_in(graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if str(node.target).startswith("sparsenets.")}


def test_compile_fullgraph_forward_and_backward():
    model = _model()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm.graph)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        keep = lambda g, _: make_boxed_func(g)  # noqa: E731  (AOTAutograd's graphs, run as they are)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 7, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = compiled(x), model(x_ref)
    torch.testing.assert_close(y, y_ref)
    assert [_ops_in(graph) for graph in graphs] == [{"sparsenets.block_sparse_conv2d.default"}]
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *model.parameters()])
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected)


def test_export_keeps_the_conv_op():
    model, x = _model(), torch.randn(2, 5, 7, 6)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x))
    assert _ops_in(program.graph) == {"sparsenets.block_sparse_conv2d.default"}


def test_the_op_and_its_registered_gradients():
    """The custom op called as such (the path compiled graphs take) against torch's own gradients."""
    generator = torch.Generator().manual_seed(6)
    keep = torch.rand(2, 5, generator=generator) < 0.7
    layout = BlockLayout.from_keep(keep, (7, 3 * 6), (4, 4))
    values = gather_blocks(torch.randn(7, 18, generator=generator), layout).requires_grad_()
    x = torch.randn(2, 3, 5, 6, generator=generator, requires_grad=True)
    bias = torch.randn(7, generator=generator, requires_grad=True)
    index = [getattr(layout, name) for name in ("row_ptr", "col_idx", "row_idx", "t_ptr", "t_row", "t_block")]
    y = conv_ops.conv2d_op(x, values, bias, index, 7, 18, 4, 4, 2, 3, 1, 1, 1, 1, 0, 2)
    grads = torch.autograd.grad(y.square().sum(), [x, values, bias])
    weight = scatter_blocks(values, layout).reshape(7, 3, 2, 3)
    y_ref = F.conv2d(F.pad(x, [0, 2, 1, 1]), weight, bias)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, values, bias])
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


_OTHER_WIDTHS = """
import torch, torch.nn.functional as F
from sparsenets.kernels.cpu import conv
from sparsenets.layers import BlockSparseConv2d
print(conv.describe())
g = torch.Generator().manual_seed(0)
layer = BlockSparseConv2d(13, 21, 3, block=(8, 4), keep=torch.rand(3, 30, generator=g) < 0.6, padding=1)
x = torch.randn(3, 13, 9, 11, generator=g, requires_grad=True)
y = layer(x)
y.square().sum().backward()
x_ref = x.detach().clone().requires_grad_()
w_ref = layer.dense_weight().detach().requires_grad_()
y_ref = F.conv2d(x_ref, w_ref, layer.bias, padding=1)
y_ref.square().sum().backward()
torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-3, rtol=1e-4)
from sparsenets.kernels import gather_blocks
expected = gather_blocks(w_ref.grad.reshape(21, -1), layer.layout)
torch.testing.assert_close(layer.values.grad, expected, atol=1e-3, rtol=1e-4)
"""


@pytest.mark.parametrize(("flags", "width"), [("-O3 -march=x86-64-v3 -fopenmp", 8), ("-O3 -march=x86-64", 4)])
def test_narrower_vector_builds(flags, width, tmp_path):
    """AVX2 and plain 4-wide builds (the second without OpenMP) compute the same, in a fresh process."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("x86 build flags")
    env = {**os.environ, "SPARSENETS_CFLAGS": flags, "SPARSENETS_CACHE": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _OTHER_WIDTHS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{width}-float vectors" in result.stdout
