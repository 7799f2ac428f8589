"""The head pattern and head removal on every attention layout: tiny Hugging Face models."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.attention import attention_layout, projections
from sparsenets.gemm import to_gemm
from sparsenets.masking import finalize_

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:.*this config leaves dense:UserWarning")  # heads only, on purpose

IDS = {"input_ids": torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))}
GQA = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16}


def _t5() -> nn.Module:
    return transformers.T5Model(transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                      num_heads=4))


# family -> (build, example input)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**GQA)), IDS),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**GQA)), IDS),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**GQA)), IDS),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, word_embed_proj_dim=16)), IDS),
    "t5": (_t5, {**IDS, "decoder_input_ids": IDS["input_ids"][:, :5]}),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32)), {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}),
    "distilbert": (lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=50, dim=16, hidden_dim=32, n_layers=2, n_heads=4, max_position_embeddings=16)), IDS),
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**GQA, pad_token_id=0)), IDS),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=16)), IDS),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=16)), IDS),
}
REMOVABLE = [f for f in FAMILIES if f not in ("t5", "phi3")]


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():  # no exact zeros anywhere (biases start at zero), so zeros count masked elements
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def _out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**FAMILIES[family][1])[0]


def _masked(family: str) -> nn.Module:
    model = _build(family)
    sn.sparsify_(model, {"pattern": "head", "sparsity": 0.5})
    return model


def _zero_groups(model: nn.Module) -> list[list[bool]]:
    """Per attention module, whether each group is zero; fails if a group is only partly zero."""
    result = []
    for module in model.modules():
        if (layout := attention_layout(module)) is None:
            continue
        n_groups, parts = layout
        zero = []
        for g in range(n_groups):
            states = set()
            for part in parts:
                values = _group_values(part, g)
                assert bool((values == 0).all()) or bool((values != 0).all()), f"group {g} of {part.param}: partly zero"
                states.add(bool((values == 0).all()))
            assert len(states) == 1, f"group {g} is zero in some tensors only"
            zero.append(states.pop())
        result.append(zero)
    return result


def _group_values(part, group: int) -> torch.Tensor:
    tensor = getattr(part.module, part.param).detach()
    if part.role == "bias":
        return tensor[part.ids == group]
    gemm = to_gemm(part.module, tensor)
    return gemm[part.ids == group] if part.role == "rows" else gemm[:, part.ids == group]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_zeros(model: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_pattern_zeros_whole_heads_or_groups(family: str) -> None:
    baked = finalize_(copy.deepcopy(_masked(family)))
    zero = _zero_groups(baked)
    assert zero and all(sum(layer) == len(layer) // 2 for layer in zero)  # uniform: half of each module


def test_gqa_groups_are_a_key_value_head_with_its_query_heads() -> None:
    baked = finalize_(copy.deepcopy(_masked("llama")))
    attn = baked.model.layers[0].self_attn
    p = projections(attn)
    assert p is not None and (p.heads, p.kv_heads, p.group_size) == (4, 2, 2)
    kv_zero = ~p.k.weight.reshape(2, 8, -1).any(dim=(1, 2))
    q_zero = ~p.q.weight.reshape(4, 8, -1).any(dim=(1, 2))
    o_zero = ~p.o.weight.reshape(-1, 4, 8).any(dim=(0, 2))
    assert int(kv_zero.sum()) == 1
    assert torch.equal(q_zero, kv_zero.repeat_interleave(2)) and torch.equal(o_zero, q_zero)


def test_fused_gqa_groups_take_their_query_key_and_value_rows() -> None:
    baked = finalize_(copy.deepcopy(_masked("phi3")))
    attn = baked.model.layers[0].self_attn
    rows = ~attn.qkv_proj.weight.reshape(8, 8, -1).any(dim=(1, 2))  # 4 query, 2 key, 2 value heads of 8 rows
    q_zero, k_zero, v_zero = rows[:4], rows[4:6], rows[6:]
    o_zero = ~attn.o_proj.weight.reshape(-1, 4, 8).any(dim=(0, 2))
    assert int(k_zero.sum()) == 1 and torch.equal(v_zero, k_zero)
    assert torch.equal(q_zero, k_zero.repeat_interleave(2)) and torch.equal(o_zero, q_zero)


@pytest.mark.parametrize("family", REMOVABLE)
def test_compress_removes_heads_and_keeps_outputs(family: str) -> None:
    masked = _masked(family)
    baked = finalize_(copy.deepcopy(masked))
    compressed = sn.compress(masked, FAMILIES[family][1], autotune=False)
    report = compressed.compress_report
    assert not any("undid" in note for note in report.notes), report.notes
    torch.testing.assert_close(_out(compressed, family), _out(baked, family), atol=1e-5, rtol=0)
    # every masked element belonged to a removed head: the parameters drop by exactly those
    assert _n_params(compressed) == _n_params(baked) - _n_zeros(baked) > 0
    kept = [len(layer) - sum(layer) for layer in _zero_groups(baked)]
    assert [(len(layer), sum(layer)) for layer in _zero_groups(compressed)] == [(n, 0) for n in kept]


@pytest.mark.parametrize(("family", "counts"), [
    ("opt", {"num_heads": 2}), ("vit", {"num_attention_heads": 2}), ("distilbert", {"n_heads": 2}),
    ("bert", {"num_attention_heads": 2, "all_head_size": 8}), ("gpt2", {"num_heads": 2, "split_size": 8})])
def test_compressed_modules_hold_their_own_head_counts(family: str, counts: dict[str, int]) -> None:
    compressed = sn.compress(_masked(family), FAMILIES[family][1], autotune=False)
    for module in compressed.modules():
        if attention_layout(module) is not None:
            holder = getattr(module, "self", module)  # BERT keeps its counts on attention.self
            assert {k: getattr(holder, k) for k in counts} == counts


def _attention_modules(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if projections(m) is not None]


@pytest.mark.parametrize(("family", "zeroed", "left"), [
    ("opt", [[1], [0, 1, 2]], [3, 1]), ("vit", [[0, 3], [2]], [2, 3]), ("distilbert", [[], [1, 2]], [4, 2]),
    ("mistral", [[], [1]], [2, 1])])
def test_each_layer_keeps_its_own_number_of_heads(tmp_path, family: str, zeroed: list, left: list) -> None:
    """Zero output columns count as pruned heads (or groups) without masks; layers differ."""
    model = _build(family)
    with torch.no_grad():
        for attn, groups in zip(_attention_modules(model), zeroed):
            p = projections(attn)
            assert p is not None
            width = p.group_size * p.head_dim
            for g in groups:
                p.o.weight[:, g * width:(g + 1) * width] = 0
    compressed = sn.compress(model, FAMILIES[family][1], autotune=False)
    assert not compressed.compress_report.notes
    assert [projections(a).kv_heads for a in _attention_modules(compressed)] == left  # type: ignore[union-attr]
    torch.testing.assert_close(_out(compressed, family), _out(model, family), atol=1e-5, rtol=0)
    loaded = sn.load(sn.save(compressed, tmp_path / "m.safetensors"), model=FAMILIES[family][0])
    torch.testing.assert_close(_out(loaded.eval(), family), _out(compressed, family), atol=1e-6, rtol=0)


def test_group_with_zero_values_goes_and_its_value_bias_folds() -> None:
    """Qwen2 has value biases: a group whose values are zero outputs that bias from all its query heads."""
    model = _build("qwen2")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight[8:16] = 0  # key/value head 1; its query heads 2 and 3 still attend
    bias_before = attn.o_proj.bias
    compressed = sn.compress(model, IDS, autotune=False)
    shrunk = compressed.model.layers[0].self_attn
    assert bias_before is None and shrunk.o_proj.bias is not None and bool(shrunk.o_proj.bias.any())
    assert (shrunk.q_proj.out_features, shrunk.v_proj.out_features) == (16, 8)
    torch.testing.assert_close(_out(compressed, "qwen2"), _out(model, "qwen2"), atol=1e-5, rtol=0)


def test_gqa_keeps_query_heads_per_group() -> None:
    compressed = sn.compress(_masked("llama"), IDS, autotune=False)
    attn = compressed.model.layers[1].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    assert attn.num_key_value_groups == 2
    assert "removed 1 of 2 key/value groups" in "\n".join(compressed.compress_report.removed)


@pytest.mark.parametrize(("family", "reason", "modules"), [
    ("t5", "kept: T5Attention shares one position bias", 6),  # 2 encoder, 2 decoder, 2 cross-attention
    ("phi3", "kept: Phi3Attention reads head counts from its config", 2)])
def test_heads_a_family_cannot_lose_are_kept_and_reported(family: str, reason: str, modules: int) -> None:
    masked = _masked(family)
    baked = finalize_(copy.deepcopy(masked))
    compressed = sn.compress(masked, FAMILIES[family][1], autotune=False)
    torch.testing.assert_close(_out(compressed, family), _out(baked, family), atol=1e-5, rtol=0)
    assert _n_params(compressed) == _n_params(baked)
    assert len([line for line in compressed.compress_report.notes if reason in line]) == modules


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_model_round_trips_through_save_and_load(tmp_path, family: str) -> None:
    compressed = sn.compress(_masked(family), FAMILIES[family][1], autotune=False)
    path = sn.save(compressed, tmp_path / f"{family}.safetensors")
    loaded = sn.load(path, model=lambda: FAMILIES[family][0]())
    assert _n_params(loaded) == _n_params(compressed)
    torch.testing.assert_close(_out(loaded.eval(), family), _out(compressed, family), atol=1e-6, rtol=0)
