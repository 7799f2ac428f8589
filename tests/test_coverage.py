"""What sparsenets prunes, and what it says it leaves dense, across model families."""

import warnings

import pytest
import torch
from torch import nn

import sparsenets as sn

T = pytest.importorskip("transformers")

EMBEDDINGS = "embeddings are opt-in"
ONE_D = "1-D norm/bias parameters are not pruned"
BARE = "not a layer type sparsenets prunes"


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def qwen2():
    return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def opt():
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64))


def t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                   num_heads=4))


def vit():
    return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4, num_labels=10))


def distilbert():
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=128, dim=64, hidden_dim=128,
                                                                    n_layers=2, n_heads=4, max_position_embeddings=64))


# family -> (an embedding it must name, a norm it must name)
FAMILIES = {
    llama: ("model.embed_tokens.weight", "model.layers.*.input_layernorm.weight"),
    qwen2: ("model.embed_tokens.weight", "model.norm.weight"),
    opt: ("model.decoder.embed_positions.weight", "model.decoder.layers.*.final_layer_norm.weight"),
    t5: ("shared.weight", "encoder.block.*.layer.*.layer_norm.weight"),
    vit: ("vit.embeddings.position_embeddings", "vit.layers.*.layernorm_before.weight"),
    distilbert: ("distilbert.embeddings.word_embeddings.weight", "distilbert.embeddings.LayerNorm.weight"),
}


@pytest.mark.parametrize("build", FAMILIES, ids=lambda f: f.__name__)
def test_uncovered_lists_only_embeddings_norms_and_biases(build):
    torch.manual_seed(0)
    model = build()
    embedding, norm = FAMILIES[build]
    reasons = {u.name: u.reason for u in sn.report(model).uncovered}
    assert EMBEDDINGS in reasons.get(embedding, "") or BARE in reasons.get(embedding, "")
    assert reasons[norm] == ONE_D
    for name, reason in reasons.items():
        assert EMBEDDINGS in reason or reason == ONE_D or BARE in reason, f"{name}: {reason}"
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not linear_weights & set(reasons)  # every Linear weight is a target


@pytest.mark.parametrize("build", FAMILIES, ids=lambda f: f.__name__)
def test_default_sparsify_reaches_the_target_and_does_not_warn(build):
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*leaves dense")
        sn.sparsify_(model, {"sparsity": 0.5})
    rows = [r for r in sn.report(model).rows if r.pattern != "dense" and r.tied_to is None]
    assert rows
    assert sum(r.nonzeros for r in rows) / sum(r.numel for r in rows) == pytest.approx(0.5, abs=1e-3)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3))


def test_uncovered_groups_the_same_parameter_of_every_block():
    uncovered = {u.name: u for u in sn.report(Blocks()).uncovered}
    assert set(uncovered) == {"blocks.*.0.bias", "blocks.*.1.weight", "blocks.*.1.bias"}
    assert uncovered["blocks.*.1.weight"].count == 3 and uncovered["blocks.*.1.weight"].numel == 12


@pytest.mark.filterwarnings("ignore:.*leaves dense")
def test_masked_parameters_still_count_as_covered():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    before = sn.report(model).uncovered
    sn.sparsify_(model, {"sparsity": 0.5})
    assert sn.report(model).uncovered == before
    assert [u.name for u in before] == ["0.weight", "1.bias", "2.bias"]


def test_opting_into_embeddings_covers_them():
    model = nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"\d+% of the parameters .* biggest: 0\.weight \(16,000\): embeddings"):
        sn.sparsify_(model, {"sparsity": 0.5})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*leaves dense")
        sn.sparsify_(nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 4)),
                     {"sparsity": 0.5, "module_types": ["Embedding", "Linear"]})


def test_report_dict_and_text_carry_the_uncovered_list():
    report = sn.report(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert report.to_dict()["uncovered"] == [
        {"name": "0.bias", "reason": ONE_D, "numel": 4, "count": 1, "ndim": 1},
        {"name": "1.weight", "reason": ONE_D, "numel": 4, "count": 1, "ndim": 1},
        {"name": "1.bias", "reason": ONE_D, "numel": 4, "count": 1, "ndim": 1},
    ]
    assert str(report).splitlines()[-4:] == ["not pruned by default:", f"  0.bias: {ONE_D}",
                                             f"  1.weight: {ONE_D}", f"  1.bias: {ONE_D}"]
