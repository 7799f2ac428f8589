"""Edge-popup (strong lottery tickets), lottery jackpots, and the SLT-for-attention experiment."""

import copy
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenets as sn
from sparsenets.cli import main
from sparsenets.experiments.slt_attention import SLTAttentionConfig, WideAttention, approximate, random_target
from sparsenets.masking import get_mask
from sparsenets.methods.edgepopup import edge_popup_, finalize_, lottery_jackpot_, popups
from sparsenets.patterns import Block, Channel


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))


def frozen_weights(model):
    return {f"{m}.{n}": module.parametrizations[n].original.detach().clone() for m, module, n, _ in popups(model)}


def test_gradients_reach_scores_only():
    model = mlp()
    scores = edge_popup_(model, density=0.5, seed=0)
    F.cross_entropy(model(torch.randn(16, 12)), torch.randint(0, 5, (16,))).backward()
    assert len(scores) == 2 and all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    assert [p for p in model.parameters() if p.requires_grad] == scores


def test_frozen_weights_never_change_but_mask_does():
    model = mlp()
    scores = edge_popup_(model, density=0.5, seed=0)
    before, mask_before = frozen_weights(model), model[0].parametrizations.weight[0].mask()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)  # all params: frozen ones must not move
    for _ in range(20):
        x = torch.randn(32, 12)
        loss = F.cross_entropy(model(x), x[:, :5].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, weight in frozen_weights(model).items():
        assert torch.equal(weight, before[key]), key
    assert not torch.equal(model[0].parametrizations.weight[0].mask(), mask_before)  # the search moved
    assert all(s.grad is not None for s in scores)


def test_forward_uses_exactly_the_top_k_by_abs_score():
    model = mlp()
    edge_popup_(model, density=0.3, init="kaiming_normal", seed=1)
    layer = model[2]
    popup = layer.parametrizations.weight[0]
    with torch.no_grad():
        popup.scores.copy_(torch.randn_like(popup.scores))
    k = round(0.3 * layer.weight.numel())
    top = popup.scores.abs().topk(k).indices
    expected = torch.zeros(layer.weight.numel(), dtype=torch.bool)
    expected[top] = True
    original = layer.parametrizations.weight.original
    assert torch.equal(layer.weight, original * expected.view_as(original))
    assert int(layer.weight.ne(0).sum()) == k
    x = torch.randn(4, 32)
    assert torch.allclose(layer(x), F.linear(x, original * expected.view_as(original), layer.bias))


def test_signed_constant_weights_and_seed_determinism():
    a, b, c = mlp(0), mlp(5), mlp(0)
    edge_popup_(a, 0.5, seed=3)
    edge_popup_(b, 0.5, seed=3)
    edge_popup_(c, 0.5, seed=4)
    wa, wb = frozen_weights(a), frozen_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # weights and scores are functions of the seed only
    assert torch.equal(a[0].parametrizations.weight[0].scores, b[0].parametrizations.weight[0].scores)
    assert not torch.equal(wa["0.weight"], frozen_weights(c)["0.weight"])
    assert torch.allclose(wa["0.weight"].abs(), torch.full_like(wa["0.weight"], math.sqrt(2 / 12)))


def test_multihead_attention_projections():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    scores = edge_popup_(attention, density=0.25, seed=0)
    assert {n for _, _, n, _ in popups(attention)} == {"in_proj_weight", "weight"}
    assert attention.in_proj_weight.ne(0).float().mean() == pytest.approx(0.25)
    assert attention.out_proj.weight.ne(0).float().mean() == pytest.approx(0.25)
    x = torch.randn(2, 5, 16)
    attention(x, x, x)[0].pow(2).sum().backward()
    assert all(s.grad.abs().sum() > 0 for s in scores)
    copy.deepcopy(attention)
    restored = pickle.loads(pickle.dumps(attention))
    assert torch.allclose(restored(x, x, x)[0], attention(x, x, x)[0])


def test_group_scores_keep_whole_blocks_and_channels():
    model = mlp()
    edge_popup_(model, density=0.5, pattern=Block(4, 4), seed=0)
    weight = model[0].weight.detach()
    tiles = weight.ne(0).unfold(0, 4, 4).unfold(1, 4, 4).reshape(-1, 16)
    assert torch.all(tiles.all(1) | ~tiles.any(1)) and tiles.all(1).float().mean() == 0.5
    model = mlp()
    edge_popup_(model, density=0.25, pattern=Channel(), seed=0)
    rows = model[0].weight.ne(0)
    assert torch.all(rows.all(1) | ~rows.any(1)) and int(rows.all(1).sum()) == 8


def test_jackpot_starts_at_magnitude_pruning_on_trained_weights():
    model = mlp()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    lottery_jackpot_(model, density=0.4)
    for i in (0, 2):
        original = model[i].parametrizations.weight.original
        assert torch.equal(original, trained[f"{i}.weight"])  # the trained weights, not redrawn
        k = round(0.4 * original.numel())
        threshold = original.abs().flatten().topk(k).values[-1]
        assert torch.equal(model[i].weight.ne(0), original.abs() >= threshold)


def test_finalize_bakes_subnetwork_into_plain_weights():
    model = mlp()
    edge_popup_(model, density=0.5, seed=0)
    x = torch.randn(8, 12)
    expected = model(x)
    finalize_(model)
    assert not list(popups(model)) and torch.allclose(model(x), expected)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(p.requires_grad for p in model.parameters())
    masked = mlp()
    edge_popup_(masked, density=0.5, seed=0)
    finalize_(masked, as_masks=True)
    assert get_mask(masked[0], "weight").mask.float().mean() == 0.5 and torch.allclose(masked(x), expected)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="1.5"):
        edge_popup_(mlp(), density=1.5)
    with pytest.raises(ValueError, match="'uniform'"):
        edge_popup_(mlp(), density=0.5, init="uniform")
    with pytest.raises(ValueError, match="no layer"):
        edge_popup_(nn.ReLU(), density=0.5)


def test_pattern_can_be_given_as_a_string():
    model = mlp()
    edge_popup_(model, density=0.5, pattern="block:4x4", seed=0)
    tiles = model[0].weight.ne(0).unfold(0, 4, 4).unfold(1, 4, 4).reshape(-1, 16)
    assert torch.all(tiles.all(1) | ~tiles.any(1)) and tiles.all(1).float().mean() == 0.5
    assert model[0].parametrizations.weight[0].pattern == "block:4x4"
    with pytest.raises(sn.PatternError, match="2:4"):
        edge_popup_(mlp(), density=0.5, pattern="2:4")


def test_edge_popup_method_takes_a_sparsity_config():
    a, b, c = mlp(), mlp(), mlp()
    method = sn.EdgePopup(a, {"sparsity": 0.75, "pattern": "channel", "exclude": ["2"], "seed": 1})
    sn.EdgePopup(b, sn.SparsityConfig(sparsity=0.75, pattern="channel", exclude=["2"], seed=1))
    edge_popup_(c, density=0.25, pattern=Channel(), seed=1, exclude=["2"])
    assert [n for n, *_ in popups(a)] == ["0"]  # exclude honoured
    assert method.scores == [a[0].parametrizations.weight[0].scores]
    rows = a[0].weight.ne(0)
    assert int(rows.all(1).sum()) == 8 and torch.all(rows.all(1) | ~rows.any(1))  # density = 1 - sparsity
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[0].weight, c[0].weight)
    x = torch.randn(4, 12)
    expected = a(x)
    assert method.finalize(as_masks=True) is a and torch.allclose(a(x), expected)
    assert get_mask(a[0], "weight").pattern == "channel"


def test_edge_popup_method_selects_by_module_types_and_include():
    attention = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    sn.EdgePopup(attention, {"module_types": ["MultiheadAttention"]})
    assert {f"{m}.{n}" for m, _, n, _ in popups(attention)} == {"1.in_proj_weight", "1.out_proj.weight"}
    model = mlp()
    sn.EdgePopup(model, {"include": ["2"]})
    assert [n for n, *_ in popups(model)] == ["2"]


@pytest.mark.parametrize("config, needle", [({"allocation": "erk"}, "erk"), ({"overrides": {"0": 0.2}}, "overrides"),
                                            ({"pattern": "head"}, "head")])
def test_edge_popup_method_rejects_what_it_cannot_do(config, needle):
    with pytest.raises(sn.ConfigError, match=needle):
        sn.EdgePopup(mlp(), config)


def test_wide_attention_at_hidden_d_is_multihead_attention():
    target = random_target(8, 2, seed=0)
    source = WideAttention(8, 2, 8)
    with torch.no_grad():
        for proj, part in zip((source.q, source.k, source.v), target.in_proj_weight.chunk(3)):
            proj.weight.copy_(part)
        source.out.weight.copy_(target.out_proj.weight)
    x = torch.randn(3, 6, 8)
    assert torch.allclose(source(x), target(x, x, x, need_weights=False)[0], atol=1e-6)


def test_slt_attention_error_falls_with_source_width_quick():
    config = SLTAttentionConfig(dim=4, heads=2, tokens=4, steps=300, batch_size=32, eval_samples=256)
    target = random_target(4, 2, seed=0)
    narrow = approximate(target, 1, config, seed=0)["relative_mse"]
    wide = approximate(target, 8, config, seed=0)["relative_mse"]
    assert wide < narrow


SLT_RECIPE = ("name: tiny_slt\nseeds: [0, 1]\n"
              "method: {name: slt_attention, dim: 4, heads: 2, tokens: 3, multipliers: [1, 2], steps: 5, "
              "eval_samples: 16}\n")


def test_slt_recipe_runs_resumes_and_reports_through_the_run_command(tmp_path, capsys):
    from sparsenets.experiments.trainer import mix_seed

    recipe_file = tmp_path / "slt.yaml"
    recipe_file.write_text(SLT_RECIPE)
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    assert [(r["seed"], r["hidden"]) for r in results["jobs"]] == [(0, 4), (0, 8), (1, 4), (1, 8)]
    config = SLTAttentionConfig(dim=4, heads=2, tokens=3, multipliers=[1, 2], steps=5, eval_samples=16)
    expected = approximate(random_target(4, 2, mix_seed(1, "target")), 2, config, mix_seed(1, "source", 2) % 2**31)
    assert results["jobs"][3]["relative_mse"] == expected["relative_mse"]  # the science of the old slt command
    assert {e["level"]: e["seeds"] for e in results["summary"]} == {1: 2, 2: 2} and "relative_mse_mean" in \
        results["summary"][0]
    assert len(list((out / "checkpoints").glob("*.pt"))) == 4
    report = (out / "report.md").read_text()
    assert "| 8 |" in report and "plots/error_vs_hidden.png" in report
    assert (out / "plots" / "error_vs_hidden.png").stat().st_size > 0

    (out / "checkpoints" / "seed1-edgepopup-02.pt").unlink()  # as if killed during the last job
    capsys.readouterr()
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    assert "3 of 4 networks already trained" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "results.json").read_text()) == results

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "relative MSE" in capsys.readouterr().out and "| 4 |" in (out / "report.md").read_text()


def test_edgepopup_recipe_runs_the_three_arms_as_the_old_code_did_and_resumes(tmp_path, capsys):
    from sparsenets.experiments import TrainConfig, Trainer, build_model, load_dataset
    from sparsenets.experiments.trainer import mix_seed

    data = {"name": "teacher", "train_samples": 128, "test_samples": 64, "inputs": 12, "classes": 4}
    search = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 1, "batch_size": 32}
    recipe = {"name": "tiny_ep", "seeds": [0], "data": data, "model": {"name": "lenet_300_100", "hidden": [32, 16]},
              "train": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 32},
              "method": {"name": "edgepopup", "density": 0.5, "search": search}}
    recipe_file = tmp_path / "ep.yaml"
    recipe_file.write_text(json.dumps(recipe))  # JSON is YAML
    out = tmp_path / "run"
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["jobs"]
    arms = [(r["arm"], round(r["remaining"], 2)) for r in rows]
    assert arms == [("dense", 1.0), ("edgepopup", 0.5), ("jackpot", 0.5)]

    dataset = load_dataset("teacher", **{k: v for k, v in data.items() if k != "name"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(0, "init"))
        model = build_model("lenet_300_100", dataset.input_shape, dataset.num_classes, hidden=[32, 16])
    edge_popup_(model, 0.5, init="signed_constant", seed=mix_seed(0, "edgepopup") % 2**31)
    history = Trainer(model, dataset, TrainConfig(**search), seed=0).fit()
    assert rows[1]["test_accuracy"] == history[-1]["test_accuracy"]  # what the old strong-ticket runner computed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(0, "init"))
        dense = build_model("lenet_300_100", dataset.input_shape, dataset.num_classes, hidden=[32, 16])
    Trainer(dense, dataset, TrainConfig(**recipe["train"]), seed=0).fit()
    lottery_jackpot_(dense, 0.5)
    history = Trainer(dense, dataset, TrainConfig(**search), seed=0).fit()
    assert rows[2]["test_accuracy"] == history[-1]["test_accuracy"]

    (out / "checkpoints" / "seed0-jackpot-01.pt").unlink()
    capsys.readouterr()
    assert main(["run", str(recipe_file), "--out", str(out)]) == 0
    assert "2 of 3 networks already trained" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "results.json").read_text())["jobs"] == rows
    assert main(["report", str(out), "--regenerate"]) == 0
    assert "jackpot" in (out / "report.md").read_text()


@pytest.mark.parametrize("text, needle", [
    ("name: x\nmethod: {name: slt_attention, width: 3}\n", "method: unknown key(s) ['width']; valid keys: name, dim"),
    ("name: x\nmethod: {name: slt_attention, dim: 6, heads: 4}\n", "dim 6 is not a multiple of heads=4"),
    ("name: x\nmethod: {name: slt_attention, multipliers: [2, 2]}\n", "multipliers must be distinct"),
    ("name: x\ndata: {name: mnist1d}\nmodel: {name: lenet_300_100}\n"
     "method: {name: edgepopup, search: {optimizer: lbfgs}}\n", "method.search.optimizer: input should be 'sgd'"),
    ("name: x\ndata: {name: mnist1d}\nmodel: {name: lenet_300_100}\nmethod: {name: edgepopup, arms: [jackpot]}\n",
     "add 'dense' to arms"),
    ("name: x\nexperiment: slt_attention\noptions: {dim: 4}\n", "write method: {name: slt_attention, ...} instead"),
])
def test_bad_strong_ticket_recipe_is_named_and_writes_nothing(tmp_path, capsys, text, needle):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(text)
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_slt_command_is_gone(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slt", "recipes/slt_attention.yaml"])
    assert exit_info.value.code == 2 and "invalid choice: 'slt'" in capsys.readouterr().err


def test_shipped_strong_ticket_recipes_keep_their_science():
    from pathlib import Path

    from sparsenets.experiments import PROTOCOLS, load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    slt = load_recipe(root / "slt_attention.yaml")
    assert slt.method == {"name": "slt_attention", "dim": 8, "heads": 2, "tokens": 8,
                          "multipliers": [1, 2, 4, 8, 16, 32], "density": 0.5, "init": "kaiming_normal",
                          "weight_scale": 0.5, "steps": 3000, "lr": 0.01, "batch_size": 64, "eval_samples": 1024}
    assert slt.seeds == [0, 1, 2]
    assert len(PROTOCOLS["slt_attention"].jobs(slt)) == 18
    edge = load_recipe(root / "edgepopup_mnist1d.yaml")
    assert edge.data["num_samples"] == 5000 and edge.model["hidden"] == [300, 100] and edge.sparsity is None
    assert (edge.train.optimizer, edge.train.lr, edge.train.epochs, edge.train.schedule) == ("sgd", 0.2, 40, "cosine")
    assert {k: edge.method["search"][k] for k in ("optimizer", "lr", "momentum", "epochs", "batch_size", "schedule")} \
        == {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": 40, "batch_size": 100, "schedule": "cosine"}
    assert [j.key for j in PROTOCOLS["edgepopup"].jobs(edge)][:3] == ["seed0-dense", "seed0-edgepopup-01",
                                                                       "seed0-jackpot-01"]


def test_separate_qkv_projections_are_searched():
    attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
    edge_popup_(attention, density=0.5, seed=0)
    names = {n for _, _, n, _ in popups(attention)}
    assert names == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "weight"}
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    assert attention(q, k, v)[0].shape == (2, 3, 8)
