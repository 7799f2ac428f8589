"""Experiments layer: data, models, trainer, recipes, run directories, atomic files and the CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from sparsenets.cli import build_parser, main
from sparsenets.cli.demo import DEMO_RECIPE
from sparsenets.experiments import (
    RecipeError,
    RunDirError,
    TrainConfig,
    Trainer,
    build_model,
    evaluate,
    load_dataset,
    load_recipe,
    run_recipe,
)
from sparsenets.experiments.data import cache_dir
from sparsenets.experiments.rundir import LOCK_NAME
from sparsenets.experiments.trainer import batches, lr_at
from sparsenets.utils import atomic

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))  # every shipped recipe, strong tickets included


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_recipe(**changes) -> dict:
    recipe = {
        "name": "tiny", "seeds": [0, 1],
        "data": {"name": "teacher", "train_samples": 256, "test_samples": 128, "inputs": 12, "classes": 4},
        "model": {"name": "lenet_300_100", "hidden": [24, 16]},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 64},
        "method": {"name": "lottery", "prune_fraction": 0.5},
        "sparsity": {"sparsity": 0.75},
    }
    for key, value in changes.items():
        recipe[key] = value
    return recipe


# ---- data and models -----------------------------------------------------------------------------


def test_lenet_with_topk_activations_keeps_a_fixed_share_of_each_hidden_layer():
    from sparsenets.activations import activation_density

    model = build_model("lenet_300_100", (40,), 10, hidden=[50, 20], topk_fraction=0.1)
    densities = activation_density(model, [torch.randn(64, 40)])
    assert densities["topk1"] == pytest.approx(5 / 50) and densities["topk2"] == pytest.approx(2 / 20)
    assert densities["relu1"] > densities["topk1"]
    with pytest.raises(ValueError, match="1.5"):
        build_model("lenet_300_100", (40,), 10, topk_fraction=1.5)


def test_builtin_datasets_have_the_expected_shapes():
    digits = load_dataset("digits")
    assert digits.input_shape == (8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    teacher = load_dataset("teacher", inputs=6, classes=3, train_samples=50, test_samples=20)
    assert teacher.x_train.shape == (50, 6) and set(teacher.y_train.tolist()) <= {0, 1, 2}
    assert torch.equal(teacher.x_test, load_dataset("teacher", inputs=6, classes=3, train_samples=50,
                                                    test_samples=20).x_test)


def test_mnist1d_is_cached_and_leaves_global_rngs_alone():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    data = load_dataset("mnist1d")
    assert np.random.rand() == expected_next
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40) and data.num_classes == 10
    assert list((cache_dir() / "data").glob("mnist1d-n5000-*.npz"))
    assert torch.equal(load_dataset("mnist1d").x_train, data.x_train)


@pytest.mark.parametrize("name", ["lenet_300_100", "conv4", "transformer"])
@pytest.mark.parametrize("input_shape", [(40,), (8, 8)])
def test_models_build_from_names_for_1d_and_2d_inputs(name, input_shape):
    model = build_model(name, input_shape, 10)
    assert model(torch.randn(3, *input_shape)).shape == (3, 10)
    if name == "transformer":
        assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    if name == "conv4":
        conv = nn.Conv1d if len(input_shape) == 1 else nn.Conv2d
        assert sum(isinstance(m, conv) for m in model.modules()) == 4


def test_lenet_300_100_has_the_paper_sizes():
    model = build_model("lenet_300_100", (40,), 10)
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)] == \
        [(300, 40), (100, 300), (10, 100)]


def test_unknown_names_and_options_are_named():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*conv4"):
        build_model("resnet", (40,), 10)
    with pytest.raises(ValueError, match=r"\['width'\].*valid options: name, hidden"):
        build_model("lenet_300_100", (40,), 10, width=3)


# ---- trainer -----------------------------------------------------------------------------------------


def test_trainer_learns_a_tiny_task():
    data = load_dataset("teacher", inputs=8, classes=3, train_samples=600, test_samples=300)
    torch.manual_seed(0)
    model = build_model("lenet_300_100", data.input_shape, data.num_classes, hidden=[32])
    before = evaluate(model, data.x_test, data.y_test)["accuracy"]
    history = Trainer(model, data, TrainConfig(lr=0.01, epochs=8, batch_size=50)).fit()
    assert len(history) == 8 and history[-1]["step"] == 8 * 12
    assert history[-1]["test_accuracy"] > 0.8 > before
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_learning_rate_schedules():
    cosine = TrainConfig(lr=1.0, schedule="cosine")
    assert lr_at(cosine, 0, 100, 10) == 1.0
    assert lr_at(cosine, 50, 100, 10) == pytest.approx(0.5)
    assert lr_at(cosine, 99, 100, 10) < 0.01
    step = TrainConfig(lr=1.0, schedule="step", milestones=[2, 4], gamma=0.1)
    assert [lr_at(step, s, 100, 10) for s in (19, 20, 39, 40)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    warm = TrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(warm, s, 100, 10) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lr_at(TrainConfig(lr=0.3), 77, 100, 10) == 0.3


def test_data_order_is_seeded_and_resumable_from_any_step():
    data = load_dataset("teacher", train_samples=100, test_samples=10)
    full = [y for _, y in (next(s) for s in [batches(data, 32, seed=5)] * 12)]
    tail = [y for _, y in (next(s) for s in [batches(data, 32, seed=5, start_step=7)] * 5)]
    assert all(torch.equal(a, b) for a, b in zip(full[7:], tail))
    other = next(batches(data, 32, seed=6))[1]
    assert not torch.equal(full[0], other)


def test_train_config_rejects_bad_values():
    from sparsenets.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizer: input should be 'sgd' or 'adam', got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="lr: input should be greater than 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"lr: input should be a finite number, got nan; epochs: .*got '3'"):
        TrainConfig(epochs="3", lr=float("nan"))  # strict, finite, and every problem named
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\]; valid keys: optimizer"):
        TrainConfig.from_dict({"epoch": 3})
    assert TrainConfig(epochs=5, lr=1).lr == 1.0 and TrainConfig(milestones=[3, 1]).milestones == [1, 3]


# ---- recipes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()  # the resolved form round-trips
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()


def test_shipped_recipes_cover_the_methods_and_patterns():
    recipes = [load_recipe(p) for p in RECIPES]
    assert {r.method["name"] for r in recipes} >= {"lottery", "oneshot", "gradual", "edgepopup", "slt_attention"}
    patterns = {str(r.sparsity.pattern) for r in recipes if r.sparsity is not None}
    assert any(p.startswith("block:") for p in patterns) and any(":" in p and p[0].isdigit() for p in patterns)
    assert {p.stem for p in RECIPES} >= {"lottery_demo", "lth_mnist1d"}


def test_the_demo_runs_the_shipped_demo_recipe():
    assert (ROOT / "recipes" / "lottery_demo.yaml").read_text() == DEMO_RECIPE


@pytest.mark.parametrize("change, message", [
    ({"epochs": 3}, r"^recipe: unknown key\(s\) \['epochs'\]; valid keys: name, description, seeds"),
    ({"method": {"name": "lottery", "levels": 3}}, r"method: unknown key\(s\) \['levels'\]; "
                                                   r"valid keys: name, prune_fraction, rewind_step"),
    ({"method": {"name": "magic"}}, r"method.name: unknown method 'magic'; choose from .*dense, dropout, edgepopup"),
    ({"method": {"name": "lottery", "prune_fraction": 1.5}}, r"method.prune_fraction: .* less than 1, got 1.5"),
    ({"method": {"name": "lottery", "controls": ["shuffle"]}},
     r"method.controls\[0\]: .*'reinit' or 'random', got 'shuffle'"),
    ({"method": {"name": "oneshot", "sparsities": [0.8]}, "sparsity": {"pattern": "2:4"}},
     "method: pattern 2:4 fixes sparsity at 0.5, but sparsity=0.8 was given"),
    ({"data": {"name": "cifar10"}}, "data.name: unknown data set 'cifar10'; choose from digits, mnist1d, teacher"),
    ({"data": {"name": "mnist1d", "samples": 10}},
     r"data: unknown key\(s\) \['samples'\]; valid keys: name, num_samples"),
    ({"data": {"name": "mnist1d", "num_samples": -5}}, r"data.num_samples: .*greater than or equal to 10, got -5"),
    ({"data": {"name": "teacher", "inputs": "12"}}, "data.inputs: input should be a valid integer, got '12'"),
    ({"model": {"name": "lenet_300_100", "hidden": "wide"}}, "model.hidden: .*got 'wide'"),
    ({"train": {"lr": "fast"}}, "train.lr: input should be a valid number, got 'fast'"),
    ({"train": {"lr": float("nan")}}, "train.lr: input should be a finite number, got nan"),
    ({"train": {"epochs": True}}, "train.epochs: input should be a valid integer, got True"),
    ({"train": {"momentum": float("inf")}}, "train.momentum: input should be a finite number, got inf"),
    ({"sparsity": {"sparsity": 1.5}}, r"sparsity: sparsity must be a number in \[0, 1\), got 1.5"),
    ({"sparsity": {"shape": "block"}}, r"sparsity: unknown config key\(s\) \['shape'\]"),
    ({"seeds": [0, "a"]}, r"seeds\[1\]: input should be a valid integer, got 'a'"),
    ({"seeds": [1, 1]}, "seeds: seeds must be distinct"),
    ({"threads": 1000000}, r"threads: must be an integer in 1..256, got 1000000"),
    ({"threads": "4"}, "threads: input should be a valid integer, got '4'"),
    ({"model": {"hidden": [3]}}, "model.name: required; one of conv4, lenet_300_100"),
    ({"name": "../../x"}, r"name: must be 1-100 letters, digits, '.', '_' or '-', not starting with '.'"),
    ({"name": "/tmp/x"}, "name: must be"),
    ({"name": ".hidden"}, "name: must be"),
    ({"experiment": "edgepopup"}, r"experiment: write method: \{name: edgepopup, ...\} instead"),
    ({"method": {"name": "dropout", "layers": ["fc2"]}}, r"method: unknown key\(s\) \['layers'\]; valid keys: name, p, "
                                                         r"block, include"),
])
def test_recipe_errors_name_the_key_and_value(change, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(**change))


def test_every_recipe_problem_is_reported_at_once():
    recipe = tiny_recipe(name="../x", threads=0, data={"name": "mnist1d", "num_samples": -5},
                         train={"lr": float("nan"), "epochs": "3", "optimiser": "sgd"},
                         method={"name": "lottery", "prune_fraction": True}, sparsity={"sparsity": 2})
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "name", "threads", "method.prune_fraction", "data.num_samples", "train.lr", "train.epochs", "train",
        "sparsity"]
    assert str(caught.value).startswith("8 problems:\n  name: ") and "optimiser" in str(caught.value)


def test_protocols_declare_the_sections_they_use():
    slt = {"name": "slt", "method": {"name": "slt_attention", "multipliers": [1, 2]}}
    recipe = load_recipe(slt)
    assert recipe.data is recipe.model is recipe.train is recipe.sparsity is None
    assert set(recipe.to_dict()) == {"name", "description", "seeds", "threads", "method"}
    assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()
    with pytest.raises(RecipeError, match="data: method 'slt_attention' uses no data section; remove it"):
        load_recipe({**slt, "data": {"name": "mnist1d"}})
    with pytest.raises(RecipeError, match="model: required by method 'lottery'"):
        load_recipe({k: v for k, v in tiny_recipe().items() if k != "model"})
    with pytest.raises(RecipeError, match="sparsity: method 'dropout' uses no sparsity section"):
        load_recipe(tiny_recipe(method={"name": "dropout"}))


def test_yaml_aliases_are_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
           "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nname: *c\n"
    with pytest.raises(RecipeError, match=r"not valid YAML: recipes may not use YAML aliases .* \(line 2, column 8\)$"):
        load_recipe(bomb)
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_a_bad_name_cannot_write_outside_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(name="../../escaped", seeds=[0])))
    assert main(["run", str(recipe)]) == 2
    assert "name: must be" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.parent.parent.iterdir() if p.name == "escaped") == []


def test_nan_learning_rate_fails_before_the_run_directory_is_written(tmp_path):
    with pytest.raises(RecipeError, match="train.lr"):
        run_recipe(load_recipe(tiny_recipe(train={"lr": float("nan")})), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml is not valid YAML"):
        load_recipe(bad)


# ---- run directories -------------------------------------------------------------------------------------


def test_a_run_writes_its_directory_and_a_rerun_only_reprints(tmp_path, capsys):
    out = tmp_path / "run"
    results = run_recipe(load_recipe(tiny_recipe()), out)
    assert results["complete"] and {r["arm"] for r in results["jobs"]} == {"dense", "imp", "reinit", "random"}
    for name in ("recipe.yaml", "metrics.jsonl", "results.json", "report.md", "plots/accuracy_vs_remaining.png",
                 "plots/training_curves.png", "plots/layer_density.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "checkpoints").glob("*.pt"))) == len(results["jobs"]) == 2 * (1 + 2 * 3)
    assert {round(r["remaining"], 3) for r in results["jobs"]} == {1.0, 0.5, 0.25}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(results["jobs"]) * 2  # two epochs, one evaluation each
    for row in results["jobs"]:  # post-ReLU densities measured on test inputs, shown in report.md
        assert set(row["activations"]) == {"relu1", "relu2"} and all(0 < d < 1 for d in row["activations"].values())
    assert "## Activation density" in (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    capsys.readouterr()
    assert run_recipe(load_recipe(tiny_recipe()), out) == results
    assert "is complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == stamps


def test_a_model_its_options_cannot_build_fails_before_anything_is_written(tmp_path):
    recipe = tiny_recipe(seeds=[0], method={"name": "dense"}, model={"name": "rnn", "cell": "elman"})
    with pytest.raises(RecipeError, match="model: rnn: unknown cell 'elman'"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_different_recipe_in_a_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    run_recipe(load_recipe(tiny_recipe(seeds=[0], method={"name": "dense"})), out)
    with pytest.raises(RunDirError, match=r"different recipe \(train.lr: 0.01 in the directory, 0.02 now\)"):
        run_recipe(load_recipe(tiny_recipe(seeds=[0], method={"name": "dense"},
                                           train={**tiny_recipe()["train"], "lr": 0.02})), out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        run_recipe(load_recipe(tiny_recipe(seeds=[0], method={"name": "dense"})), tmp_path / "other")


@pytest.mark.parametrize("method, pattern", [
    ({"name": "oneshot", "sparsities": [0.5, 0.75], "finetune_epochs": 1}, "unstructured"),
    ({"name": "gradual", "sparsities": [0.5], "every_steps": 2, "end_epoch": 1}, "block:2x2"),
    ({"name": "oneshot", "finetune_epochs": 1}, "2:4"),
    ({"name": "lottery", "prune_fraction": 0.3, "controls": []}, "snip"),  # a criterion that needs data
])
def test_other_methods_run_from_recipes(tmp_path, method, pattern):
    sparsity = {"2:4": {"pattern": "2:4"}, "snip": {"criterion": "snip", "sparsity": 0.5}}.get(
        pattern, {"pattern": pattern, "sparsity": 0.5})
    results = run_recipe(load_recipe(tiny_recipe(seeds=[0], method=method, sparsity=sparsity)), tmp_path / "run")
    pruned = [r for r in results["jobs"] if r["arm"] != "dense"]
    targets = method.get("sparsities", [0.3, 0.5] if method["name"] == "lottery" else [0.5])
    assert [round(1 - r["remaining"], 2) for r in pruned] == targets
    assert (tmp_path / "run" / "plots" / "layer_density.png").exists()


def test_a_model_that_cannot_take_the_pattern_fails_before_writing(tmp_path):
    recipe = load_recipe(tiny_recipe(data={"name": "teacher", "inputs": 10}, sparsity={"pattern": "2:4"}))
    with pytest.raises(RecipeError, match="multiple of 4"):
        run_recipe(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- atomic files --------------------------------------------------------------------------------------------


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    atomic.write_json(path, {"a": 1})

    def broken(file):
        file.write(b'{"a": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_with(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    atomic.write_text(tmp_path / "report.md", "# run")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporaries_from_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "plots").mkdir()
    stale = tmp_path / "plots" / f"{atomic.TEMP_PREFIX}layer_density.png.x1"
    stale.write_bytes(b"\x89PNG half")
    (tmp_path / "keep.txt").write_text("ok")
    assert atomic.remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and (tmp_path / "keep.txt").exists()


# ---- command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "run", "report"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"sparsenets {command}" in text and "examples:" in text


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=1)))
    assert main(["run", str(recipe)]) == 2
    assert "unknown key(s) ['epochs']" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_cli_run_and_report(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(seeds=[0])))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "run" / "report.md").unlink()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "tiny: test accuracy" in out and "IMP" in out and "reinit" in out
    assert (tmp_path / "run" / "report.md").exists()
    assert main(["demo", "--show-recipe"]) == 0
    assert "lottery_demo" in capsys.readouterr().out


# ---- the science, small and full ---------------------------------------------------------------------------


def lottery_means(results: dict) -> dict:
    return {(e["arm"], e["level"]): e["accuracy_mean"] for e in results["summary"]}


def test_quick_tickets_beat_their_reinitialisation(tmp_path):
    """A seconds-long lottery experiment on the teacher task: at 12.5% of the weights, the ticket
    trains to a higher accuracy than the same mask re-initialised, for the mean of two seeds."""
    recipe = tiny_recipe(
        data={"name": "teacher", "train_samples": 1200, "test_samples": 400, "inputs": 16, "classes": 4},
        model={"name": "lenet_300_100", "hidden": [64, 32]},
        train={"optimizer": "sgd", "lr": 0.05, "epochs": 3, "batch_size": 32},
        method={"name": "lottery", "prune_fraction": 0.5, "rewind_step": 5, "controls": ["reinit"]},
        sparsity={"sparsity": 0.875, "allocation": "global"})
    means = lottery_means(run_recipe(load_recipe(recipe), tmp_path / "run"))
    assert means[("imp", 3)] > means[("reinit", 3)] + 0.03


@pytest.mark.slow
def test_demo_recipe_reproduces_the_lottery_ticket_claims(tmp_path):
    """The demo (about a minute): tickets at <= 20% of the weights match the dense network, and at
    about 7% they beat random reinitialisation by more than 5 points."""
    results = run_recipe(load_recipe(DEMO_RECIPE), tmp_path / "demo")
    summary = results["summary"]
    dense = next(e["accuracy_mean"] for e in summary if e["arm"] == "dense")
    tickets = {e["level"]: e for e in summary if e["arm"] == "imp"}
    assert any(e["accuracy_mean"] >= dense for e in tickets.values() if e["remaining"] <= 0.2)
    means = lottery_means(results)
    sparse = [level for level, e in tickets.items() if e["remaining"] <= 0.07]
    assert sparse and all(means[("imp", level)] > means[("reinit", level)] + 0.05 for level in sparse)


def test_a_protocol_registered_in_one_place_runs_and_reports(tmp_path):
    from sparsenets.experiments.protocols import ARMS, DENSE, PROTOCOLS, Arm, Job, Outcome, Protocol, register_protocol
    from sparsenets.experiments.schema import PositiveInt

    class WiderOptions(Protocol.Options):
        factor: PositiveInt = 2

    @register_protocol("wider_test")
    class Wider(Protocol):  # the dense network, and one twice as wide
        Options = WiderOptions
        arms = (DENSE, Arm("wide_test", "wider network", "wide", "tab:green", sparse=False))
        sections = ("data", "model", "train")

        def jobs(self, recipe):
            return [job for seed in recipe.seeds for job in (Job(seed, "dense"), Job(seed, "wide_test", 1))]

        def run(self, job, ctx):
            model = ctx.new_model(0)
            if job.arm == "wide_test":
                hidden = [ctx.recipe.method["factor"] * h for h in ctx.recipe.model["hidden"]]
                model = build_model("lenet_300_100", ctx.data.input_shape, ctx.data.num_classes, hidden=hidden)
            return Outcome(model, ctx.train(model, job))

    try:
        with pytest.raises(ValueError, match="'wider_test' is registered twice"):
            register_protocol("wider_test")(Wider)
        with pytest.raises(RecipeError, match="method.factor: input should be greater than or equal to 1, got 0"):
            load_recipe(tiny_recipe(method={"name": "wider_test", "factor": 0}, sparsity=None))
        recipe = {k: v for k, v in tiny_recipe(seeds=[0], method={"name": "wider_test"}).items() if k != "sparsity"}
        results = run_recipe(load_recipe(recipe), tmp_path / "run")
        assert [r["arm"] for r in results["jobs"]] == ["dense", "wide_test"]
        assert "| level | remaining % | dense | wide |" in (tmp_path / "run" / "report.md").read_text()
    finally:
        PROTOCOLS.pop("wider_test", None)
        ARMS.pop("wide_test", None)


# ---- sparse training in masked and fast mode, and time to accuracy ------------------------------------------


def dst_recipe(pattern: str = "block:4x4", modes=("masked", "fast")) -> dict:
    train = {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 64, "eval_every": 2}
    return tiny_recipe(seeds=[0], train=train,
                       method={"name": "sparse_training", "algorithms": ["static", "rigl"], "modes": list(modes),
                               "sparsities": [0.5], "update_every": 2, "drop_fraction": 0.3},
                       sparsity={"pattern": pattern, "criterion": "random", "allocation": "erk"})


def test_fast_mode_arms_train_block_sparse_layers_and_are_timed(tmp_path):
    out = tmp_path / "run"
    results = run_recipe(load_recipe(dst_recipe()), out)
    jobs = {r["arm"]: r for r in results["jobs"]}
    assert list(jobs) == ["dense", "static", "rigl", "static_fast", "rigl_fast"]
    for name in ("static", "rigl"):  # the same mask, counted on the trained network in both modes
        assert jobs[f"{name}_fast"]["remaining"] == pytest.approx(jobs[name]["remaining"], abs=0.02)
        assert jobs[f"{name}_fast"]["remaining"] < 0.75 and set(jobs[f"{name}_fast"]["layers"]) == {"fc1", "fc2", "fc3"}
        assert 0.0 <= jobs[f"{name}_fast"]["test_accuracy"] <= 1.0
    checkpoint = torch.load(out / "checkpoints" / "seed0-rigl_fast-01.pt", weights_only=True)
    assert any(key.endswith("values") for key in checkpoint["weights"])  # the block-sparse layers' kept blocks
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for job in jobs.values():  # 8 steps, an evaluation every 2: seconds grow, evaluations excluded
        seconds = [row["seconds"] for row in metrics if row["job"] == job["key"]]
        assert len(seconds) == 4 and 0 < seconds[0] and all(a < b for a, b in zip(seconds, seconds[1:]))
    assert (out / "plots" / "accuracy_vs_time.png").stat().st_size > 0
    assert "RigL (fast)" in (out / "report.md").read_text()


def test_trainer_history_rows_count_training_seconds():
    data = load_dataset("teacher", train_samples=256, test_samples=64, inputs=12, classes=4)
    model = build_model("lenet_300_100", data.input_shape, data.num_classes, hidden=[16])
    history = Trainer(model, data, TrainConfig(epochs=3, batch_size=64, eval_every=3)).fit()
    assert [row["step"] for row in history] == [3, 6, 9, 12]
    seconds = [row["seconds"] for row in history]
    assert 0 < seconds[0] and all(a < b for a, b in zip(seconds, seconds[1:]))


@pytest.mark.parametrize("sparsity, pattern", [
    ({"pattern": "unstructured"}, "'unstructured'"),
    ({"pattern": "block:4x4", "overrides": {"fc1": {"pattern": "unstructured"}}}, "'unstructured'"),
])
def test_fast_mode_without_a_block_pattern_is_refused_at_validation(tmp_path, sparsity, pattern):
    recipe = dst_recipe()
    recipe["sparsity"] = {"criterion": "random", "allocation": "erk", **sparsity}
    with pytest.raises(RecipeError, match=f"modes: fast .*block:RxC pattern.* is {pattern}"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    load_recipe(dst_recipe(sparsity["pattern"], modes=["masked"]))  # masked mode takes it


def test_sparse_training_recipes_without_modes_keep_their_arms_and_resolved_form():
    recipe = load_recipe(ROOT / "recipes" / "dst_mnist1d.yaml")
    assert recipe.method["modes"] is None  # as left out: the run directories of older versions still match
    assert {job.arm for job in recipe.protocol.jobs(recipe)} == {"dense", "static", "set", "rigl"}


def test_the_time_plot_needs_timed_history_rows():
    from sparsenets.experiments import plots

    results = {"name": "old", "jobs": [{"arm": "rigl", "level": 1, "target_sparsity": 0.9}]}
    row = {"job": "seed0-rigl-01", "seed": 0, "arm": "rigl", "level": 1, "step": 10, "test_accuracy": 0.5}
    assert plots.accuracy_vs_time(results, [row], ["dense", "rigl"]) is None  # a run from before seconds existed
    assert plots.accuracy_vs_time(results, [{**row, "seconds": 1.5}], ["dense", "rigl"]) is not None
