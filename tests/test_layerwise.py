"""Layer-by-layer pruning: block by block, no model copy, inputs from the pruned blocks before."""

import copy

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets import allocation
from sparsenets.config import SparsityConfig
from sparsenets.criteria import CRITERIA
from sparsenets.layerwise.blocks import find_stacks
from sparsenets.masking import get_mask
from sparsenets.sparsify import compute_masks
from sparsenets.targets import find_units

transformers = pytest.importorskip("transformers")


def tiny_llama(layers: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config).eval()


def batches(n: int = 4, seq: int = 16, vocab: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (2, seq), generator=g)} for _ in range(n)]


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        mask = get_mask(module, "weight")
        if mask is not None:
            out[name] = mask.mask.clone()
    return out


LLM = {"exclude": ["lm_head"], "sparsity": 0.5}


def pruned_share(model: nn.Module) -> float:
    """Sparsity over the masked layers (lm_head, embeddings and T5's position biases stay dense)."""
    rows = [r for r in sn.report(model).rows if r.pattern != "dense"]
    return 1 - sum(r.nonzeros for r in rows) / sum(r.numel for r in rows)


def test_stacks_are_found_per_family():
    assert [s.name for s in find_stacks(tiny_llama(), {"model.layers.0.mlp.up_proj"})] == ["model.layers"]
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4))
    holds = {n for n, m in t5.named_modules() if isinstance(m, nn.Linear)}
    assert [s.name for s in find_stacks(t5, holds)] == ["encoder.block", "decoder.block"]


def test_wanda_first_block_matches_whole_model_wanda_and_later_blocks_see_pruned_inputs():
    """Block 0 sees the same inputs either way; block 1 sees block 0's pruned outputs only when
    pruning goes block by block, so its masks differ from whole-model scoring."""
    data = batches()
    config = SparsityConfig(criterion="wanda", **LLM)
    reference = tiny_llama()
    units = find_units(reference, config)
    whole = compute_masks(reference, units, config, CRITERIA["wanda"], data, None)
    model = tiny_llama()
    sn.sparsify_(model, config, data=data)
    got = masks_of(model)
    first = [n for n in got if n.startswith("model.layers.0.")]
    later = [n for n in got if n.startswith("model.layers.2.")]
    assert first and all(torch.equal(got[n], whole[f"{n}.weight"]) for n in first)
    assert any(not torch.equal(got[n], whole[f"{n}.weight"]) for n in later)


def test_layer_by_layer_never_copies_the_model():
    def refuse(*_, **__):
        raise AssertionError("the model was copied")

    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_llama()
        model.__deepcopy__ = refuse  # what copy.deepcopy calls first
        with pytest.raises(AssertionError, match="copied"):
            copy.deepcopy(model)
        sn.sparsify_(model, {"criterion": criterion, **LLM}, data=batches(2))
        assert pruned_share(model) == pytest.approx(0.5, abs=0.01)


def test_magnitude_never_runs_the_model():
    model = tiny_llama()
    model.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran the model"))
    sn.sparsify_(model, {"criterion": "magnitude", **LLM})
    assert pruned_share(model) == pytest.approx(0.5, abs=0.01)


def test_sparsegpt_reconstructs_layer_outputs_better_than_wanda_and_magnitude():
    """Each layer's output error on held-out inputs (those the dense model gives it)."""
    data, held_out = batches(8, seq=32), batches(4, seq=32)
    reference = tiny_llama()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]
    with torch.no_grad():
        for b in held_out:
            reference(**b)
    for h in hooks:
        h.remove()
    errors: dict[str, dict[str, float]] = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_llama()
        sn.sparsify_(model, {"criterion": criterion, **LLM}, data=data)
        with torch.no_grad():
            for name, xs in inputs.items():
                dense, pruned = reference.get_submodule(name), model.get_submodule(name)
                x = torch.cat(xs)
                errors.setdefault(name, {})[criterion] = float((pruned(x) - dense(x)).pow(2).sum()
                                                               / dense(x).pow(2).sum())
    assert len(errors) == 21
    for name, error in errors.items():
        assert error["sparsegpt"] < min(error["wanda"], error["magnitude"]), (name, error)


def test_resume_skips_pruned_blocks_and_gives_the_same_result():
    data = batches()
    config = {"criterion": "sparsegpt", **LLM}
    full = tiny_llama()
    sn.sparsify_(full, config, data=data)
    resumed = tiny_llama()
    sn.sparsify_(resumed, {**config, "include": ["model.layers.0"]}, data=data)  # block 0 done
    seen = []
    sn.sparsify_(resumed, config, data=data, skip_blocks=1, on_block=lambda s, b, t: seen.append(b))
    assert seen == [0, 1, 2]
    for name, mask in masks_of(full).items():
        assert torch.equal(mask, masks_of(resumed)[name]), name
    sd_full, sd_resumed = full.state_dict(), resumed.state_dict()
    assert all(torch.allclose(sd_full[k], sd_resumed[k], atol=1e-6) for k in sd_full)


def test_modes_are_restored_and_t5_prunes_both_stacks():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4))
    t5.train()
    data = [{"input_ids": torch.randint(0, 64, (2, 8)), "decoder_input_ids": torch.randint(0, 64, (2, 6))}]
    blocks = []
    sn.sparsify_(t5, {"criterion": "wanda", **LLM}, data=data, on_block=lambda s, b, t: blocks.append(s.name))
    assert blocks == ["encoder.block"] * 2 + ["decoder.block"] * 2
    assert all(m.training for m in t5.modules())
    assert pruned_share(t5) == pytest.approx(0.5, abs=0.01)


def test_sparsegpt_refuses_what_it_cannot_do():
    with pytest.raises(sn.ConfigError, match="global"):
        sn.sparsify_(tiny_llama(), {"criterion": "sparsegpt", "allocation": "global", **LLM}, data=batches(1))
    with pytest.raises(sn.ConfigError, match="rounds"):
        sn.sparsify_(tiny_llama(), {"criterion": "sparsegpt", "rounds": 2, **LLM}, data=batches(1))
    lstm = nn.Sequential(nn.LSTM(8, 8))
    with pytest.raises(sn.ConfigError, match="sparsegpt"):
        sn.sparsify_(lstm, {"criterion": "sparsegpt"}, data=[torch.randn(3, 2, 8)])


# ---- OWL -----------------------------------------------------------------------------------------


def test_owl_gives_layers_with_more_outliers_more_weights_and_keeps_the_total():
    model = nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 40), nn.Linear(40, 10))
    units = find_units(model, SparsityConfig())
    ratios = {"0": 0.01, "1": 0.05, "2": 0.03}
    split = allocation.owl(units, 0.7, ratios)
    assert split["1"] < split["2"] < split["0"]
    total = sum(split[u.name] * u.numel for u in units) / sum(u.numel for u in units)
    assert total == pytest.approx(0.7)
    assert max(split.values()) - min(split.values()) == pytest.approx(2 * allocation.OWL_LAMBDA)


def test_outlier_ratio_counts_scores_far_above_the_mean_and_ignores_pruned():
    scores = torch.ones(100)
    scores[:3] = 100.0
    scores[3:10] = float("-inf")
    assert allocation.outlier_ratio([scores]) == pytest.approx(3 / 93)


def test_owl_through_sparsify_hits_the_target_with_uneven_layers():
    model = tiny_llama()
    sn.sparsify_(model, {"criterion": "wanda", "allocation": "owl", "sparsity": 0.7, "exclude": ["lm_head"]},
                 data=batches())
    assert pruned_share(model) == pytest.approx(0.7, abs=0.01)
    per_block: dict[str, list[float]] = {}
    for row in sn.report(model).rows:
        if row.name.startswith("model.layers"):
            per_block.setdefault(row.name.split(".")[2], []).append(1 - row.density)
    assert len({round(sum(v) / len(v), 3) for v in per_block.values()}) > 1  # not uniform


def test_owl_on_a_model_without_blocks_uses_per_layer_scores():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:, :2] *= 50  # outliers in the first layer
    sn.sparsify_(model, {"allocation": "owl", "sparsity": 0.5})
    layers = {row.name: 1 - row.density for row in sn.report(model).rows}
    assert layers["0"] < layers["2"]


@pytest.mark.slow
def test_perplexity_ordering_on_the_built_in_lm():
    """The papers' ordering at 2:4 on a trained model: SparseGPT < Wanda < magnitude."""
    from sparsenets.text import builtin_lm, calibration_batches, corpus_text, encode, perplexity

    model, tokenizer = builtin_lm()
    data = calibration_batches(encode(corpus_text("train"), tokenizer), 64, 256)
    test = encode(corpus_text("test"), tokenizer)
    scores = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        pruned = copy.deepcopy(model)
        sn.sparsify_(pruned, {"criterion": criterion, "pattern": "2:4", "exclude": ["lm_head"]}, data=data)
        scores[criterion] = perplexity(pruned, test)
    assert scores["sparsegpt"] < scores["wanda"] < scores["magnitude"], scores
