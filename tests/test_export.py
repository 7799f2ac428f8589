"""torch.export and torch.compile take compressed and masked models whole.

The sparse layers run ``sparsenets::`` custom ops with fake implementations, so export captures
each as one node and ``torch.compile(fullgraph=True)`` traces them without a graph break.
Models are tiny: compile time, not arithmetic, dominates these tests.
"""

import pytest
import torch
from torch import nn

from sparsenets.kernels import cpu
from sparsenets.kernels.csr import csr_linear
from sparsenets.layers import BlockSparseConv2d, BlockSparseLinear
from sparsenets.layers.csr import CSRLinear
from sparsenets.masking import attach

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")

OPS = {"sparsenets.block_sparse_linear.default", "sparsenets.csr_linear.default"}


def _sparse_mlp() -> nn.Module:
    torch.manual_seed(0)
    keep = torch.tensor([[True, False, True], [False, True, True]])  # 2 x 3 blocks of 16x16
    block = BlockSparseLinear(48, 32, 16, keep)
    dense = torch.randn(8, 32)
    csr = CSRLinear.from_dense(dense, torch.rand(8, 32) < 0.3, torch.randn(8))
    return nn.Sequential(block, nn.ReLU(), csr)


def _ops_in(graph: torch.fx.Graph) -> set[str]:
    return {str(node.target) for node in graph.nodes if str(node.target).startswith("sparsenets.")}


def test_export_captures_the_sparse_ops_and_matches_eager():
    model = _sparse_mlp()
    batch = torch.export.Dim("batch", min=2)
    with torch.no_grad():  # eager inference calls the kernel directly; tracing must still take the op
        program = torch.export.export(model, (torch.randn(4, 48),), dynamic_shapes=({0: batch},))
    assert _ops_in(program.graph) == OPS
    for rows in (3, 17):  # a batch size it was not traced with
        x = torch.randn(rows, 48)
        torch.testing.assert_close(program.module()(x), model(x))


def test_export_takes_a_block_sparse_conv():
    torch.manual_seed(3)
    conv = BlockSparseConv2d(4, 8, 3, block=(4, 4), keep=torch.rand(2, 9) < 0.6, padding=1)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        program = torch.export.export(conv, (x,))
        torch.testing.assert_close(program.module()(x), conv(x))
    assert _ops_in(program.graph) == {"sparsenets.block_sparse_conv2d.default"}  # one op, no im2col


def test_compile_fullgraph_matches_eager_forward_and_backward():
    model = _sparse_mlp()
    graphs = []

    def inductor(gm, inputs):  # Inductor, keeping the graph Dynamo hands it
        graphs.append(gm.graph)
        return torch._inductor.compile(gm, inputs)

    compiled = torch.compile(model, fullgraph=True, backend=inductor)
    x = torch.randn(5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    y, y_ref = compiled(x), model(x_ref)
    torch.testing.assert_close(y, y_ref)
    assert [_ops_in(graph) for graph in graphs] == [OPS]  # one graph, the kernels in it
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *model.parameters()])
    names = ["x", *(name for name, _ in model.named_parameters())]
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, msg=f"gradient of {name}")


def test_csr_gradients_match_the_dense_layer():
    torch.manual_seed(1)
    weight, mask, bias = torch.randn(6, 10), torch.rand(6, 10) < 0.4, torch.randn(6)
    layer = CSRLinear.from_dense(weight, mask, bias)
    dense = nn.Linear(10, 6)
    with torch.no_grad():
        dense.weight.copy_(weight * mask)
        dense.bias.copy_(bias)
    x = torch.randn(2, 3, 10)
    grad_out = torch.randn(2, 3, 6)
    y, y_ref = layer(x.requires_grad_()), dense(x_ref := x.detach().clone().requires_grad_())
    torch.testing.assert_close(y, y_ref)
    gx, gv, gb = torch.autograd.grad(y, (x, layer.values, layer.bias), grad_out)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, dense.weight, dense.bias), grad_out)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gw_ref[mask])  # row-major order, as CSR stores them
    torch.testing.assert_close(gb, gb_ref)
    args = (x.reshape(6, 10), layer.values, layer.bias, layer.crow_indices, layer.col_indices, 6, 10)
    torch.library.opcheck(csr_linear, args)  # fake and autograd registrations as torch expects them


def test_masked_model_compiles_and_exports():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    attach(model[0], "weight", torch.rand(8, 12) < 0.5, "unstructured")
    x = torch.randn(3, 12)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))
