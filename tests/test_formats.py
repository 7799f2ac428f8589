"""Structured formats in the pipeline: factorize_, MoRe adapters, report rows, save/load, the formats protocol."""

import copy
import pickle

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.errors import CheckpointError, ConfigError
from sparsenets.formats import is_structured
from sparsenets.formats.low_rank import LowRankLinear, truncated_svd
from sparsenets.formats.monarch import MonarchLinear, project_monarch
from sparsenets.formats.more import MoReLinear


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))


def batches(n: int = 3, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def factor_params(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).num_parameters() for n in names)


# ---- factorize_ ------------------------------------------------------------------------------------------


def test_low_rank_svd_replaces_the_selected_layers_by_their_truncated_svd():
    model = mlp()
    dense = copy.deepcopy(model)
    sn.factorize_(model, sn.FactorizeConfig(format="low-rank", budget=0.25, exclude=["4"]))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert type(model[4]) is nn.Linear  # excluded
    assert model[2].rank == int(0.25 * 64 * 48 / (64 + 48))  # uniform: the budget's rank, rounded down
    left, right = truncated_svd(dense[2].weight.detach(), model[2].rank)
    torch.testing.assert_close(model[2].dense_weight(), left @ right)
    torch.testing.assert_close(model[2].bias, dense[2].bias)
    assert factor_params(model, ["0", "2"]) <= 0.25 * (24 * 64 + 64 * 48)


def test_monarch_budget_sets_the_block_rank_and_keeps_the_optimal_projection():
    model = mlp()
    dense = copy.deepcopy(model)
    sn.factorize_(model, {"format": "monarch", "budget": 0.25, "nblocks": 4, "include": ["2"]})
    layer = model[2]
    assert isinstance(layer, MonarchLinear) and layer.nblocks == 4
    assert layer.num_parameters() <= 0.25 * 64 * 48 < (layer.block_rank + 1) * 4 * (16 + 12)
    blocks1, blocks2 = project_monarch(dense[2].weight.detach(), 4, layer.block_rank)
    torch.testing.assert_close(layer.blocks1, blocks1)
    torch.testing.assert_close(layer.blocks2, blocks2)


def test_fisher_weighted_svd_needs_data_and_weights_rows_by_fisher_information():
    model = mlp()
    with pytest.raises(ConfigError, match="data"):
        sn.factorize_(model, {"method": "fisher", "budget": 0.25})
    assert not any(is_structured(m) for m in model.modules())  # nothing replaced
    fisher, plain = mlp(), mlp()
    sn.factorize_(fisher, {"method": "fisher", "budget": 0.25, "include": ["2"]}, data=batches())
    sn.factorize_(plain, {"method": "svd", "budget": 0.25, "include": ["2"]})
    assert not torch.allclose(fisher[2].dense_weight(), plain[2].dense_weight())
    from sparsenets.formats.fisher import fisher_rows

    fresh = mlp()  # the same seed: the weights fisher was factorised from
    rows = fisher_rows(fresh, {"2": fresh[2]}, batches())
    left, right = truncated_svd(fresh[2].weight.detach(), fisher[2].rank, row_weights=rows["2"])
    torch.testing.assert_close(fisher[2].dense_weight(), left @ right)


@pytest.mark.parametrize("allocation", ["energy", "sensitivity"])
def test_allocated_ranks_keep_the_budget_over_the_selected_layers(allocation):
    model = mlp()
    sn.factorize_(model, {"method": "fisher", "budget": 0.3, "allocation": allocation, "exclude": ["4"]},
                  data=batches())
    names = [n for n in ("0", "2") if is_structured(model.get_submodule(n))]
    kept = factor_params(model, names) + sum(model.get_submodule(n).weight.numel() for n in ("0", "2")
                                             if n not in names)
    assert names and kept <= 0.3 * (24 * 64 + 64 * 48)


def test_overrides_keep_layers_dense_or_give_them_their_own_budget():
    model = mlp()
    sn.factorize_(model, {"budget": 0.25, "overrides": {"0": 1, "2": 0.5}, "exclude": ["4"]})
    assert type(model[0]) is nn.Linear
    assert model[2].rank == int(0.5 * 64 * 48 / (64 + 48))


@pytest.mark.parametrize("bad, match", [
    ({"format": "tucker"}, "tucker"), ({"budget": 1.5}, "1.5"), ({"budget": 0}, "budget"),
    ({"method": "pca"}, "pca"), ({"allocation": "energy", "format": "monarch"}, "uniform"),
    ({"rank": 0}, "rank"), ({"format": "monarch", "rank": 4}, "rank"), ({"allocation": "sensitivity"}, "fisher"),
    ({"overrides": {"0": 2}}, "overrides"), ({"widht": 3}, "widht"),
])
def test_bad_factorize_configs_name_the_bad_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        sn.factorize_(mlp(), bad)


def test_a_layer_that_cannot_save_stays_dense():
    model = nn.Sequential(nn.Linear(4, 64))  # rank 1 costs 68 of 256: saves; rank 4 at budget 0.99 would not
    sn.factorize_(model, {"rank": 4})
    assert type(model[0]) is nn.Linear  # 4 * (64 + 4) > 256
    sn.factorize_(model, {"rank": 2})
    assert isinstance(model[0], LowRankLinear)


def test_random_init_trains_from_scratch():
    model = mlp()
    sn.factorize_(model, {"format": "monarch", "method": "random", "budget": 0.5, "exclude": ["4"]})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(4)
    losses = []
    for _ in range(30):
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_hugging_face_conv1d_layers_factorise_in_gemm_orientation():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 40, (2, 8))
    weight = model.transformer.h[0].mlp.c_fc.weight.detach().t().clone()  # Conv1D stores (in, out)
    sn.factorize_(model, {"rank": 16, "include": ["*.mlp.c_fc"]})
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and layer.dense_weight().shape == (128, 32)
    left, right = truncated_svd(weight, 16)
    torch.testing.assert_close(layer.dense_weight(), left @ right)
    assert model(input_ids=ids).logits.shape == (2, 8, 40)


# ---- report ----------------------------------------------------------------------------------------------


def test_report_rows_show_format_parameters_and_flops():
    model = mlp()
    sn.factorize_(model, {"format": "low-rank", "rank": 4, "include": ["0"]})
    sn.factorize_(model, {"format": "monarch", "nblocks": 4, "block_rank": 2, "include": ["2"]})
    rows = {r.name: r for r in sn.report(model).rows}
    assert rows["0"].pattern == "low-rank:4" and rows["0"].nonzeros == 4 * (24 + 64)
    assert rows["0"].shape == (64, 24) and rows["0"].density == pytest.approx(4 * 88 / (24 * 64))
    assert rows["2"].pattern == "monarch:4x2" and rows["2"].nonzeros == model[2].num_parameters()
    assert rows["2"].sparse_flops == 2 * model[2].num_parameters()
    assert rows["4"].pattern == "dense"
    text = str(sn.report(model))
    assert "format" in text.splitlines()[0] and "low-rank:4" in text and "monarch:4x2" in text
    assert "blocks1" not in text  # factors are not listed as uncovered parameters


# ---- save / load -----------------------------------------------------------------------------------------


def test_structured_layers_save_their_factors_and_load_without_the_model(tmp_path):
    model = mlp()
    sn.factorize_(model, {"format": "low-rank", "budget": 0.25, "include": ["0"]})
    sn.factorize_(model, {"format": "monarch", "budget": 0.25, "include": ["2"]})
    x = torch.randn(5, 24)
    path = sn.save(model, tmp_path / "f.safetensors")
    dense_path = sn.save(mlp(), tmp_path / "d.safetensors")
    loaded = sn.load(path)
    assert isinstance(loaded[0], LowRankLinear) and isinstance(loaded[2], MonarchLinear)
    torch.testing.assert_close(loaded(x), model(x))
    params = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in mlp().parameters())
    size, dense_size = path.stat().st_size, dense_path.stat().st_size
    assert size < dense_size * (params / dense_params) + 4096  # proportional to parameters, plus the header
    from sparsenets.io.checkpoint import read_checkpoint

    assert read_checkpoint(path)[0]["version"] == 3 and read_checkpoint(dense_path)[0]["version"] == 2


def test_a_forged_structured_entry_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from sparsenets.io import container

    model = mlp()
    sn.factorize_(model, {"rank": 4, "include": ["2"]})
    path = sn.save(model, tmp_path / "f.safetensors")
    header, _ = container.read(path)[0], None
    meta = json.loads(header["sparsenets"])
    for forged in ({"kind": "Popen", "init": {}},
                   {"kind": "LowRankLinear", "init": {"dict": {"in_features": 64, "out_features": 48,
                                                                "rank": 10 ** 6, "bias": True}}}):
        meta["structured"]["2"] = forged
        bad = tmp_path / "bad.safetensors"
        tensors = load_file(path)
        save_file(tensors, bad, metadata={"sparsenets": json.dumps(meta)})
        with pytest.raises(CheckpointError):
            sn.load(bad)


# ---- MoRe adapters ---------------------------------------------------------------------------------------


def test_more_adapters_start_at_the_base_model_and_train_only_the_updates():
    model = mlp()
    x = torch.randn(8, 24)
    before = model(x)
    sn.add_more_(model, sn.MoReConfig(nblocks=4, block_rank=2, exclude=["4"]))
    assert isinstance(model[0], MoReLinear) and type(model[4]) is nn.Linear
    torch.testing.assert_close(model(x), before)  # the second factor starts at zero
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == model[0].adapter.num_parameters() + model[2].adapter.num_parameters()
    assert model[2].adapter.num_parameters() == 2 * 4 * (16 + 12)  # block_rank * (in + out), padded blocks
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model[2].base.weight.clone()
    for x_, y in batches(4):
        loss = nn.functional.cross_entropy(model(x_), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model[2].base.weight, frozen) and model[2].adapter.blocks2.abs().sum() > 0
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    merged = sn.merge_more_(copy.deepcopy(model))
    assert type(merged[2]) is nn.Linear
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)


def test_more_update_rank_exceeds_lora_at_the_same_parameter_count():
    layer = MoReLinear(nn.Linear(32, 32).double(), nblocks=4, block_rank=1)
    with torch.no_grad():
        layer.adapter.blocks2.normal_()
    assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == 4  # LoRA rank 1 costs the same
    assert layer.adapter.num_parameters() == 1 * (32 + 32)


def test_more_models_copy_pickle_and_save(tmp_path):
    model = sn.add_more_(mlp(), {"nblocks": 2, "block_rank": 1, "exclude": ["4"]})
    with torch.no_grad():
        model[2].adapter.blocks2.normal_()
    x = torch.randn(3, 24)
    torch.testing.assert_close(copy.deepcopy(model)(x), model(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x))
    loaded = sn.load(sn.save(model, tmp_path / "m.safetensors"), model=mlp)
    assert isinstance(loaded[2], MoReLinear)
    torch.testing.assert_close(loaded(x), model(x))
    rows = {r.name: r for r in sn.report(model).rows}
    assert rows["2"].pattern == "more:2x1" and "2.base" not in rows


def test_more_wraps_hugging_face_conv1d_and_refuses_no_match():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 30, (1, 6))
    before = model(input_ids=ids).logits
    sn.add_more_(model, {"include": ["*.c_attn"], "block_rank": 2})
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MoReLinear) and layer.delta_weight().shape == (48, 16)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    with torch.no_grad():
        layer.adapter.blocks2.normal_()
    adapted = model(input_ids=ids).logits
    sn.merge_more_(model)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="nothing_here"):
        sn.add_more_(mlp(), {"include": ["nothing_here"]})
    with pytest.raises(ConfigError, match="nblock"):
        sn.add_more_(mlp(), {"nblock": 2})


# ---- compress and the formats protocol -------------------------------------------------------------------


def test_compress_keeps_structured_layers_as_they_are():
    model = mlp().eval()
    sn.factorize_(model, {"rank": 4, "include": ["2"]})
    x = torch.randn(4, 24)
    compressed = sn.compress(model, x)
    assert isinstance(compressed.get_submodule("2"), LowRankLinear)
    torch.testing.assert_close(compressed(x), model(x))


def test_formats_protocol_runs_every_arm_at_equal_budgets(tmp_path):
    from sparsenets.experiments import load_recipe, run_recipe
    from sparsenets.experiments.protocols.formats import nm_for

    assert nm_for(0.5) == "1:2" and nm_for(0.25) == "1:4" and nm_for(0.3) == "3:10" and nm_for(0.123) is None
    recipe = {
        "name": "tiny", "seeds": [0],
        "data": {"name": "teacher", "train_samples": 256, "test_samples": 128, "inputs": 12, "classes": 4},
        "model": {"name": "lenet_300_100", "hidden": [32, 32]},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 64},
        "method": {"name": "formats", "budgets": [0.5], "finetune_epochs": 1,
                   "arms": ["unstructured", "nm", "low_rank", "low_rank_fisher", "monarch", "monarch_scratch"]},
        "sparsity": {"exclude": ["fc3"]},
    }
    results = run_recipe(load_recipe(recipe), tmp_path / "run")
    rows = {r["arm"]: r for r in results["jobs"]}
    assert set(rows) == {"dense", "unstructured", "nm", "low_rank", "low_rank_fisher", "monarch", "monarch_scratch"}
    selected = 12 * 32 + 32 * 32  # fc1 and fc2 weights; fc3 (the head) stays dense
    total = selected + 32 * 4  # report counts weights
    for arm in ("unstructured", "nm", "low_rank", "monarch", "monarch_scratch"):  # within the same budget
        assert rows[arm]["remaining"] <= (0.5 * selected + total - selected) / total + 1e-9
    text = (tmp_path / "run" / "report.md").read_text()
    for label in ("SVD", "FWSVD", "Monarch", "N:M", "Monarch scratch"):
        assert label in text
