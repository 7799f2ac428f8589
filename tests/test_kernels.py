"""Block-sparse kernels against a dense reference: forward, input / values / bias gradients."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from sparsenets.kernels import (
    BlockLayout,
    block_keep,
    block_sparse_linear,
    choose_backend,
    cpu,
    gather_blocks,
    ops,
    scatter_blocks,
)
from sparsenets.kernels.cpu import build

BLOCKS = [(32, 32), (4, 4), (8, 8), (8, 1), (1, 8), (16, 32), (2, 2), (3, 5), (4, 16), (12, 20)]
needs_cpu_kernels = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernels")


def random_layout(out_features, in_features, block, density, generator=None):
    grid = (-(-out_features // block[0]), -(-in_features // block[1]))
    keep = torch.rand(grid, generator=generator) < density
    return BlockLayout.from_keep(keep, (out_features, in_features), block)


def reference(x, values, layout, bias, grad_out):
    """Dense F.linear with the scattered weight; returns output and grads (x, values, bias)."""
    x = x.detach().clone().requires_grad_()
    values = values.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = F.linear(x, scatter_blocks(values, layout), bias)
    inputs = [x, values] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, inputs, grad_out)
    return y.detach(), grads


def check_against_reference(layout, lead, backend, bias=True, dtype=torch.float32, atol=1e-4):
    values = torch.randn(layout.nnz, *layout.block, dtype=dtype, requires_grad=True)
    b = torch.randn(layout.out_features, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(*lead, layout.in_features, dtype=dtype, requires_grad=True)
    y = block_sparse_linear(x, values, layout, b, backend=backend)
    grad_out = torch.randn_like(y)
    inputs = [x, values] + ([b] if bias else [])
    grads = torch.autograd.grad(y, inputs, grad_out)
    y_ref, grads_ref = reference(x, values, layout, b, grad_out)
    assert y.shape == (*lead, layout.out_features)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    for name, got, want in zip(("x", "values", "bias"), grads, grads_ref):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=f"gradient of {name}")


# ---- the format ------------------------------------------------------------------------------------


def test_layout_indices_agree():
    layout = random_layout(70, 45, (16, 8), 0.5, torch.Generator().manual_seed(1))
    rows, cols = layout.grid
    assert layout.row_ptr.numel() == rows + 1 and layout.t_ptr.numel() == cols + 1
    # Row order: row_idx ascending, and each entry of row i is between row_ptr[i] and row_ptr[i+1].
    for i in range(rows):
        assert (layout.row_idx[layout.row_ptr[i]:layout.row_ptr[i + 1]] == i).all()
    # Column order lists every block once, grouped by column, rows ascending within a column.
    assert sorted(layout.t_block.tolist()) == list(range(layout.nnz))
    for j in range(cols):
        part = slice(layout.t_ptr[j], layout.t_ptr[j + 1])
        assert (layout.col_idx[layout.t_block[part]] == j).all()
        assert (layout.t_row[part] == layout.row_idx[layout.t_block[part]]).all()
        assert layout.t_row[part].tolist() == sorted(layout.t_row[part].tolist())


def test_gather_scatter_round_trip_zeroes_outside_blocks():
    weight = torch.randn(37, 50)
    mask = torch.zeros(37, 50, dtype=torch.bool)
    mask[:5, 40:] = True  # touches the edge blocks in both directions
    mask[20, 3] = True
    layout = BlockLayout.from_mask(mask, (8, 16))
    assert block_keep(mask, (8, 16)).sum().item() == layout.nnz == 3
    dense = scatter_blocks(gather_blocks(weight, layout), layout)
    kept = block_keep(mask, (8, 16)).repeat_interleave(8, 0).repeat_interleave(16, 1)[:37, :50]
    torch.testing.assert_close(dense, weight * kept)


def test_bad_structure_is_rejected():
    with pytest.raises(ValueError, match="block map of shape"):
        BlockLayout.from_keep(torch.ones(3, 3, dtype=torch.bool), (64, 64), (32, 32))
    with pytest.raises(ValueError, match="col_idx out of range"):
        BlockLayout.from_csr(torch.tensor([0, 1]), torch.tensor([5]), (32, 64), (32, 32))
    layout = random_layout(64, 64, (32, 32), 1.0)
    with pytest.raises(ValueError, match="features in its last dimension"):
        block_sparse_linear(torch.randn(2, 63), torch.randn(4, 32, 32), layout)
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_linear(torch.randn(2, 64), torch.randn(4, 32, 32), layout, backend="gpu")
    with pytest.raises(ValueError, match="float32"):
        block_sparse_linear(torch.randn(2, 64).double(), torch.randn(4, 32, 32).double(), layout, backend="cpu")


# ---- numerical agreement ----------------------------------------------------------------------------


@needs_cpu_kernels
@given(out_features=st.integers(1, 80), in_features=st.integers(1, 80), block=st.sampled_from(BLOCKS),
       density=st.sampled_from([0.0, 0.3, 0.7, 1.0]), lead=st.sampled_from([(1,), (3,), (13,), (2, 9), (40,)]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_kernels_match_dense(out_features, in_features, block, density, lead, bias, seed):
    torch.manual_seed(seed)
    layout = random_layout(out_features, in_features, block, density)
    check_against_reference(layout, lead, "cpu", bias)


@given(out_features=st.integers(1, 40), in_features=st.integers(1, 40), block=st.sampled_from(BLOCKS),
       density=st.sampled_from([0.0, 0.5, 1.0]), lead=st.sampled_from([(1,), (5,), (2, 3)]),
       seed=st.integers(0, 2**16))
def test_torch_fallback_matches_dense(out_features, in_features, block, density, lead, seed):
    torch.manual_seed(seed)
    check_against_reference(random_layout(out_features, in_features, block, density), lead, "torch")


@needs_cpu_kernels
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rows", [1, 7, 8, 12, 100, 301])  # gemv below 8 rows; shared or per-thread tiles
def test_cpu_kernels_every_path(block, rows):
    check_against_reference(random_layout(300, 200, block, 0.3), (rows,), "cpu")


@needs_cpu_kernels
@pytest.mark.parametrize("block", [(32, 32), (8, 8), (4, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_inputs_wider_than_the_cache_split_into_row_groups_and_batch_chunks(block, threads):
    """2100 inputs: several row groups per thread in the forward and several batch chunks in the
    weight gradient (both sized from the L2 cache), with edges that divide by nothing."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(random_layout(70, 2100, block, 0.2), (301,), "cpu")
    finally:
        torch.set_num_threads(before)


@needs_cpu_kernels
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_inference_with_few_rows_matches_dense(block, rows):
    """Without grad, few rows read W as stored (the batch-1 kernel), with the bias."""
    layout = random_layout(150, 330, block, 0.4)
    values, x, bias = torch.randn(layout.nnz, *block), torch.randn(rows, 330), torch.randn(150)
    with torch.no_grad():
        got = block_sparse_linear(x, values, layout, bias)
    torch.testing.assert_close(got, F.linear(x, scatter_blocks(values, layout), bias), atol=1e-4, rtol=1e-4)


@needs_cpu_kernels
def test_forward_panels_are_cached_for_frozen_weights_and_repacked_after_a_change():
    layout = random_layout(64, 96, (32, 32), 0.6)
    values, x = torch.randn(layout.nnz, 32, 32), torch.randn(20, 96)
    with torch.no_grad():
        first = block_sparse_linear(x, values, layout)
        values.mul_(2)  # in place: the version counter moves, so the cached panels are stale
        second = block_sparse_linear(x, values, layout)
    torch.testing.assert_close(second, 2 * first)
    torch.testing.assert_close(second, F.linear(x, scatter_blocks(values, layout)), atol=1e-4, rtol=1e-4)


@needs_cpu_kernels
def test_few_output_blocks_split_the_rows_between_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_against_reference(random_layout(50, 300, (32, 32), 0.7), (100,), "cpu")  # 2 row-blocks
        check_against_reference(random_layout(300, 40, (32, 32), 0.7), (100,), "cpu")  # 2 column-blocks (dX)
    finally:
        torch.set_num_threads(before)


@needs_cpu_kernels
def test_empty_row_blocks_give_bias_and_empty_columns_get_no_gradient():
    keep = torch.zeros(4, 3, dtype=torch.bool)
    keep[1, 0] = keep[3, 2] = True  # row-blocks 0 and 2 and column-block 1 are empty
    layout = BlockLayout.from_keep(keep, (128, 96), (32, 32))
    check_against_reference(layout, (20,), "cpu")
    x = torch.randn(20, 96, requires_grad=True)
    bias = torch.randn(128)
    y = block_sparse_linear(x, torch.randn(2, 32, 32), layout, bias)
    torch.testing.assert_close(y[:, :32], bias[:32].expand(20, 32))
    y.sum().backward()
    assert (x.grad[:, 32:64] == 0).all()


@needs_cpu_kernels
def test_all_dense_and_all_empty():
    check_against_reference(random_layout(96, 64, (32, 32), 1.0), (17,), "cpu")
    layout = random_layout(96, 64, (32, 32), 0.0)
    assert layout.nnz == 0
    check_against_reference(layout, (17,), "cpu")


@needs_cpu_kernels
def test_non_contiguous_and_strided_inputs():
    layout = random_layout(50, 40, (8, 8), 0.5)
    values = torch.randn(layout.nnz, 8, 8)
    wide = torch.randn(30, 70)[:, 5:45]  # rows with a stride larger than their length
    transposed = torch.randn(40, 30).t()  # columns not unit-stride
    expanded = torch.randn(1, 40).expand(30, 40)
    for x in (wide, transposed, expanded):
        torch.testing.assert_close(block_sparse_linear(x, values, layout),
                                   F.linear(x, scatter_blocks(values, layout)), atol=1e-4, rtol=1e-4)


@needs_cpu_kernels
def test_empty_batch():
    layout = random_layout(50, 40, (8, 8), 0.5)
    x = torch.randn(0, 40, requires_grad=True)
    values = torch.randn(layout.nnz, 8, 8, requires_grad=True)
    y = block_sparse_linear(x, values, layout)
    assert y.shape == (0, 50)
    y.sum().backward()
    assert (values.grad == 0).all()


@needs_cpu_kernels
def test_results_do_not_depend_on_thread_count():
    layout = random_layout(256, 256, (32, 32), 0.5)
    values, x = torch.randn(layout.nnz, 32, 32), torch.randn(64, 256)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(block_sparse_linear(x, values, layout))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0], outputs[1])


def test_float64_takes_the_torch_path_and_passes_gradcheck():
    layout = random_layout(9, 7, (4, 4), 0.6, torch.Generator().manual_seed(3))
    values = torch.randn(layout.nnz, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert choose_backend(x, values, layout) == "torch"
    assert torch.autograd.gradcheck(lambda a, v, b: block_sparse_linear(a, v, layout, b), (x, values, bias))


def test_environment_forces_the_fallback(monkeypatch):
    layout = random_layout(16, 16, (4, 4), 0.5)
    monkeypatch.setenv("SPARSENETS_KERNELS", "torch")
    assert choose_backend(torch.randn(2, 16), torch.randn(layout.nnz, 4, 4), layout) == "torch"


# ---- building the C library ---------------------------------------------------------------------------


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    def fail(source=None):
        raise build.BuildError("no C compiler found")

    monkeypatch.setattr(build, "load", fail)
    cpu.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layout = random_layout(20, 12, (4, 4), 0.5)
            for _ in range(3):
                check_against_reference(layout, (5,), "auto")
        messages = [str(w.message) for w in caught if "CPU kernels unavailable" in str(w.message)]
        assert len(messages) == 1 and "no C compiler found" in messages[0]
        assert not cpu.available()
    finally:
        cpu.library.cache_clear()


_BUILD_AND_RUN = """
import torch
from sparsenets.kernels import cpu, BlockLayout
assert cpu.available()
layout = BlockLayout.from_keep(torch.ones(2, 2, dtype=torch.bool), (16, 16), (8, 8))
values = torch.randn(4, 8, 8)
x = torch.randn(3, 16)
from sparsenets.kernels import scatter_blocks
torch.testing.assert_close(cpu.linear(x, values, layout), x @ scatter_blocks(values, layout).t())
"""


def test_racing_builds_leave_one_library(tmp_path, monkeypatch):
    """Several first uses at once: one builds (under the folder's lock), the others reuse it."""
    from concurrent.futures import ThreadPoolExecutor

    source = tmp_path / "tiny.c"
    source.write_text("int bsp_answer(void) { return 42; }\n")
    monkeypatch.setattr(build, "SOURCE", source)
    monkeypatch.setenv("SPARSENETS_CACHE", str(tmp_path / "cache"))
    try:
        build.compiler()
    except build.BuildError:
        pytest.skip("no C compiler")
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: build.build(), range(4)))
    assert len(set(paths)) == 1
    built = sorted(p.name for p in (tmp_path / "cache" / "kernels").iterdir() if p.name != ".lock")
    assert built == [paths[0].name, paths[0].name + build.DIGEST_SUFFIX]  # no temporaries left behind
    import ctypes
    assert ctypes.CDLL(str(paths[0])).bsp_answer() == 42


@pytest.mark.slow
@needs_cpu_kernels
def test_concurrent_first_builds_in_two_processes(tmp_path):
    env = {**os.environ, "SPARSENETS_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir() if p.name != ".lock")
    assert len(built) == 2 and built[0].endswith(".so") and built[1] == built[0] + build.DIGEST_SUFFIX


def test_autocast_computes_in_the_autocast_dtype():
    layout = random_layout(40, 24, (8, 8), 0.5)
    values = torch.randn(layout.nnz, 8, 8, requires_grad=True)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_sparse_linear(x, values, layout)
        y_ref = F.linear(x, scatter_blocks(values, layout))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.1, rtol=0.05)
    y.float().sum().backward()
    assert values.grad.dtype == torch.float32


# ---- the benchmark command ------------------------------------------------------------------------------


def test_bench_command_writes_rows(tmp_path, capsys):
    import json

    from sparsenets.cli import main

    out = tmp_path / "bench.json"
    umask = os.umask(0o027)
    try:
        code = main(["bench", "--shapes", "64x96", "--sparsities", "0.5", "--batches", "3", "--block", "16x16",
                     "--repeats", "2", "--warmup", "0", "--impls", "dense", "sparsenets", "torch-bsr",
                     "--modes", "forward", "forward+backward", "--json", str(out)])
    finally:
        os.umask(umask)
    assert code == 0
    assert out.stat().st_mode & 0o777 == 0o640  # the user's usual permissions, not a temporary's 0600
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["forward", "forward+backward"]
    forward, backward = rows
    assert forward["shape"] == [64, 96] and forward["pattern"] == "block:16x16" and forward["batch"] == 3
    assert forward["density"] == pytest.approx(0.5, abs=0.05)
    assert set(forward["ms"]) == {"dense", "sparsenets", "torch-bsr"}
    assert forward["speedup"]["sparsenets"] == pytest.approx(forward["ms"]["dense"] / forward["ms"]["sparsenets"])
    assert forward["fraction_of_ideal"]["sparsenets"] == pytest.approx(
        forward["speedup"]["sparsenets"] * forward["density"])
    assert "torch-bsr" in backward["notes"] and "torch-bsr" not in backward["ms"]
    assert "sparsenets" in capsys.readouterr().out


def test_bench_command_rejects_bad_values(capsys):
    from sparsenets.cli import main

    for args, message in ((["--sparsities", "1.5"], "sparsity must be"), (["--block", "3x"], "block must look"),
                          (["--shapes", "12"], "shape must look")):
        with pytest.raises(SystemExit):
            main(["bench", *args])
        assert message in capsys.readouterr().err


def test_bench_help(capsys):
    from sparsenets.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    assert "usage: sparsenets bench" in capsys.readouterr().out


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [3, 20])  # the row-by-row and the tiled forward
def test_custom_op_matches_dense_and_passes_opcheck(rows):
    """The op torch.compile/export record: same results, and fake/autograd registrations torch accepts."""
    layout = random_layout(40, 70, (16, 8), 0.5, torch.Generator().manual_seed(5))
    values = torch.randn(layout.nnz, 16, 8, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    x = torch.randn(rows, 70, requires_grad=True)
    y = ops.linear(x, values, layout, bias, "cpu")
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, values, bias), grad_out)
    y_ref, grads_ref = reference(x, values, layout, bias, grad_out)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    for name, got, want in zip(("x", "values", "bias"), grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")
    args = (x, values, bias, ops.index_tensors(layout), 40, 70, 16, 8, "cpu")
    torch.library.opcheck(ops.linear_op, args)
