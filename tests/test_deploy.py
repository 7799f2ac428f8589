"""The demo's last step: the winning ticket compressed, timed and saved."""

import json

import torch
from rich.console import Console

import sparsenets as sn
from sparsenets.experiments import load_recipe, run_recipe
from sparsenets.experiments.deploy import compress_winning_ticket, winning_level
from sparsenets.experiments.runner import RunDir
from sparsenets.methods import apply_masks, rewind_
from sparsenets.models import build_model

RECIPE = {
    "name": "deploy", "seeds": [0],
    "data": {"name": "teacher", "train_samples": 600, "test_samples": 200, "inputs": 16, "classes": 4},
    "model": {"name": "lenet_300_100", "hidden": [64, 32]},
    "train": {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32},
    "method": {"name": "lottery", "prune_fraction": 0.5, "rewind_step": 5},
    "sparsity": {"sparsity": 0.875, "allocation": "global"},
}


def test_winning_level_is_the_sparsest_ticket_at_dense_accuracy():
    summary = [
        {"arm": "dense", "level": 0, "remaining": 1.0, "accuracy_mean": 0.70},
        {"arm": "imp", "level": 1, "remaining": 0.5, "accuracy_mean": 0.72},
        {"arm": "imp", "level": 2, "remaining": 0.25, "accuracy_mean": 0.71},
        {"arm": "imp", "level": 3, "remaining": 0.12, "accuracy_mean": 0.60},
        {"arm": "reinit", "level": 3, "remaining": 0.12, "accuracy_mean": 0.90},
    ]
    assert winning_level({"summary": summary}) == 2
    below = [dict(e, accuracy_mean=0.5) if e["arm"] == "imp" else e for e in summary]
    below[1]["accuracy_mean"] = 0.55
    assert winning_level({"summary": below}) == 1  # none reaches dense: the most accurate


def test_the_winning_ticket_is_compressed_saved_and_reloads(tmp_path):
    recipe = load_recipe(RECIPE)
    results = run_recipe(recipe, tmp_path / "run", Console(quiet=True))
    run_dir = RunDir(tmp_path / "run")
    info = compress_winning_ticket(run_dir, recipe, results, Console(quiet=True))
    assert json.loads((run_dir.path / "compressed.json").read_text()) == info
    assert info["max_abs_error"] < 1e-4
    assert info["ticket_bytes"] < 0.5 * info["dense_bytes"]
    ticket = sn.load(run_dir.path / "ticket.safetensors")
    checkpoint = run_dir.load_checkpoint(info["job"])
    masked = build_model("lenet_300_100", (16,), 4, hidden=[64, 32])
    masked = rewind_(apply_masks(masked, checkpoint["masks"]), checkpoint["weights"]).eval()
    assert sn.report(masked).density == info["remaining"]
    x = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(ticket(x), masked(x))
