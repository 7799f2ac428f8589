"""``sparsenets quantize`` and the layers it writes: a Hugging Face directory in, integer codes out;
8-bit layers on the int8 kernels; float copies for tools that read only ``from_pretrained``."""

import copy
import json

import pytest
import torch
from torch import nn

from sparsenets.cli import main
from sparsenets.errors import ConfigError
from sparsenets.kernels.int8 import int8_linear, quantize_weight_int8
from sparsenets.quant import QuantConfig, quantize_
from sparsenets.quant.layers import QuantizedLinear

transformers = pytest.importorskip("transformers")
from sparsenets.integrations.huggingface import QUANTIZED_FILE, load_quantized  # noqa: E402

FAST = ["--calibration", "4", "--seq-len", "32", "--eval-windows", "2"]


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def test_quantize_writes_codes_that_load_quantized_rebuilds(lm_checkpoint, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", str(lm_checkpoint), "--bits", "4", "--group-size", "16", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "perplexity before" in printed and "perplexity after" in printed and "MiB stored" in printed
    model = load_quantized(out)
    layers = quantized_layers(model)
    assert len(layers) == 3 * 7 and "lm_head" not in layers  # q k v o gate up down per block
    for layer in layers.values():
        assert layer.format_name() == "int4:g16" and int(layer.codes.abs().max()) <= 7
    config = json.loads((out / "config.json").read_text())
    assert config["sparsenets"]["quantization"]["bits"] == 4 and config["sparsenets"]["weights"] == QUANTIZED_FILE
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"][:2] == [100, 101]


def test_the_loaded_model_gives_the_quantized_models_outputs(lm_checkpoint, tmp_path):
    from sparsenets.integrations.huggingface import save_quantized

    model = transformers.AutoModelForCausalLM.from_pretrained(lm_checkpoint).eval()
    config = QuantConfig(bits=3, group_size=None, method="rtn")
    quantize_(model, config)
    save_quantized(model, tmp_path / "q", config)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits)


def test_dequantize_writes_the_rounded_values_as_plain_weights(lm_checkpoint, tmp_path):
    out = tmp_path / "float"
    assert main(["quantize", str(lm_checkpoint), "--method", "rtn", "--bits", "2", "--group-size", "channel",
                 "--dequantize", "--no-eval", "--out", str(out), *FAST]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.down_proj.weight
    for row in weight:  # 2 bits, symmetric: every row holds at most the values {-s, 0, s}
        assert len(torch.unique(row)) <= 3
    original = transformers.AutoModelForCausalLM.from_pretrained(lm_checkpoint)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # excluded by default


@pytest.mark.parametrize("argv, message", [
    (["--bits", "9"], "bits must be"),
    (["--group-size", "many"], "--group-size"),
    (["--method", "awq"], "unknown method"),
    (["--activations", "int8"], "one scale per output channel"),
    (["--outlier-threshold", "6"], "activations='int8'"),
    (["--calibration", "0"], "--calibration"),
])
def test_bad_options_fail_before_anything_is_written(lm_checkpoint, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main(["quantize", str(lm_checkpoint), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_quantize_needs_a_checkpoint_directory(tmp_path, capsys):
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err


# ---- 8-bit layers on the int8 kernels -----------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def test_int8_activations_run_the_int8_product_of_the_codes():
    model = quantize_(mlp(), QuantConfig(bits=8, group_size=None, activations="int8"))
    layer = model[0]
    x = torch.randn(5, 48)
    expected = int8_linear(x, layer.codes, layer.scale[:, 0], layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer.format_name() == "int8:channel:a8"
    weight_only = quantize_(mlp(), QuantConfig(bits=8, group_size=None))[0]
    assert not torch.equal(weight_only(x), layer(x))  # the activations really are rounded


def test_int8_activations_with_rtn_codes_are_the_int8_layers_weights():
    linear = mlp()[0]
    q_weight, _ = quantize_weight_int8(linear.weight.detach())
    model = quantize_(nn.Sequential(copy.deepcopy(linear)), QuantConfig(bits=8, group_size=None, method="rtn",
                                                                         activations="int8"))
    assert torch.equal(model[0].codes, q_weight)


def test_pruned_codes_are_zero_so_the_int8_product_skips_them():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    layer = quantize_(model, QuantConfig(bits=4, group_size=None, activations="int8"))[0]
    assert layer.mask is not None and not layer.codes[~layer.mask].any()
    data = [torch.randn(16, 48) for _ in range(4)]  # pruned in the GPTQ sweep itself
    joint = quantize_(mlp(), QuantConfig(bits=4, group_size=None, method="gptq", pattern="2:4",
                                         activations="int8"), data=data)[0]
    assert joint.mask is not None and not joint.codes[~joint.mask].any()


def test_outlier_columns_stay_in_floating_point():
    model = mlp()
    x = torch.randn(8, 48)
    x[:, 3] *= 80  # one outlier feature: per-token rounding of the other features suffers
    reference = model[0](x)
    plain = quantize_(copy.deepcopy(model), QuantConfig(bits=8, group_size=None, activations="int8"))[0]
    split = quantize_(copy.deepcopy(model), QuantConfig(bits=8, group_size=None, activations="int8",
                                                         outlier_threshold=6.0))[0]
    assert (split(x) - reference).abs().mean() < 0.3 * (plain(x) - reference).abs().mean()


def test_int8_activations_are_inference_only():
    layer = quantize_(mlp().train(), QuantConfig(bits=8, group_size=None, activations="int8"))[0]
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(2, 48, requires_grad=True))


@pytest.mark.parametrize("options, message", [
    ({"activations": "int4"}, "activations must be"),
    ({"activations": "int8", "group_size": 32}, "one scale per output channel"),
    ({"activations": "int8", "group_size": None, "symmetric": False}, "symmetric"),
    ({"activations": "int8", "group_size": None, "outlier_threshold": -1.0}, "positive"),
    ({"outlier_threshold": 6.0}, "activations='int8'"),
])
def test_bad_activation_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**options)


def test_int8_layers_save_and_load_with_their_options(tmp_path):
    import sparsenets as sn

    model = quantize_(mlp(), QuantConfig(bits=8, group_size=None, activations="int8", outlier_threshold=4.0))
    sn.save(model, tmp_path / "m.safetensors")
    loaded = sn.load(tmp_path / "m.safetensors", mlp(1))
    assert loaded[0].activations == "int8" and loaded[0].outlier_threshold == 4.0
    x = torch.randn(3, 48)
    assert torch.equal(loaded(x), model(x))


def test_to_float_rebuilds_the_original_layer_class_with_the_rounded_values():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)  # GPT-2's layer: weight stored in x out
    model = quantize_(nn.Sequential(conv), QuantConfig(bits=3, group_size=8))
    restored = model[0].to_float()
    assert type(restored) is Conv1D and restored.weight.shape == conv.weight.shape
    x = torch.randn(4, 40)
    torch.testing.assert_close(restored(x), model[0](x))


def test_on_layer_reports_every_quantized_layer_once(lm_checkpoint):
    from sparsenets.text import calibration_batches

    model = transformers.AutoModelForCausalLM.from_pretrained(lm_checkpoint)
    seen: list[str] = []
    data = calibration_batches(torch.randint(0, 256, (400,)), 2, 32)
    quantize_(model, QuantConfig(bits=4, group_size=16, method="gptq"), data=data, on_layer=seen.append)
    assert sorted(seen) == sorted(quantized_layers(model)) and len(seen) == len(set(seen)) == 3 * 7
