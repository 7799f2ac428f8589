"""The Triton kernels, run on CPU tensors by Triton's interpreter, against a dense reference.

Triton picks the interpreter when it decorates kernels (its own library included), so it must
see ``TRITON_INTERPRET=1`` before it is first imported: this file reruns itself in a fresh
pytest process with that set.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_triton_kernels_under_the_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

else:
    from sparsenets.kernels import BlockLayout, block_sparse_linear, scatter_blocks

    @pytest.mark.parametrize("shape, block, density, rows", [
        ((64, 64), (32, 32), 0.5, 5),
        ((70, 45), (16, 32), 0.6, 70),  # edges in both directions, two row tiles
        ((100, 37), (16, 16), 0.3, 1),
        ((48, 80), (16, 16), 1.0, 130),
    ])
    def test_triton_matches_dense(shape, block, density, rows):
        grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        keep = torch.rand(grid) < density
        keep[0] = False  # an empty row-block
        layout = BlockLayout.from_keep(keep, shape, block)
        values = torch.randn(layout.nnz, *block, requires_grad=True)
        bias = torch.randn(shape[0], requires_grad=True)
        x = torch.randn(rows, shape[1], requires_grad=True)

        y = block_sparse_linear(x, values, layout, bias, backend="triton")
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, values, bias), grad_out)

        values_ref = values.detach().clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = F.linear(x_ref, scatter_blocks(values_ref, layout), bias)
        grads_ref = torch.autograd.grad(y_ref, (x_ref, values_ref, bias), grad_out)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        for name, got, want in zip(("x", "values", "bias"), grads, grads_ref):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")

    def test_triton_rejects_blocks_it_cannot_tile():
        layout = BlockLayout.from_keep(torch.ones(2, 2, dtype=torch.bool), (16, 16), (8, 8))
        with pytest.raises(ValueError, match="powers of two >= 16"):
            block_sparse_linear(torch.randn(2, 16), torch.randn(4, 8, 8), layout, backend="triton")

    def test_triton_op_is_exported_as_one_node():
        from sparsenets.layers import BlockSparseLinear

        class TritonLayer(BlockSparseLinear):
            def _gemm(self, x):
                return block_sparse_linear(x, self.values, self.layout, self.bias, backend="triton")

        layer = TritonLayer(48, 32, 16, torch.tensor([[True, False, True], [False, True, True]]))
        x = torch.randn(5, 48)
        program = torch.export.export(layer, (x,))
        nodes = [n for n in program.graph.nodes if str(n.target) == "sparsenets.block_sparse_linear.default"]
        assert len(nodes) == 1 and nodes[0].args[-1] == "triton"
        torch.testing.assert_close(program.module()(x), F.linear(x, layer.dense_weight(), layer.bias),
                                   atol=1e-4, rtol=1e-4)
