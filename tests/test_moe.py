"""Mixture-of-experts models: experts stored as 3-D parameters are targets, whole experts go."""

import pytest
import torch

import sparsenets as sn
from sparsenets.compression.experts import moe_blocks, remove_dead_experts_
from sparsenets.masking import get_mask

transformers = pytest.importorskip("transformers")

EXPERTS = 4


def tiny_mixtral(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config).eval()


def tiny_qwen2_moe(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=EXPERTS, num_experts_per_tok=2)
    return transformers.Qwen2MoeForCausalLM(config).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- experts are targets --------------------------------------------------------------------


def test_experts_are_masked_with_masks_of_their_own_3d_shape():
    model = tiny_mixtral()
    x = tokens()
    sn.sparsify_(model, {"sparsity": 0.5})
    bank = model.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        mask = get_mask(bank, name)
        assert mask is not None and mask.mask.shape == getattr(bank, name).shape
        assert (getattr(bank, name)[~mask.mask] == 0).all()
    assert torch.isfinite(model(x).logits).all()


def test_every_default_target_reaches_the_sparsity_within_a_group():
    model = tiny_mixtral()
    sn.sparsify_(model, {"sparsity": 0.5})
    rows = [r for r in sn.report(model).rows if r.pattern != "dense"]
    assert any("experts.gate_up_proj" in r.name for r in rows)
    kept = sum(r.nonzeros for r in rows) / sum(r.numel for r in rows)
    assert abs(kept - 0.5) <= 1 / sum(r.numel for r in rows)
    # the experts are the bulk of the model: before, they were left dense
    expert_numel = sum(r.numel for r in rows if "experts" in r.name)
    assert expert_numel > 0.5 * n_params(model)


@pytest.mark.filterwarnings("ignore:.*leaves dense")
def test_row_groups_never_span_two_experts():
    model = tiny_mixtral()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel", "include": ["*experts*"]})
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj  # experts x outputs x inputs
    rows_kept = gate_up.ne(0).any(-1)
    assert (gate_up.ne(0).all(-1) == rows_kept).all()  # each expert's output row whole or gone
    assert not rows_kept.all() and rows_kept.any()


def test_report_lists_the_experts_and_what_it_leaves_dense():
    model = tiny_mixtral()
    report = sn.report(model)
    names = [r.name for r in report.rows]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    assert report.rows[names.index("model.layers.0.mlp.experts.down_proj")].shape == (EXPERTS, 64, 96)
    reasons = {u.name: u.reason for u in report.uncovered}
    assert "routers" in reasons["model.layers.*.mlp.gate.weight"]
    assert "Embedding" in reasons["model.embed_tokens.weight"]
    assert "1-D" in reasons["model.norm.weight"]
    assert not any("experts" in name or "proj" in name for name in reasons)
    text = str(report)
    assert "not pruned by default:" in text and "model.layers.*.mlp.gate.weight (x2): routers" in text
    assert report.to_dict()["uncovered"][0]["name"] == "model.embed_tokens.weight"


def test_expert_flops_count_the_routed_share():
    model = tiny_mixtral()
    row = next(r for r in sn.report(model).rows if r.name.endswith("0.mlp.experts.down_proj"))
    assert row.dense_flops == 2 * row.numel * 2 // EXPERTS  # top-2 of 4 experts per token


def test_sparsify_warns_when_most_weights_stay_dense():
    with pytest.warns(UserWarning, match=r"leaves dense, biggest: model\.layers\.\*\.mlp\.experts\.gate_up_proj"):
        sn.sparsify_(tiny_mixtral(), {"sparsity": 0.5, "exclude": ["*experts*"]})


def test_no_coverage_warning_when_the_experts_are_covered(recwarn):
    sn.sparsify_(tiny_mixtral(), {"sparsity": 0.5})
    assert not [w for w in recwarn if "leaves dense" in str(w.message)]


def test_qwen2_moe_experts_are_targets_and_its_gates_stay_dense():
    model = tiny_qwen2_moe()
    sn.sparsify_(model, {"sparsity": 0.5})
    mlp = model.model.layers[0].mlp
    assert get_mask(mlp.experts, "down_proj") is not None
    assert get_mask(mlp.shared_expert_gate, "weight") is None
    assert torch.isfinite(model(tokens()).logits).all()


# ---- SynFlow and other criteria on MoE ------------------------------------------------------


def test_synflow_runs_on_mixtral_in_float32_where_float64_has_no_kernel():
    model = tiny_mixtral()
    with pytest.warns(UserWarning, match="'synflow' scores in float32"):
        sn.sparsify_(model, {"sparsity": 0.5, "criterion": "synflow", "rounds": 2}, data=[{"input_ids": tokens()}])
    bank = model.model.layers[0].mlp.experts
    masks = [get_mask(bank, name) for name in ("gate_up_proj", "down_proj")]
    assert all(m is not None for m in masks)
    kept = sum(int(m.mask.sum()) for m in masks) / sum(m.mask.numel() for m in masks)
    assert abs(kept - 0.5) < 0.05


def test_synflow_runs_on_half_precision():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half()
    sn.sparsify_(model, {"sparsity": 0.5, "criterion": "synflow", "rounds": 2, "input_shape": [8]})
    assert model[0].weight.dtype == torch.float16
    assert (model[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_a_criterion_failing_inside_the_model_is_named(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("Expected mat_a to be Float32, got Double")

    monkeypatch.setattr(type(tiny_mixtral().model.layers[0].mlp.experts), "forward", broken)
    with pytest.raises(sn.ConfigError, match="criterion 'synflow' failed on this model: RuntimeError: Expected"):
        sn.sparsify_(tiny_mixtral(), {"sparsity": 0.5, "criterion": "synflow"}, data=[{"input_ids": tokens()}])


def test_wanda_refuses_expert_banks_by_name():
    with pytest.raises(sn.ConfigError, match="wanda.*model.layers.0.mlp.experts.gate_up_proj"):
        sn.sparsify_(tiny_mixtral(), {"sparsity": 0.5, "criterion": "wanda"}, data=[{"input_ids": tokens()}])


# ---- removing whole experts -----------------------------------------------------------------


def never_route_to(model, dead: list[int]):
    """Make experts ``dead`` unreachable: residual coordinate 0 is a constant 10 (embeddings set it,
    nothing writes to it), and the router rows of ``dead`` weigh it by −1e4."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.experts.down_proj[:, 0, :] = 0.0
            layer.mlp.gate.weight[dead] = 0.0
            layer.mlp.gate.weight[dead, 0] = -1e4
    return model


def test_removing_never_routed_experts_leaves_outputs_unchanged():
    model = never_route_to(tiny_mixtral(), dead=[1, 3])
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    bank = model.model.layers[0].mlp.experts
    expected = bank.gate_up_proj.detach()[[0, 2]].clone()
    size = n_params(model)
    sn.prune_experts_(model, keep=2, data=[{"input_ids": x}])
    assert torch.equal(bank.gate_up_proj, expected)  # experts 1 and 3 went, 0 and 2 stayed, in order
    per_expert = (bank.gate_up_proj[0].numel() + bank.down_proj[0].numel() + 64)  # + a router row
    assert size - n_params(model) == 2 * 2 * per_expert  # two experts in each of two layers
    assert model.config.num_local_experts == 2 and bank.num_experts == 2
    assert model.model.layers[0].mlp.gate.weight.shape == (2, 64)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, before, atol=1e-5)


def test_removing_routed_experts_lowers_top_k_and_still_generates():
    model = tiny_mixtral()
    x = tokens()
    sn.prune_experts_(model, 0.75, by="magnitude")
    mlp = model.model.layers[1].mlp
    assert mlp.experts.num_experts == 1 and mlp.gate.top_k == 1 and model.config.num_experts_per_tok == 1
    logits = model(x).logits
    assert logits.shape == (2, 8, 128) and torch.isfinite(logits).all()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)


def test_magnitude_keeps_the_biggest_experts():
    model = tiny_mixtral()
    bank = model.model.layers[0].mlp.experts
    with torch.no_grad():
        bank.down_proj[2] *= 10
    big = bank.down_proj.detach()[2].clone()
    sn.prune_experts_(model, keep=1, by="magnitude")
    assert torch.equal(bank.down_proj[0], big)


def test_expert_removal_on_qwen2_moe():
    model = tiny_qwen2_moe()
    x = tokens()
    size = n_params(model)
    sn.prune_experts_(model, 0.5, data=[{"input_ids": x}])
    assert model.config.num_experts == 2 and model.model.layers[0].mlp.gate.weight.shape[0] == 2
    assert n_params(model) < size
    assert torch.isfinite(model(x).logits).all()


def test_removal_slices_the_masks_too():
    model = never_route_to(tiny_mixtral(), dead=[0])
    sn.sparsify_(model, {"sparsity": 0.5})
    bank = model.model.layers[0].mlp.experts
    expected = bank.gate_up_proj.detach()[[1, 2, 3]].clone()
    sn.prune_experts_(model, keep=3, data=[{"input_ids": tokens()}])
    mask = get_mask(bank, "gate_up_proj")
    assert mask is not None and mask.mask.shape == (3, 192, 64)
    assert torch.equal(bank.gate_up_proj, expected)


def test_dead_experts_are_removed():
    model = tiny_mixtral()
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp.experts, name)[2] = 0.0
    assert remove_dead_experts_(model) == {"model.layers.1.mlp": [2]}
    assert [b.n for b in moe_blocks(model)] == [EXPERTS, EXPERTS - 1]
    assert torch.isfinite(model(tokens()).logits).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"fraction": 0.5, "keep": 2}, "not both"),
    ({"keep": 5, "by": "magnitude"}, "keep=5"),
    ({"fraction": 1.0, "by": "magnitude"}, "fraction=1.0"),
    ({"keep": 2, "by": "size"}, "by='size'"),
    ({"keep": 2}, "needs calibration data"),
])
def test_bad_expert_pruning_arguments_are_named(kwargs, match):
    with pytest.raises(sn.ConfigError, match=match):
        sn.prune_experts_(tiny_mixtral(), **kwargs)


def test_a_dense_model_has_no_experts_to_prune():
    with pytest.raises(sn.ConfigError, match="Sequential has no mixture-of-experts block"):
        sn.prune_experts_(torch.nn.Sequential(torch.nn.Linear(4, 4)), keep=1, by="magnitude")


class TransposedBank(torch.nn.Module):
    """An expert bank stored ``experts × in × out`` (``is_transposed``), as some families keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.is_transposed = 3, True
        self.weight_in_out = torch.nn.Parameter(torch.randn(3, 6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ti,eio->teo", x, self.weight_in_out)


def test_transposed_banks_group_by_output_columns():
    torch.manual_seed(0)
    bank = TransposedBank()
    sn.sparsify_(bank, {"sparsity": 0.5, "pattern": "channel"})
    kept = bank.weight_in_out.ne(0)  # experts x in x out: an output is a column of one expert
    assert (kept.all(1) == kept.any(1)).all() and kept.any(1).float().mean().item() == 0.5


def tiny_other_moe(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts=EXPERTS, num_experts_per_tok=2)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, head_dim=16, **common)
        return transformers.Qwen3MoeForCausalLM(config).eval()
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(intermediate_size=32, **common)).eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_other_moe_families_prune_and_remove_experts(family):
    model = tiny_other_moe(family)
    x = tokens()
    sn.sparsify_(model, {"sparsity": 0.5})
    assert get_mask(model.model.layers[0].mlp.experts, "down_proj") is not None
    sn.prune_experts_(model, 0.5, data=[{"input_ids": x}])
    assert model.config.num_experts == EXPERTS // 2
    assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x4", "channel"])
def test_every_expert_gets_the_target_not_just_the_bank(pattern):
    """One expert's weights are scaled up: pooled selection would strip the others and spare it."""
    model = tiny_mixtral()
    bank = model.model.layers[0].mlp.experts
    with torch.no_grad():
        bank.gate_up_proj[0] *= 100
        bank.down_proj[0] *= 100
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": pattern, "include": ["*experts*"]})
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(bank, name)
        for expert in range(EXPERTS):
            kept = float(weight[expert].ne(0).float().mean())
            assert kept == pytest.approx(0.5, abs=0.05), (name, expert, kept)
