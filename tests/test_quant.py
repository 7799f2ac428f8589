"""Weight quantization: the grids (error within half a step, codes in range), GPTQ against a slow
textbook loop and against round-to-nearest on held-out inputs, joint pruning + quantization,
QuantizedLinear, and quantize_ on a tiny Llama."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenets.errors import ConfigError
from sparsenets.layerwise.sparsegpt import sparsegpt_prune_
from sparsenets.patterns import parse_pattern
from sparsenets.quant import (
    QuantConfig,
    QuantizedLinear,
    QuantSpec,
    dequantize,
    fake_quantize,
    fit_scales,
    gptq_quantize_,
    quantize_,
    quantize_codes,
    rtn_quantize,
)


def _problem(rows: int = 48, cols: int = 128, n: int = 1024, seed: int = 0):
    """A random layer and low-rank-plus-noise inputs: calibration and held-out from one distribution."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(12, cols, generator=gen)

    def inputs() -> torch.Tensor:
        return torch.randn(n, 12, generator=gen) @ mixing + 0.3 * torch.randn(n, cols, generator=gen)

    calib, held_out = inputs(), inputs()
    return torch.randn(rows, cols, generator=gen), calib.T @ calib, held_out


def _error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (weight - quantized).T).norm() / (x @ weight.T).norm())


SPECS = [QuantSpec(b, s, g) for b in range(2, 9) for s in (True, False) for g in (None, 16, 24)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_within_half_a_step(spec):
    w = torch.randn(20, 50) * torch.rand(20, 1) * 3
    w[3] = 0  # an all-zero row: every group of it all zero
    scale, zero = fit_scales(w, spec)
    assert scale.shape == zero.shape == (20, spec.n_groups(50)) and zero.dtype == torch.int8
    codes = quantize_codes(w, scale, zero, spec)
    lo, hi = spec.code_range
    assert codes.dtype == torch.int8 and int(codes.min()) >= lo and int(codes.max()) <= hi
    dq = dequantize(codes, scale, zero, spec)
    assert torch.isfinite(dq).all() and torch.isfinite(scale).all()
    assert (w - dq).abs().le(spec.columns(scale, 50) / 2 * (1 + 1e-5)).all()
    assert dq[3].eq(0).all()
    if spec.symmetric:
        assert zero.eq(0).all() and (lo, hi) == (-(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1)
    assert torch.equal(fake_quantize(w, spec), dq)


def test_spec_validation():
    for bad in ({"bits": 1}, {"bits": 9}, {"bits": True}, {"group_size": 0}, {"symmetric": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            QuantSpec(**bad)


def _textbook_gptq(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper writes it: one input at a time, every later input updated at once, group
    scales fitted from the current weights when the group begins."""
    w = w.double().clone()
    cols = w.shape[1]
    h = gram.double() + damp * gram.diagonal().mean().double() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    channel = QuantSpec(spec.bits, spec.symmetric)
    g = spec.group_size or cols
    for j in range(cols):
        if j % g == 0:
            scale, zero = fit_scales(w[:, j:j + g] if spec.group_size else w, channel)
        q = dequantize(quantize_codes(w[:, j:j + 1], scale, zero, channel), scale, zero, channel)[:, 0].double()
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
        w[:, j] = q
    return w


@pytest.mark.parametrize("group, blocksize", [(None, 128), (32, 64), (24, 40), (8, 128), (64, 16)])
def test_gptq_matches_textbook_loop(group, blocksize):
    weight, gram, _ = _problem(rows=16, cols=96, n=512)
    spec = QuantSpec(3, group is None, group)
    w = weight.double().clone()
    gptq_quantize_(w, gram.double(), spec, blocksize=blocksize)
    torch.testing.assert_close(w, _textbook_gptq(weight, gram, spec), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group", [None, 32])
def test_gptq_beats_rtn_on_held_out_inputs(bits, group):
    weight, gram, held_out = _problem()
    spec = QuantSpec(bits, True, group)
    w = weight.clone()
    quantized = gptq_quantize_(w, gram, spec)
    torch.testing.assert_close(quantized.dequantize(), w)
    assert quantized.mask is None and quantized.codes.dtype == torch.int8
    rtn = _error(weight, rtn_quantize(weight, spec).dequantize(), held_out)
    gptq = _error(weight, w, held_out)
    assert gptq < 0.6 * rtn, (gptq, rtn)
    ordered = weight.clone()
    gptq_quantize_(ordered, gram, spec, act_order=True)
    assert _error(weight, ordered, held_out) < rtn


def test_gptq_with_identity_gram_is_rtn():
    weight, _, _ = _problem()
    for spec in (QuantSpec(4), QuantSpec(3, False, 32)):
        w = weight.clone()
        gptq_quantize_(w, torch.eye(weight.shape[1]), spec)
        torch.testing.assert_close(w, fake_quantize(weight, spec), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_joint_pruning_and_quantization(pattern, symmetric):
    weight, gram, held_out = _problem()
    spec = QuantSpec(4, symmetric, 32)
    w = weight.clone()
    quantized = gptq_quantize_(w, gram, spec, sparsity=0.5, pattern=pattern)
    mask = quantized.mask
    assert mask is not None and int((~mask).sum()) == weight.numel() // 2
    assert parse_pattern(pattern).conforms(mask)
    assert w[~mask].eq(0).all()
    on_grid = dequantize(quantize_codes(w, quantized.scale, quantized.zero, spec), quantized.scale,
                         quantized.zero, spec)
    torch.testing.assert_close(on_grid, w, atol=1e-6, rtol=0)  # kept values sit on the grid
    pruned = weight.clone()
    kept = sparsegpt_prune_(pruned, gram, parse_pattern(pattern), 0.5)
    then_rtn = rtn_quantize(pruned, spec, mask=kept).dequantize()
    assert _error(weight, w, held_out) < _error(weight, then_rtn, held_out)


def test_pruning_path_unchanged_without_quantizer():
    """Passing no quantizer is the SparseGPT sweep (the full suite checks it against OBS)."""
    weight, gram, _ = _problem()
    a, b = weight.clone(), weight.clone()
    mask_a = sparsegpt_prune_(a, gram, parse_pattern("2:4"), 0.5)
    mask_b = sparsegpt_prune_(b, gram, parse_pattern("2:4"), 0.5, quantizer=None)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)


def _layer(bias: bool = True, masked: bool = False) -> QuantizedLinear:
    linear = nn.Linear(40, 12, bias=bias)
    keep = torch.rand(12, 40) > 0.3 if masked else None
    return QuantizedLinear.from_linear(linear, rtn_quantize(linear.weight, QuantSpec(4, False, 16), mask=keep))


@pytest.mark.parametrize("masked", [False, True])
def test_quantized_linear(masked):
    layer = _layer(masked=masked)
    x = torch.randn(3, 5, 40)
    weight = dequantize(layer.codes, layer.scale, layer.zero, layer.spec)
    assert torch.equal(layer(x), F.linear(x, weight, layer.bias))
    assert layer.format_name() == "int4:g16:asym"
    kept = layer.num_parameters()
    assert kept == (int(layer.mask.sum()) if masked else 480)
    assert layer.storage_bytes() == math.ceil(4 * kept / 8) + 12 * 3 * 4 + 12 * 3
    rebuilt = QuantizedLinear(**layer.init_args())
    rebuilt.load_state_dict(layer.state_dict())
    for other in (rebuilt, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), layer(x))
    assert set(layer.state_dict()) == {"codes", "scale", "zero", "bias"} | ({"mask"} if masked else set())
    assert QuantizedLinear(8, 4, bits=8, bias=False).format_name() == "int8:channel"


def test_quantized_linear_from_conv1d():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 40)  # weight stored in × out
    layer = QuantizedLinear.from_linear(conv, rtn_quantize(conv.weight.t(), QuantSpec(8)))
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), conv(x), atol=0.05, rtol=0.05)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_tiny_llama(method):
    model = _tiny_llama()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen)} for _ in range(4)]
    probe = torch.randint(0, 64, (2, 16), generator=gen)
    with torch.no_grad():
        before = model(input_ids=probe).logits
        reference = copy.deepcopy(model)
        quantize_(model, QuantConfig(bits=8, group_size=None, method=method), data=data)
        after = model(input_ids=probe).logits
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 and type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert float((after - before).abs().max()) < 0.02 * float(before.abs().max())
    model.load_state_dict(copy.deepcopy(model.state_dict()))


def test_quantize_joint_and_errors():
    model = _tiny_llama()
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(4)]
    untouched = copy.deepcopy(model.state_dict())
    for bad, match in [({"method": "awq"}, "method"), ({"bits": 12}, "bits"), ({"bitz": 4}, "bitz"),
                       ({"sparsity": 0.5}, "gptq"), ({"include": ["nothing*"]}, "nothing")]:
        with pytest.raises(ConfigError, match=match):
            quantize_(model, bad)
    with pytest.raises(ConfigError, match="data"):
        quantize_(model, {"method": "gptq"})
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    quantize_(model, {"method": "gptq", "bits": 4, "group_size": 16, "pattern": "2:4"}, data=data)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.mask is not None
    assert parse_pattern("2:4").conforms(layer.mask) and layer.dense_weight()[~layer.mask].eq(0).all()


def test_failed_gptq_puts_the_weights_back(monkeypatch):
    import sparsenets.quant.quantize as q

    model = _tiny_llama()
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]
    untouched = copy.deepcopy(model.state_dict())
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the second block, after the first one is quantized
            raise RuntimeError("boom")
        return gptq_quantize_(*args, **kwargs)

    monkeypatch.setattr(q, "gptq_quantize_", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_(model, {"method": "gptq"}, data=data)
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())


def test_quantize_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    data = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(4)]
    probe = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(input_ids=probe).logits
        quantize_(model, {"method": "gptq", "bits": 8, "group_size": 16}, data=data)
        after = model(input_ids=probe).logits
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear) and layer.codes.shape == (96, 32) and layer.bias is not None
    assert float((after - before).abs().max()) < 0.02 * float(before.abs().max())


def test_quantized_models_report_their_format_and_save_their_integer_codes(tmp_path):
    import sparsenets as sn
    from sparsenets.io.checkpoint import read_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    dense_file = sn.save(model, tmp_path / "dense.safetensors")
    sn.quantize_(model, {"bits": 4, "group_size": 32, "method": "rtn", "exclude": ["2"]})
    rows = {r.name: r for r in sn.report(model).rows}
    assert rows["0"].pattern == "int4:g32" and rows["2"].pattern == "dense"
    path = sn.save(model, tmp_path / "q.safetensors")
    header, stored = read_checkpoint(path)
    assert header["structured"]["0"]["kind"] == "QuantizedLinear" and header["tensors"]["0.codes"]["dtype"] == "int8"
    assert stored["0.codes::packed"].numel() == 64 * 64 * 4 // 8  # 4-bit codes, bit-packed
    assert path.stat().st_size < dense_file.stat().st_size * 0.6  # packed codes, not float weights
    loaded = sn.load(path)  # no model needed: the file describes it
    assert isinstance(loaded[0], QuantizedLinear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), model(x))
