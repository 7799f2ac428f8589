"""``sparsenets bench --suite``: its table, its end-to-end models and its command line."""

import copy

import pytest
import torch

from sparsenets import finalize_, sparsify_
from sparsenets.bench.end_to_end import compressed, mlp_block
from sparsenets.bench.suite import table
from sparsenets.cli import main


def _row(speedup, goal):
    return {"kind": "linear", "case": "32x32 blocks, 90%", "batch": 512, "mode": "forward", "threads": 2,
            "dense_ms": 10.0, "sparsenets_ms": 10.0 / speedup, "speedup": speedup, "goal": goal,
            "peers": {"torch CSR": 1.5}}


def test_table_marks_each_goal_met_or_missed():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table([_row(9.0, 8.0), _row(6.0, 8.0), _row(2.0, None)]))
    text = console.export_text()
    assert "9.00x ✓" in text and "6.00x ✗" in text and "2.00x" in text
    assert "≥ 8x" in text and "torch CSR 1.50x" in text


def test_end_to_end_model_is_the_pruned_model_made_fast():
    dense, _ = mlp_block(hidden=256, ffn=512)
    x = torch.randn(16, 256)
    fast = compressed(dense, x, sparsity=0.5, block=16, autotune=False)  # the rule: block kernels
    pruned = finalize_(sparsify_(copy.deepcopy(dense), {"sparsity": 0.5, "pattern": "block:16x16",
                                                        "module_types": ["Linear"]}))
    assert [type(m).__name__ for m in fast.modules() if "Sparse" in type(m).__name__] == ["BlockSparseLinear"] * 2
    with torch.no_grad():
        torch.testing.assert_close(fast(x), pruned(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(pruned(x), dense(x), atol=1e-3)  # the pruning did something


def test_suite_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "--suite" in out and "AVX-512" in out


def test_quick_without_suite_is_refused():
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--quick"])
    assert "--suite" in str(refused.value)


def test_training_bench_times_every_mode_and_keeps_the_models_sparse():
    from sparsenets.bench import training

    masks = training.mask_cost(sparsities=(0.5,), batch=4, rounds=1, models=("transformer",))
    assert [(r["model"], r["sparsity"]) for r in masks] == [("transformer", 0.5)]
    assert masks[0]["masked_ms"] > 0 and masks[0]["masked_over_dense"] > 0
    rows = training.rigl_steps(sparsities=(0.5, 0.75), width=64, batch=8, block=16, rounds=1)
    rows += training.rigl_steps(sparsities=(0.5,), width=32, batch=2, block=16, rounds=1, model="cnn")
    assert [(r["model"], r["sparsity"]) for r in rows] == [("mlp", 0.5), ("mlp", 0.75), ("cnn", 0.5)]
    for row in rows:
        for mode in ("masked", "fast"):
            assert row[f"{mode}_ms"] > 0 and row[f"{mode}_speedup"] > 0
            assert 0 < row[f"{mode}_update_share"] < 1


def test_training_bench_command_refuses_two_tables_at_once(capsys):
    with pytest.raises(SystemExit, match="one of --suite and --training"):
        main(["bench", "--suite", "--training"])
