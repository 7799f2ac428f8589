"""compress: smaller models that compute what the masked model computes.

Outputs are compared on fresh random inputs (not the example input compress saw), in eval
mode, forward and backward. Sizes are read from the modules themselves.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenets as sn
from sparsenets.compression import choose, surgery
from sparsenets.layers.csr import CSRLinear
from sparsenets.masking import masks
from sparsenets.record import get_record, has_record

from helpers import convnet, mlp, snapshot

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()


def _block_sparse_available() -> bool:
    try:
        import sparsenets.layers.block_sparse  # noqa: F401
    except ImportError:
        return False
    return True


needs_block_sparse = pytest.mark.skipif(not _block_sparse_available(),
                                        reason="sparsenets.layers.block_sparse is not importable")


# ---- models ----------------------------------------------------------------------------------------


def _random_batchnorm(model: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm statistics: a zero channel then comes out as a nonzero constant."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def _random_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                m.bias.normal_(0, 0.5)
    return model


class Functional(nn.Module):
    """Flatten and activations written as functions and methods, the way many models are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), -1)
        h = torch.sigmoid(self.fc1(h))  # sigmoid(0) = 0.5: a pruned neuron is a constant, not a zero
        h = self.fc2(h).tanh()
        return self.out(F.dropout(h, 0.1, self.training))


class Residual(nn.Module):
    """A hidden layer whose outputs also feed a residual sum: they must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.head(h + self.fc2(h))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                         nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.GELU(), nn.Flatten(), nn.Linear(32, 5))


def _bert() -> nn.Module:
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=32, max_position_embeddings=16), add_pooling_layer=False)


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_positions=16))


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], dict]] = {
    # name: (build, fresh input, config extras)
    "mlp": (lambda: _random_biases(mlp()), lambda: torch.randn(6, 20), {}),
    "convnet": (lambda: _random_batchnorm(convnet()), lambda: torch.randn(4, 3, 6, 6), {}),
    "conv1d": (lambda: _random_batchnorm(_conv1d()), lambda: torch.randn(4, 3, 12), {}),
    "functional": (lambda: _random_biases(Functional()), lambda: torch.randn(4, 3, 6, 6), {}),
    "residual": (Residual, lambda: torch.randn(5, 12), {}),
    "encoder": (_encoder, lambda: torch.randn(3, 6, 16), {}),
    "bert": (lambda: _random_biases(_bert()), lambda: {"input_ids": torch.randint(0, 50, (2, 7))}, {}),
    "gpt2": (lambda: _random_biases(_gpt2()), lambda: {"input_ids": torch.randint(0, 50, (2, 7))},
             {"exclude": ["lm_head"]}),
}
PATTERNS = ["unstructured", "block:4x4", "2:4", "channel", "head"]
ATTENTION = {"encoder", "bert", "gpt2"}
CASES = [(m, p) for m in MODELS for p in PATTERNS if p != "head" or m in ATTENTION]



def _config(model_name: str, pattern: str) -> dict:
    config = {"sparsity": 0.5, "pattern": pattern, **MODELS[model_name][2]}
    if pattern == "2:4" and model_name in ("convnet", "functional", "conv1d"):
        config.setdefault("exclude", []).append("conv" if model_name == "functional" else "0")  # 27 / 9 inputs
    if pattern == "block:4x4" and model_name in ("mlp", "residual"):
        config["exclude"] = ["4" if model_name == "mlp" else "head"]  # 3 outputs: smaller than a block
    return config


def _masked(model_name: str, pattern: str) -> nn.Module:
    model = MODELS[model_name][0]()
    sn.sparsify_(model, _config(model_name, pattern))
    return model.eval()


def _out(model: nn.Module, inputs: Any) -> torch.Tensor:
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    return output


def _sparse_everywhere(module: nn.Module, pattern: str, kinds: list[str]) -> str:
    """Replaces the density rule: every layer takes a sparse kernel if one fits (to test them all)."""
    return "block" if "block" in kinds else "csr" if "csr" in kinds else "dense"


@pytest.fixture
def all_sparse(monkeypatch):
    monkeypatch.setattr(choose, "rule", _sparse_everywhere)


def _explains_zeros(note: str) -> bool:
    """A note saying why zeros stayed (not a kernel or shrinking that had to be undone)."""
    return any(why in note for why in ("zero outputs kept:", "zero channels kept:", "are zero; kept:"))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


# ---- outputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, pattern", CASES)
def test_compressed_outputs_equal_masked_outputs(model_name: str, pattern: str, all_sparse) -> None:
    masked = _masked(model_name, pattern)
    fresh = MODELS[model_name][1]
    compressed = sn.compress(masked, fresh(), autotune=False)
    fallbacks = [n for n in compressed.compress_report.notes if not _explains_zeros(n)]
    assert not fallbacks, fallbacks  # no fallback was needed
    for _ in range(2):
        inputs = fresh()
        with torch.no_grad():
            _assert_close(_out(compressed, inputs), _out(masked, inputs))


@pytest.mark.parametrize("model_name, pattern",
                         [c for c in CASES if c[0] in ("mlp", "convnet", "conv1d", "functional")])
def test_compressed_gradients_equal_masked_gradients(model_name: str, pattern: str, all_sparse) -> None:
    masked = _masked(model_name, pattern)
    fresh = MODELS[model_name][1]
    compressed = sn.compress(masked, fresh(), autotune=False)
    x = fresh()
    grads = []
    for model in (masked, compressed):
        xi = x.clone().requires_grad_()
        model(xi).pow(2).sum().backward()
        grads.append(xi.grad)
    _assert_close(grads[1], grads[0])
    # the kept weights train: every trainable tensor of the compressed model got a gradient
    assert all(p.grad is not None for p in compressed.parameters() if p.requires_grad)


def test_transformer_gradients_reach_the_embeddings(all_sparse) -> None:
    masked = _masked("bert", "head")
    inputs = {"input_ids": torch.randint(0, 50, (2, 7))}
    compressed = sn.compress(masked, inputs, autotune=False)
    grads = []
    for model in (masked, compressed):
        _out(model, inputs).pow(2).sum().backward()
        grads.append(model.embeddings.word_embeddings.weight.grad)
    _assert_close(grads[1], grads[0])


def test_input_model_is_unchanged(all_sparse) -> None:
    masked = _masked("convnet", "channel")
    before, kinds = snapshot(masked), [type(m) for m in masked.modules()]
    n_masks = len(list(masks(masked)))
    sn.compress(masked, torch.randn(2, 3, 6, 6))
    after = snapshot(masked)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in masked.modules()] == kinds
    assert len(list(masks(masked))) == n_masks


# ---- physical removal ------------------------------------------------------------------------------------


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_name", ["mlp", "convnet", "conv1d", "functional", "bert", "gpt2", "encoder"])
def test_channel_pruning_removes_parameters(model_name: str) -> None:
    masked = _masked(model_name, "channel")
    compressed = sn.compress(masked, MODELS[model_name][1](), autotune=False)
    report = compressed.compress_report
    assert report.removed and report.params_after < report.params_before
    assert _n_params(compressed) == report.params_after < _n_params(masked)


def test_mlp_neurons_removed_exactly() -> None:
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel"})
    compressed = sn.compress(model, torch.randn(3, 20), autotune=False)
    # hidden layers keep the neurons the mask kept; the output layer keeps all its outputs
    assert compressed[0].out_features == 16 and compressed[2].in_features == 16
    assert compressed[2].out_features == 12 and compressed[4].in_features == 12
    assert compressed[4].out_features == 5


def test_zero_row_with_bias_is_folded_into_the_next_layer() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[[1, 4, 6]] = 0  # bias stays: these neurons output sigmoid(bias), a constant
        model[0].bias.normal_()
    compressed = sn.compress(model, torch.randn(2, 6), autotune=False)
    assert compressed[0].out_features == 5 and compressed[2].in_features == 5
    x = torch.randn(10, 6)
    _assert_close(compressed(x), model(x))


def test_unused_inputs_remove_the_neurons_feeding_them() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight[:, [0, 2]] = 0  # nobody reads neurons 0 and 2
    compressed = sn.compress(model, torch.randn(2, 6), autotune=False)
    assert compressed[0].out_features == 6
    x = torch.randn(10, 6)
    _assert_close(compressed(x), model(x))


def test_constant_channels_before_a_padded_conv_merge_into_one() -> None:
    model = _random_batchnorm(convnet())
    with torch.no_grad():
        model[0].weight[:6] = 0  # 6 dead filters: constants after BatchNorm, read by a padded conv
        model[0].bias[:6] = 0
        model[1].bias[:6] = 1.0 + torch.rand(6)  # positive after ReLU: not zeros
        model[1].running_mean[:6] = 0
    compressed = sn.compress(model.eval(), torch.randn(2, 3, 6, 6), autotune=False)
    assert compressed[0].out_channels == 3  # 2 live + 1 carrying all the constants
    x = torch.randn(4, 3, 6, 6)
    _assert_close(compressed(x), model(x))


def test_residual_outputs_stay() -> None:
    model = Residual()
    with torch.no_grad():
        model.fc1.weight[:4] = 0
        model.fc1.bias[:4] = 0
    compressed = sn.compress(model, torch.randn(2, 12), autotune=False)
    assert compressed.fc1.out_features == 12  # its outputs also go into the sum
    x = torch.randn(5, 12)
    _assert_close(compressed(x), model(x))


def test_shared_layer_is_left_alone() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.mid = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.mid(torch.relu(self.fc(x)))))

    model = Twice()
    with torch.no_grad():
        model.fc.weight[:3] = 0
        model.fc.bias[:3] = 0
    compressed = sn.compress(model, torch.randn(2, 8), autotune=False)
    assert compressed.fc.weight.shape == (8, 8)
    x = torch.randn(4, 8)
    _assert_close(compressed(x), model(x))


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_head_pruning_removes_heads(model_name: str) -> None:
    masked = _masked(model_name, "head")
    compressed = sn.compress(masked, MODELS[model_name][1](), autotune=False)
    if model_name == "bert":
        attention = [layer.attention.self for layer in compressed.encoder.layer]
        heads = [a.num_attention_heads for a in attention]
        widths = [a.query.out_features for a in attention]
    else:
        attention = [block.attn for block in compressed.transformer.h]
        heads = [a.num_heads for a in attention]
        widths = [a.c_attn.weight.shape[1] // 3 for a in attention]
    assert heads == [2, 2] and widths == [8, 8]  # half of 4 heads of 4 dims
    assert compressed.compress_report.params_after < compressed.compress_report.params_before


def test_head_with_zero_value_weights_is_folded() -> None:
    model = _random_biases(_bert()).eval()
    attn = model.encoder.layer[0].attention.self
    with torch.no_grad():
        attn.value.weight[4:8] = 0  # head 1 outputs its value bias whatever it attends to
    compressed = sn.compress(model, {"input_ids": torch.randint(0, 50, (2, 7))}, autotune=False)
    assert compressed.encoder.layer[0].attention.self.num_attention_heads == 3
    inputs = {"input_ids": torch.randint(0, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    inputs["attention_mask"][0, 5:] = 0
    with torch.no_grad():
        _assert_close(_out(compressed, inputs), _out(model, inputs))


def test_multihead_attention_heads_are_kept_and_reported() -> None:
    from sparsenets.models import build_model

    model = build_model("transformer", (8, 6), 3, dim=16, heads=4)
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "head"})
    x = torch.randn(2, 8, 6)
    compressed = sn.compress(model.eval(), x, autotune=False)
    assert compressed.blocks[0].attn.num_heads == 4
    assert any("nn.MultiheadAttention" in line for line in compressed.compress_report.notes)
    _assert_close(compressed(x), model(x))


# ---- kernels ---------------------------------------------------------------------------------------


@needs_block_sparse
def test_block_pattern_becomes_block_sparse_layers(all_sparse) -> None:
    from sparsenets.layers.block_sparse import BlockSparseConv2d, BlockSparseLinear

    masked = _masked("convnet", "block:4x4")
    compressed = sn.compress(masked, torch.randn(2, 3, 6, 6), autotune=False)
    kinds = {type(m) for m in compressed.modules()}
    assert BlockSparseLinear in kinds and BlockSparseConv2d in kinds
    assert {c.kind for c in compressed.compress_report.layers} == {"block"}


def test_unstructured_linear_becomes_csr(all_sparse) -> None:
    masked = _masked("mlp", "unstructured")
    compressed = sn.compress(masked, torch.randn(2, 20), autotune=False)
    layers = [m for m in compressed.modules() if isinstance(m, CSRLinear)]
    assert len(layers) == 3 and all(abs(layer.density - 0.5) < 0.05 for layer in layers)


def test_density_rule() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    sn.sparsify_(model, {"sparsity": 0.97, "pattern": "unstructured", "exclude": ["2"]})
    compressed = sn.compress(model, autotune=False)
    assert isinstance(compressed[0], CSRLinear)  # 3% dense: below the CSR threshold
    assert [c.how for c in compressed.compress_report.layers] == ["rule"]


def test_autotune_picks_the_fastest_and_caches(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(choose, "TUNE_SECONDS", 0.01)
    monkeypatch.setattr(choose, "_TIMINGS", {})
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    sn.sparsify_(model, {"sparsity": 0.9, "pattern": "unstructured"})
    cache = tmp_path / "tune.json"
    x = torch.randn(16, 128)
    first = sn.compress(model, x, cache=str(cache)).compress_report
    for layer in first.layers:
        assert layer.how == "timed" or layer.how.startswith(choose.INCONCLUSIVE)  # (then the rule's choice)
        assert {"dense", "csr"} <= set(layer.times_ms)
        assert layer.times_ms[layer.kind] <= layer.times_ms["dense"] or layer.kind == "dense"  # (medians)
    assert cache.exists()
    monkeypatch.setattr(choose, "_TIMINGS", {})  # a new process: only the file remembers
    second = sn.compress(model, x, cache=str(cache)).compress_report
    assert [c.how for c in second.layers] == [c.how.replace("timed", "cached") for c in first.layers]
    assert [c.kind for c in second.layers] == [c.kind for c in first.layers]


def test_verbose_logs_a_row_per_layer(capsys, caplog) -> None:
    masked = _masked("mlp", "channel")
    with caplog.at_level(logging.INFO, logger="sparsenets.compression"):
        sn.compress(masked, torch.randn(2, 20), autotune=False, verbose=True)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sparsenets.compression"))
    assert "parameters: 1,589 ->" in logged
    assert all(f"\n{name} " in logged for name in ("0", "2", "4"))
    assert capsys.readouterr().out == ""  # a library logs; only the command line prints


# ---- safety nets ----------------------------------------------------------------------------------------


def test_a_broken_step_is_undone(monkeypatch) -> None:
    """If shrinking produced wrong outputs, the check on the example input catches it."""
    real = surgery.keep_inputs

    def off_by_one(module, keep, spread=1):  # cuts the wrong inputs
        real(module, (keep + 1) % surgery.n_inputs(module) if spread == 1 else keep, spread)

    monkeypatch.setattr(surgery, "keep_inputs", off_by_one)
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel"})
    with pytest.warns(UserWarning, match="undid shrinking"):
        compressed = sn.compress(model, torch.randn(4, 20), autotune=False)
    x = torch.randn(6, 20)
    _assert_close(compressed(x), model.eval()(x))
    assert compressed.compress_report.notes and not compressed.compress_report.removed


def test_a_broken_kernel_is_undone_alone(monkeypatch, all_sparse) -> None:
    real = choose.candidates

    def one_broken(module, pattern):
        builders = real(module, pattern)
        if getattr(module, "in_features", None) == 32:  # layer "2"
            make = builders["csr"]

            def broken():
                layer = make()
                layer.bias.data += 1.0
                return layer
            builders["csr"] = broken
        return builders

    monkeypatch.setattr(choose, "candidates", one_broken)
    model = mlp()
    sn.sparsify_(model, {"sparsity": 0.5})
    with pytest.warns(UserWarning, match="2: kept dense"):
        compressed = sn.compress(model, torch.randn(4, 20), autotune=False)
    assert [type(m).__name__ for m in compressed if not isinstance(m, nn.ReLU)] == ["CSRLinear", "Linear", "CSRLinear"]
    x = torch.randn(6, 20)
    _assert_close(compressed(x), model.eval()(x))


def test_layer_read_as_a_tensor_keeps_its_class(all_sparse) -> None:
    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(F.linear(x, self.fc.weight, self.fc.bias).relu())

    model = ReadsWeight()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "unstructured"})
    compressed = sn.compress(model, torch.randn(2, 8), autotune=False)
    assert type(compressed.fc) is nn.Linear and isinstance(compressed.head, CSRLinear)
    x = torch.randn(3, 8)
    _assert_close(compressed(x), model(x))


def test_compressed_model_deepcopies_pickles_and_state_dicts(all_sparse) -> None:
    compressed = sn.compress(_masked("mlp", "unstructured"), torch.randn(2, 20), autotune=False)
    x = torch.randn(3, 20)
    for clone in (copy.deepcopy(compressed), pickle.loads(pickle.dumps(compressed))):
        _assert_close(clone(x), compressed(x))
    masked = _masked("mlp", "unstructured")
    compressed = sn.compress(masked, torch.randn(2, 20), autotune=False)
    fresh = sn.compress(masked, torch.randn(2, 20), autotune=False)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()
    fresh.load_state_dict(compressed.state_dict())
    _assert_close(fresh(x), compressed(x))


def test_compression_records_survive_copies_and_reloads(tmp_path, all_sparse) -> None:
    """What compress did to each layer (kernel origin, pattern, resizing) travels with the model."""
    compressed = sn.compress(_masked("mlp", "channel"), torch.randn(2, 20), autotune=False)
    before = {name: get_record(m) for name, m in compressed.named_modules() if has_record(m)}
    assert any(r.resized for r in before.values()) and any(r.origin for r in before.values())
    assert [r.pattern for r in before.values()] == ["channel"] * 3
    path = tmp_path / "c.safetensors"
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m)), lambda m: sn.load(sn.save(m, path))):
        clone = copy_of(compressed)
        assert {name: get_record(m) for name, m in clone.named_modules() if has_record(m)} == before
    twice = sn.load(sn.save(sn.load(path), tmp_path / "again.safetensors"))  # resized layers load again
    x = torch.randn(3, 20)
    _assert_close(twice(x), compressed(x))


# ---- CSRLinear ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_csr_linear_matches_masked_linear_forward_and_backward(bias: bool) -> None:
    weight, mask = torch.randn(12, 10), torch.rand(12, 10) < 0.3
    b = torch.randn(12) if bias else None
    layer = CSRLinear.from_dense(weight, mask, b)
    assert layer.nnz == int(mask.sum())
    torch.testing.assert_close(layer.dense_weight(), weight * mask)
    x = torch.randn(2, 5, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = (weight * mask).requires_grad_()
    b_ref = b.clone().requires_grad_() if bias else None
    y, y_ref = layer(x), F.linear(x_ref, w_ref, b_ref)
    _assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    _assert_close(x.grad, x_ref.grad)
    _assert_close(layer.values.grad, w_ref.grad[mask])
    if bias:
        _assert_close(layer.bias.grad, b_ref.grad)


def test_csr_linear_state_dict_roundtrip() -> None:
    layer = CSRLinear.from_dense(torch.randn(6, 4) * (torch.rand(6, 4) < 0.5), bias=torch.randn(6))
    other = CSRLinear(4, 6, 1)  # another structure: loading adopts the checkpoint's
    other.load_state_dict(layer.state_dict())
    assert other.nnz == layer.nnz
    x = torch.randn(3, 4)
    _assert_close(other(x), layer(x))
    with pytest.raises(ValueError, match="expects 4"):
        layer(torch.randn(3, 5))


def test_plain_model_with_zeros_is_compressed_too() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    sn.sparsify_(model, {"sparsity": 0.97, "pattern": "unstructured", "exclude": ["2"]})
    sn.finalize_(model)  # masks baked in: only the zeros tell
    compressed = sn.compress(model, autotune=False)  # no example input: nothing is checked or timed
    assert isinstance(compressed[0], CSRLinear) and type(compressed[2]) is nn.Linear
    x = torch.randn(3, 64)
    _assert_close(compressed(x), model(x))


def test_command_line(tmp_path, capsys) -> None:
    from sparsenets.cli import main

    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel", "exclude": ["2"]})
    source, target = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    sn.save(model, source)
    assert main(["compress", str(source), str(target), "--no-autotune"]) == 0
    assert "0: removed 16 of 32 outputs" in capsys.readouterr().out
    loaded = sn.load(target)
    assert loaded[0].out_features == 16
    x = torch.randn(4, 20)
    _assert_close(loaded(x), model.eval()(x))
    assert main(["compress", str(tmp_path / "missing.safetensors"), str(target)]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def _corrupt(source, target) -> None:
    data = bytearray(source.read_bytes())
    data[-5] ^= 0xFF
    source.write_bytes(bytes(data))


def _directory(source, target) -> None:
    target.mkdir()


def _read_only_directory(source, target, monkeypatch) -> None:
    target.parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: fail the way the OS fails everyone else
        def refuse(*args, dir=None, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", dir)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _full_disk(source, target, monkeypatch) -> None:
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)


@pytest.mark.parametrize("problem, named, code", [
    (_corrupt, "in.safetensors", 2), ("missing", "in.safetensors", 1), (_directory, "out.safetensors", 2),
    (_read_only_directory, "out.safetensors", 1), (_full_disk, "out.safetensors", 1)])
def test_command_line_errors_are_one_line(tmp_path, capsys, monkeypatch, problem, named: str, code: int) -> None:
    from sparsenets.cli import main

    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel", "exclude": ["2"]})
    source = sn.save(model, tmp_path / "in.safetensors")
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "out.safetensors"
    if problem == "missing":
        source.unlink()
    elif problem in (_read_only_directory, _full_disk):
        problem(source, target, monkeypatch)
    else:
        problem(source, target)
    try:
        assert main(["compress", str(source), str(target), "--no-autotune"]) == code
    finally:
        target.parent.chmod(0o755)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not target.is_file() and [p.name for p in target.parent.iterdir()] == ([target.name] * target.is_dir())


def test_one_activation_module_used_twice_still_shrinks() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.act = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.ReLU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    model = Reuse()
    sn.sparsify_(model, {"sparsity": 0.5, "pattern": "channel", "exclude": ["fc3"]})
    compressed = sn.compress(model, torch.randn(2, 6), autotune=False)
    assert compressed.fc1.out_features == 4 and compressed.fc2.out_features == 4
    x = torch.randn(5, 6)
    _assert_close(compressed(x), model.eval()(x))


@pytest.mark.parametrize("style", ["functions", "methods"])
def test_one_layer_feeding_two_activations_shrinks(style: str) -> None:
    """Each branch folds its own constants: relu(bias) into one layer, sigmoid(bias) into the other.

    Regression: the constants of every branch once went through the activation of the last branch
    followed (a closure capturing the loop variable); compress saw the outputs differ and undid it.
    """
    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc(x)
            relu, sigmoid = (F.relu(h), torch.sigmoid(h)) if style == "functions" else (h.relu(), h.sigmoid())
            a, b = self.a(relu), self.b(sigmoid)
            return self.head(torch.cat([a + b, a * b], dim=-1))

    model = TwoBranches().eval()
    with torch.no_grad():
        model.fc.weight[:4] = 0  # 4 dead neurons: constants, and relu(c) != sigmoid(c) for each
        model.fc.bias[:4] = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    compressed = sn.compress(model, torch.randn(2, 6), autotune=False)
    assert not any("undid shrinking" in note for note in compressed.compress_report.notes)
    assert compressed.fc.out_features == 4
    assert compressed.a.in_features == compressed.b.in_features == 4
    x = torch.randn(5, 6)
    _assert_close(compressed(x), model(x))
