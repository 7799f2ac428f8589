"""LLM.int8()-style outlier decomposition of the int8 product: the columns of the input with an
entry above the threshold in magnitude are multiplied in float with the dequantized weight, the
rest in int8 with those columns zeroed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from sparsenets.errors import ConfigError
from sparsenets.kernels import int8 as K
from sparsenets.kernels.cpu import int8 as C
from sparsenets.layers.int8 import Int8Linear

OUTLIERS = [5, 100]


def planted(shape=(64, 256), seed=0, scale=60.0):
    """``x ~ N(0, 1)`` with the columns ``OUTLIERS`` scaled up, a weight and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., OUTLIERS] *= scale
    w = torch.randn(48, shape[-1], generator=g) * 0.1
    q_w, s_w = K.quantize_weight_int8(w)
    return x, q_w, s_w, torch.randn(48, generator=g)


def decomposed_reference(x, q_w, s_w, bias, cols):
    """Float64: ``x[:, cols] · W_deq[:, cols]ᵀ`` plus the int8 product of ``x`` with ``cols`` zeroed."""
    x2 = x.reshape(-1, x.shape[-1])
    w_deq = q_w.double() * s_w.double().unsqueeze(1)
    zeroed = x2.clone()
    zeroed[:, cols] = 0
    q, sx = K.quantize_rows(zeroed)
    y = (q.long() @ q_w.long().t()).double() * sx.double().unsqueeze(1) * s_w.double().unsqueeze(0)
    y = y + bias.double() + x2[:, cols].double() @ w_deq[:, cols].t()
    return y.reshape(*x.shape[:-1], q_w.shape[0])


def assert_close(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    tol = 1e-5 * (ref.abs().amax(-1, keepdim=True) + 1)
    assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max()


def without_int_mm(monkeypatch):
    monkeypatch.delattr(torch, "_int_mm")


def without_c(monkeypatch):
    monkeypatch.setattr(C, "available", lambda: False)


VARIANTS = {"auto": ("auto", None), "torch": ("torch", None), "no-int-mm": ("auto", without_int_mm),
            "no-c": ("auto", without_c)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_decomposition_matches_reference_and_beats_plain_int8(variant, monkeypatch):
    path, patch = VARIANTS[variant]
    if patch is not None:
        patch(monkeypatch)
    x, q_w, s_w, b = planted()
    assert K.outlier_columns(x, 6.0).tolist() == OUTLIERS
    y = K.int8_linear(x, q_w, s_w, b, path=path, outlier_threshold=6.0)
    assert_close(y, decomposed_reference(x, q_w, s_w, b, OUTLIERS))
    ref = x.double() @ (q_w.double() * s_w.double().unsqueeze(1)).t() + b.double()
    plain = K.int8_linear(x, q_w, s_w, b, path=path)
    err, plain_err = (y - ref).abs().mean(), (plain - ref).abs().mean()
    assert err < plain_err / 5, (err, plain_err)


@pytest.mark.parametrize("path", ["auto", "torch"])
def test_threshold_above_every_value_changes_nothing(path, monkeypatch):
    x, q_w, s_w, b = planted()
    plain = K.int8_linear(x, q_w, s_w, b, path=path)
    seen = []
    product = K._int8_product

    def spy(x2, *args):
        seen.append(x2.data_ptr())
        return product(x2, *args)

    monkeypatch.setattr(K, "_int8_product", spy)
    high = float(x.abs().max()) * 1.01
    assert K.outlier_columns(x, high).numel() == 0
    assert torch.equal(K.int8_linear(x, q_w, s_w, b, path=path, outlier_threshold=high), plain)
    assert seen == [x.data_ptr()]  # the input itself: no copy
    assert not torch.equal(K.int8_linear(x, q_w, s_w, b, path=path, outlier_threshold=6), plain)


def test_leading_batch_dims_and_empty():
    x, q_w, s_w, b = planted((2, 3, 40, 256))
    x[1, :, :, 7] = -50 * x[1, :, :, 7].abs()  # a negative outlier column, in one batch entry only
    cols = [5, 7, 100]
    assert K.outlier_columns(x, 6.0).tolist() == cols
    y = K.int8_linear(x, q_w, s_w, b, outlier_threshold=6.0)
    assert y.shape == (2, 3, 40, 48)
    assert_close(y, decomposed_reference(x, q_w, s_w, b, cols))
    flat = K.int8_linear(x.reshape(-1, 256), q_w, s_w, b, outlier_threshold=6.0)
    assert torch.equal(y.reshape(-1, 48), flat)
    assert K.int8_linear(torch.randn(0, 256), q_w, s_w, outlier_threshold=6.0).shape == (0, 48)
    assert K.outlier_columns(torch.randn(2, 0, 256), 1.0).numel() == 0


def test_non_finite_rows_stay_in_their_rows():
    x, q_w, s_w, b = planted((8, 256))
    x[2, OUTLIERS[0]] = float("inf")  # in an outlier column: the float part
    x[4, 9] = float("nan")  # in an ordinary column: the int8 part, as without a threshold
    y = K.int8_linear(x, q_w, s_w, b, outlier_threshold=6.0)
    plain = K.int8_linear(x, q_w, s_w, b)
    assert not y[2].isfinite().any() and not plain[2].isfinite().any()
    assert y[4].isnan().all() and plain[4].isnan().all()
    keep = [0, 1, 3, 5, 6, 7]
    assert_close(y[keep], decomposed_reference(x[keep], q_w, s_w, b, OUTLIERS))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "6"])
def test_invalid_thresholds(bad):
    x, q_w, s_w, _ = planted((4, 256))
    match = f"outlier_threshold must be a positive finite number, got {bad!r}"
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        K.int8_linear(x, q_w, s_w, outlier_threshold=bad)
    with pytest.raises(ConfigError, match="outlier_threshold"):
        K.outlier_columns(x, bad)
    with pytest.raises(ConfigError, match="outlier_threshold"):
        Int8Linear(256, 48, outlier_threshold=bad)
    with pytest.raises(ConfigError, match="outlier_threshold"):
        Int8Linear.from_float(nn.Linear(256, 48), outlier_threshold=bad)


def test_layer_threshold_is_kept():
    x, _, _, _ = planted((2, 16, 256))
    lin = nn.Linear(256, 48)
    layer = Int8Linear.from_float(lin, outlier_threshold=6.0).eval()
    assert layer.outlier_threshold == 6.0 and "outlier_threshold=6.0" in repr(layer)
    assert "outlier_threshold" not in repr(Int8Linear.from_float(lin))
    y = layer(x)
    assert torch.equal(y, K.int8_linear(x, layer.q_weight, layer.w_scale, layer.bias, outlier_threshold=6.0))
    assert not torch.equal(y, Int8Linear.from_float(lin)(x))
    assert set(layer.state_dict()) == {"q_weight", "w_scale", "bias"}
    fresh = Int8Linear(256, 48, outlier_threshold=6.0)
    fresh.load_state_dict(layer.state_dict())
    again = Int8Linear.from_quantized(layer.q_weight, layer.w_scale, lin.bias, outlier_threshold=6.0)
    for other in (fresh, again, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.outlier_threshold == 6.0
        assert torch.equal(other(x), y)
