"""Devices and precision: ``train.device``/``--device``, autocast in the trainer, compress in half precision."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import yaml
from torch import nn

import sparsenets as sn
from sparsenets.cli import main
from sparsenets.errors import ConfigError, RecipeError
from sparsenets.experiments import load_dataset, load_recipe, run_recipe
from sparsenets.experiments.devices import resolve_device
from sparsenets.experiments.trainer import TrainConfig, Trainer, evaluate
from sparsenets.methods import LotteryTicket

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
N_CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0

RECIPE = {
    "name": "devices", "seeds": [0],
    "data": {"name": "teacher", "train_samples": 128, "test_samples": 64, "inputs": 8, "classes": 3},
    "model": {"name": "lenet_300_100", "hidden": [16]},
    "train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32},
    "method": {"name": "lottery", "prune_fraction": 0.5, "rewind_step": 2, "controls": ["reinit", "random"]},
    "sparsity": {"sparsity": 0.7},
}


def _recipe(**train) -> dict:
    return {**RECIPE, "train": {**RECIPE["train"], **train}}


def _teacher():
    return load_dataset("teacher", train_samples=128, test_samples=64, inputs=8, classes=3)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


# ---- the options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", "cuda:0 "])
def test_a_malformed_device_is_a_recipe_error_naming_it(name):
    with pytest.raises(RecipeError, match=r"train\.device: must be cpu, cuda, cuda:N or auto.*" + name.strip()[:3]):
        load_recipe(_recipe(device=name))


def test_auto_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device("auto") == torch.device("cuda:0" if N_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_unavailable_cuda_device_is_an_error_naming_it_before_anything_is_written(tmp_path):
    recipe = load_recipe(_recipe(device=f"cuda:{N_CUDA}"))  # valid everywhere: checked when it runs
    with pytest.raises(RecipeError, match=rf"train\.device: device 'cuda:{N_CUDA}' is not available"):
        run_recipe(recipe, tmp_path / "run")
    with pytest.raises(RecipeError, match=rf"--device: device 'cuda:{N_CUDA}' is not available"):
        run_recipe(load_recipe(RECIPE), tmp_path / "run", device=f"cuda:{N_CUDA}")
    assert not (tmp_path / "run").exists()


def test_float16_on_the_cpu_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="train.precision: precision 'float16' needs a CUDA device"):
        run_recipe(load_recipe(_recipe(precision="float16")), tmp_path / "run", device="cpu")
    with pytest.raises(ConfigError, match="float16"):
        Trainer(_mlp(), _teacher(), TrainConfig(precision="float16", device="cpu"))
    assert not (tmp_path / "run").exists()


def test_the_device_is_not_part_of_the_recipe_identity_but_the_precision_is():
    base = load_recipe(RECIPE).to_dict()
    assert "device" not in base["train"] and "precision" not in base["train"]  # float32: as before it existed
    assert load_recipe(_recipe(device="auto")).to_dict() == base
    assert load_recipe(_recipe(precision="bfloat16")).to_dict()["train"]["precision"] == "bfloat16"
    assert load_recipe(_recipe(device="cuda:7")).train.device == "cuda:7"  # to_dict copies: the recipe keeps it


# ---- training in bfloat16 on the CPU ---------------------------------------------------------------


def test_a_bfloat16_autocast_run_finishes_with_finite_losses():
    data = _teacher()
    model = _mlp()
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    history = Trainer(model, data, TrainConfig(epochs=3, batch_size=32, lr=0.01, precision="bfloat16")).fit()
    assert set(seen) == {torch.bfloat16}  # training and evaluation both ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
    assert all(math.isfinite(row[key]) for row in history for key in ("train_loss", "test_loss"))
    assert history[-1]["train_loss"] < history[0]["train_loss"] or history[-1]["test_accuracy"] > 0.5


def test_evaluate_autocasts_only_when_asked():
    data, model = _teacher(), _mlp()
    full = evaluate(model, data.x_test, data.y_test)
    half = evaluate(model, data.x_test, data.y_test, precision="bfloat16")
    assert full["loss"] != half["loss"] and abs(full["loss"] - half["loss"]) < 0.05


def test_a_recipe_in_bfloat16_runs_to_the_end(tmp_path):
    results = run_recipe(load_recipe(_recipe(precision="bfloat16")), tmp_path / "run")
    assert results["complete"]
    assert all(math.isfinite(job["test_loss"]) for job in results["jobs"])
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["precision"] == "bfloat16"


def test_device_flag_resumes_a_run_without_calling_it_another_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(device="cpu")))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    recipe.write_text(yaml.safe_dump(_recipe(device="auto")))
    assert main(["run", str(recipe), "--out", str(out), "--device", "auto"]) == 0
    assert "is complete" in capsys.readouterr().out
    assert main(["run", str(recipe), "--out", str(out), "--device", "tpu"]) == 2
    assert "--device: device 'tpu' is not one of cpu, cuda, cuda:N, auto" in capsys.readouterr().err


# ---- compress in half precision ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,sparsity,kernel", [("block:8x8", 0.9, "block"), ("unstructured", 0.97, "dense")])
def test_compress_in_half_precision_matches_the_masked_model(dtype, pattern, sparsity, kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    sn.sparsify_(model, {"sparsity": sparsity, "pattern": pattern, "exclude": ["4"]})
    model = model.to(dtype).eval()
    x = torch.randn(32, 64, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no check may fail: half-precision tolerances, not float32 ones
        fast = sn.compress(model, x, autotune=False)
    report = fast.compress_report
    assert [c.kind for c in report.layers] == [kernel, kernel]  # what the report says was chosen ...
    if kernel == "dense":  # ... and why: CPU sparse CSR has no half-precision matmul
        assert all("csr kernel does not run" in c.how for c in report.layers)
    assert not report.notes  # shrinking was kept
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2 * float(want.abs().max()))


def test_the_float32_tolerance_still_catches_a_half_precision_error():
    from sparsenets.compression.pipeline import _compare

    a = torch.linspace(-1, 1, 50)
    assert _compare(a, a + 1e-3) is not None  # float32: 1e-3 is an error
    assert _compare(a.bfloat16(), (a + 1e-3).bfloat16()) is None  # bfloat16: within its rounding
    assert _compare(a.bfloat16(), (a + 0.1).bfloat16()) is not None
    assert "is torch.float32 instead of torch.bfloat16" in _compare(a.bfloat16(), a)


# ---- CUDA (skipped without it) --------------------------------------------------------------------


@cuda
def test_a_recipe_runs_on_cuda_and_its_checkpoints_load_on_the_cpu(tmp_path):
    results = run_recipe(load_recipe(RECIPE), tmp_path / "run", device="cuda")
    assert results["complete"] and all(math.isfinite(j["test_loss"]) for j in results["jobs"])
    checkpoint = torch.load(next((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)
    assert all(t.device.type == "cpu" for t in checkpoint["weights"].values())
    assert all(mask.device.type == "cpu" for mask, _ in checkpoint["masks"].values())


@cuda
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_training_on_cuda_moves_model_and_batches_and_autocasts(precision):
    model = _mlp()
    ticket = LotteryTicket(model.cuda(), {"sparsity": 0.5})
    history = Trainer(model, _teacher(), TrainConfig(epochs=2, batch_size=32, device="cuda", precision=precision),
                      hooks=[ticket]).fit()
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(math.isfinite(row["test_loss"]) for row in history)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_on_cuda_matches_the_masked_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    sn.sparsify_(model, {"sparsity": 0.9, "pattern": "block:16x16", "exclude": ["2"]})
    model = model.to("cuda", dtype).eval()
    x = torch.randn(32, 64, device="cuda", dtype=dtype)
    fast = sn.compress(model, x)
    assert fast.compress_report.layers and all(p.device.type == "cuda" for p in fast.parameters())
    with torch.no_grad():
        got, want = fast(x), model(x)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
