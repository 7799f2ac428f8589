"""Edge-popup (strong lottery tickets), lottery jackpots, and the SLT-for-attention experiment."""

import copy
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.cli import main
from sparsenets.masking import get_mask
from sparsenets.methods.edgepopup import edge_popup_, finalize_, lottery_jackpot_, popups
from sparsenets.patterns import Block, Channel
from sparsenets.experiments.slt_attention import SLTAttentionConfig, WideAttention, approximate, random_target


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


def test_slt_recipe_runs_and_writes_report_and_plot(tmp_path):
    recipe_file = tmp_path / "slt.yaml"
    recipe_file.write_text("name: tiny\nexperiment: slt_attention\nseeds: [0, 1]\n"
                           "options: {dim: 4, heads: 2, tokens: 3, multipliers: [1, 2], steps: 5, eval_samples: 16}\n")
    out = tmp_path / "run"
    assert main(["slt", str(recipe_file), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["seed"], r["hidden"]) for r in rows] == [(0, 4), (0, 8), (1, 4), (1, 8)]
    assert (out / "error_vs_hidden.png").stat().st_size > 0 and "| 8 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("text, needle", [
    ("name: x\nexperiment: nope\n", "'nope'"),
    ("name: x\nexperiment: slt_attention\noptions: {width: 3}\n", "width"),
    ("name: x\nexperiment: edgepopup\noptions: {search: {optimizer: lbfgs}}\n", "lbfgs"),
])
def test_bad_slt_recipe_is_named_and_writes_nothing(tmp_path, capsys, text, needle):
    recipe_file = tmp_path / "bad.yaml"
    recipe_file.write_text(text)
    assert main(["slt", str(recipe_file), "--out", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_separate_qkv_projections_are_searched():
    attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
    edge_popup_(attention, density=0.5, seed=0)
    names = {n for _, _, n, _ in popups(attention)}
    assert names == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "weight"}
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    assert attention(q, k, v)[0].shape == (2, 3, 8)


def test_slt_command_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slt", "--help"])
    assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out


def test_shipped_strong_ticket_recipes_load_and_run_dispatches_them(tmp_path):
    from pathlib import Path

    from sparsenets.cli import main
    from sparsenets.experiments.strong_tickets import StrongTicketRecipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    for name, experiment in (("slt_attention", "slt_attention"), ("edgepopup_mnist1d", "edgepopup")):
        assert StrongTicketRecipe.load(root / f"{name}.yaml").experiment == experiment
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nexperiment: slt_attention\noptions: {width: 3}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2  # routed to the SLT loader
    assert not (tmp_path / "out").exists()
