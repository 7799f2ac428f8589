"""Channels through today's blocks: gated MLPs, HF feed-forward layouts, depthwise and residual convs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenets as sn
from sparsenets.compression import surgery as S
from sparsenets.compression.graph import channel_groups

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))


def _mistral() -> nn.Module:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**TINY))


def _qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))


def _opt() -> nn.Module:
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=32))


def _t5(gated: bool) -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu" if gated else "relu"))


def _vit() -> nn.Module:
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
        patch_size=8, num_channels=3), add_pooling_layer=False)


def _tokens() -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}


def _t5_input() -> dict:
    return {**_tokens(), "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))}


# name -> (model, example, MLP layers to mask (glob), hidden layers: (rows cut..., columns cut))
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], str, tuple[str, ...], str]] = {
    "llama": (_llama, _tokens, "*mlp.*", ("gate_proj", "up_proj"), "down_proj"),
    "mistral": (_mistral, _tokens, "*mlp.*", ("gate_proj", "up_proj"), "down_proj"),
    "qwen2": (_qwen2, _tokens, "*mlp.*", ("gate_proj", "up_proj"), "down_proj"),
    "opt": (_opt, _tokens, "*fc[12]", ("fc1",), "fc2"),
    "t5": (lambda: _t5(False), _t5_input, "*DenseReluDense.*", ("wi",), "wo"),
    "t5-gated": (lambda: _t5(True), _t5_input, "*DenseReluDense.*", ("wi_0", "wi_1"), "wo"),
    "vit": (_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))},
            "*mlp.fc[12]", ("fc1",), "fc2"),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _outputs(model: nn.Module, example: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**example)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hidden_blocks(model: nn.Module, rows: tuple[str, ...], columns: str) -> list[tuple[str, nn.Module]]:
    """The feed-forward blocks: modules holding the row layers and the column layer."""
    found = []
    for name, module in model.named_modules():
        try:
            module.get_submodule(columns)
            if all(isinstance(module.get_submodule(r), nn.Linear) for r in rows):
                found.append((name, module))
        except AttributeError:
            continue
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_channel_masked_feedforward_blocks_shrink_exactly(family: str) -> None:
    build, example, include, rows, columns = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    sn.sparsify_(model, {"pattern": "channel", "sparsity": 0.3, "include": [include]})
    dense = sn.compress(model, example(), autotune=False, shrink=False)
    blocks = _hidden_blocks(dense, rows, columns)
    assert blocks
    # a hidden channel is zero when any of its row layers' rows is (gate: act(0) = 0, no bias)
    expected = 0
    for _, block in blocks:
        zero = torch.zeros(block.get_submodule(rows[0]).out_features, dtype=torch.bool)
        for r in rows:
            zero |= S.dead_outputs(block.get_submodule(r))
        inputs = block.get_submodule(columns).in_features
        expected += int(zero.sum()) * (len(rows) * S.n_inputs(block.get_submodule(rows[0]))
                                       + block.get_submodule(columns).out_features
                                       + sum(block.get_submodule(r).bias is not None for r in rows))
        assert int(zero.sum()) < inputs
    compressed = sn.compress(model, example(), autotune=False)
    report = compressed.compress_report
    assert not any("undid" in n for n in report.notes)
    assert _n_params(compressed) == _n_params(dense) - expected
    assert expected > 0
    torch.testing.assert_close(_outputs(compressed, example()), _outputs(model.eval(), example()),
                               rtol=0, atol=1e-5)


# ---- convolutions: depthwise and residual streams ---------------------------------------------------


class Block(nn.Module):
    """A ResNet basic block; with ``stride`` 2 or a new width, a conv + BatchNorm shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1×1, depthwise 3×3, project 1×1, plus the input."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, width, 1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.bn2(self.depthwise(F.relu6(self.bn1(self.expand(x))))))
        return x + self.bn3(self.project(h))


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(InvertedResidual(8, 24), InvertedResidual(8, 24))
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.bn(self.stem(x))).flatten(1))


def _trained_batchnorm(model: nn.Module) -> nn.Module:
    """Statistics as after training: a zero conv row then comes out of BatchNorm as a nonzero constant."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _assert_same_outputs(compressed: nn.Module, model: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), rtol=0, atol=1e-5)


def test_residual_streams_are_found_with_all_their_writers_and_readers() -> None:
    model = _trained_batchnorm(TinyResNet())
    groups = {g.width: g for g in channel_groups(model, torch.randn(2, 3, 8, 8))}
    first, second = groups[8], groups[16]
    assert first.writers == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert sorted(first.readers) == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    assert second.writers == ["layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"]  # in graph order
    assert sorted(second.readers) == ["fc", "layer2.1.conv1"]
    assert "layer2.0.downsample.1" in second.through and "layer2.0.bn2" in second.through


def test_coupled_residual_channels_zeroed_together_are_removed() -> None:
    model = _trained_batchnorm(TinyResNet())
    example = torch.randn(2, 3, 8, 8)
    groups = {g.width: g for g in channel_groups(model, example)}
    groups[8].zero_(model, [1, 5])
    groups[16].zero_(model, [0, 3, 7, 12])
    before = sum(p.numel() for p in model.parameters())
    compressed = sn.compress(model, example, autotune=False)
    assert compressed.layer1[0].conv1.in_channels == 6 and compressed.conv1.out_channels == 6
    assert compressed.layer2[0].downsample[0].in_channels == 6
    assert compressed.layer2[1].conv2.out_channels == 12 and compressed.fc.in_features == 12
    # per stream channel: its writers' rows, 3 BatchNorms (scale, shift), the readers' columns;
    # the 16-wide stream's shortcut row is 6 wide once the first stream has lost 2
    lost = 2 * (3 * 9 + 2 * 8 * 9 + 3 * 2 + 2 * 8 * 9 + 16 * 9 + 16) + 4 * (6 + 2 * 16 * 9 + 3 * 2 + 16 * 9 + 5)
    assert sum(p.numel() for p in compressed.parameters()) == before - lost
    _assert_same_outputs(compressed, model, (3, 3, 8, 8))


def test_a_residual_channel_one_writer_still_uses_is_kept_and_noted() -> None:
    model = _trained_batchnorm(TinyResNet())
    with torch.no_grad():
        model.layer2[0].conv2.weight[[2, 9]] = 0  # the shortcut still writes channels 2 and 9
    compressed = sn.compress(model, torch.randn(2, 3, 8, 8), autotune=False)
    assert compressed.layer2[0].conv2.out_channels == 16
    assert ("layer2.0.conv2: 2 zero channels kept: coupled by the residual stream to layer2.0.downsample.0, "
            "which still writes them") in compressed.compress_report.notes
    _assert_same_outputs(compressed, model, (3, 3, 8, 8))


def test_depthwise_channels_go_with_the_expansion_feeding_them() -> None:
    model = _trained_batchnorm(TinyMobileNet())
    with torch.no_grad():  # expansion rows and depthwise filters zeroed: the project conv folds BN's constant
        for block in model.blocks:
            block.expand.weight[[0, 4, 9]] = 0
            block.depthwise.weight[[0, 4, 9]] = 0
    before = sum(p.numel() for p in model.parameters())
    compressed = sn.compress(model, torch.randn(2, 3, 4, 4), autotune=False)
    for block in compressed.blocks:
        assert block.expand.out_channels == block.depthwise.groups == block.project.in_channels == 21
        assert block.bn1.num_features == block.bn2.num_features == 21
    # per channel and block: expansion row (8), 2 BatchNorms (2 + 2), depthwise filter (9), project column (8);
    # folding a constant gives project a bias (8 per block)
    assert sum(p.numel() for p in compressed.parameters()) == before - 2 * 3 * (8 + 4 + 9 + 8) + 2 * 8
    _assert_same_outputs(compressed, model, (3, 3, 4, 4))


def test_inverted_residual_stream_channels_go_together() -> None:
    model = _trained_batchnorm(TinyMobileNet())
    example = torch.randn(2, 3, 4, 4)
    (stream,) = channel_groups(model, example)
    assert stream.writers == ["stem", "blocks.0.project", "blocks.1.project"]
    stream.zero_(model, [2, 6])
    compressed = sn.compress(model, example, autotune=False)
    assert compressed.stem.out_channels == 6 and compressed.head.in_features == 6 * 16
    assert all(b.expand.in_channels == 6 and b.bn3.num_features == 6 for b in compressed.blocks)
    _assert_same_outputs(compressed, model, (3, 3, 4, 4))


# ---- what stays, and why --------------------------------------------------------------------------


def test_a_zero_gate_row_with_a_bias_is_kept_and_noted() -> None:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, mlp_bias=True)).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[[1, 2, 3]] = 0  # SiLU(bias) · up: not constant, must stay
        mlp.gate_proj.bias.fill_(0.5)
        mlp.up_proj.weight[[7, 8]] = 0
        mlp.up_proj.bias[[7, 8]] = 0  # SiLU(gate) · 0 = 0: these go
    compressed = sn.compress(model, _tokens(), autotune=False)
    assert compressed.model.layers[0].mlp.up_proj.out_features == 46
    assert compressed.model.layers[0].mlp.gate_proj.out_features == 46
    assert ("model.layers.0.mlp.up_proj: 3 zero channels kept: the gate row is zero but act(gate bias) is not 0 "
            "and the up row is not zero, so act(gate)·up is not constant") in compressed.compress_report.notes
    torch.testing.assert_close(_outputs(compressed, _tokens()), _outputs(model, _tokens()), rtol=0, atol=1e-5)


def test_zero_rows_of_the_residual_stream_in_a_decoder_are_noted() -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:4] = 0
    compressed = sn.compress(model, _tokens(), autotune=False)
    assert compressed.model.layers[1].mlp.down_proj.out_features == 32
    assert any(n.startswith("model.layers.1.mlp.down_proj: 4 zero outputs kept: ")
               for n in compressed.compress_report.notes)


class CastsToWeightDtype(nn.Module):
    """T5's feed-forward: the hidden state is cast to ``wo.weight.dtype`` before ``wo``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.act, self.outer = nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inner(x))
        if isinstance(self.outer.weight, torch.Tensor) and h.dtype != self.outer.weight.dtype:
            h = h.to(self.outer.weight.dtype)
        return self.outer(h)


def test_a_weight_read_only_for_its_dtype_does_not_stop_the_trace() -> None:
    model = CastsToWeightDtype()
    with torch.no_grad():
        model.inner.weight[[0, 5]] = 0
        model.inner.bias[[0, 5]] = -1.0  # ReLU(-1) = 0
    compressed = sn.compress(model, torch.randn(2, 6), autotune=False)
    assert compressed.inner.out_features == compressed.outer.in_features == 8
    x = torch.randn(4, 6)
    torch.testing.assert_close(compressed(x), model(x), rtol=0, atol=1e-6)


def test_a_compressed_llama_saves_and_loads_into_a_fresh_dense_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    sn.sparsify_(model, {"pattern": "channel", "sparsity": 0.3, "include": ["*mlp.*"]})
    compressed = sn.compress(model, _tokens(), autotune=False)
    assert compressed.model.layers[0].mlp.up_proj.out_features < 48
    sn.save(compressed, tmp_path / "llama.safetensors")
    loaded = sn.load(tmp_path / "llama.safetensors", model=_llama().eval())
    assert loaded.model.layers[0].mlp.down_proj.in_features == compressed.model.layers[0].mlp.down_proj.in_features
    assert _n_params(loaded) == _n_params(compressed)
    torch.testing.assert_close(_outputs(loaded, _tokens()), _outputs(model, _tokens()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("build, shape", [(TinyResNet, (2, 3, 8, 8)), (TinyMobileNet, (2, 3, 4, 4))])
def test_channel_masks_on_residual_networks_stay_exact_and_say_what_stayed(build, shape) -> None:
    model = _trained_batchnorm(build())
    sn.sparsify_(model, {"pattern": "channel", "sparsity": 0.3})
    compressed = sn.compress(model, torch.randn(*shape), autotune=False)
    report = compressed.compress_report
    assert report.removed and not any("undid" in n for n in report.notes)
    assert any("coupled by the residual stream to" in n for n in report.notes)  # writers zeroed separately
    _assert_same_outputs(compressed, model, shape)
