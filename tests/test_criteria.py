"""Each criterion's scores against the formula worked out by hand on small models."""

import torch
from torch import nn

from sparsenets import SparsityConfig
from sparsenets.criteria import CRITERIA


def _score(name, model, data=None, loss_fn=None, **config):
    weights = {f"{n}.weight": (m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    generator = torch.Generator().manual_seed(0)
    return CRITERIA[name].score(model, weights, data or [], loss_fn, generator, SparsityConfig(**config))


def _half_mse(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def _linear_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x, t = torch.randn(1, 5), torch.randn(1, 3)
    w = model[0].weight.detach()
    g = (x @ w.t() - t).t() @ x  # dL/dW for L = ½‖Wx − t‖²
    return model, x, t, w, g


def test_magnitude_and_random():
    model, *_ = _linear_problem()
    assert torch.equal(_score("magnitude", model)["0.weight"], model[0].weight.detach().abs())
    a, b = _score("random", model)["0.weight"], _score("random", model)["0.weight"]
    assert torch.equal(a, b) and a.std() > 0


def test_snip_is_abs_weight_times_gradient():
    model, x, t, w, g = _linear_problem()
    scores = _score("snip", model, [(x, t), (x, t)], _half_mse)["0.weight"]
    torch.testing.assert_close(scores, (w * 2 * g).abs())  # gradients sum over the two batches


def test_taylor_accumulates_abs_per_batch():
    model, x, t, w, g = _linear_problem()
    x2, t2 = torch.randn(1, 5), torch.randn(1, 3)
    g2 = (x2 @ w.t() - t2).t() @ x2
    scores = _score("taylor", model, [(x, t), (x2, t2)], _half_mse)["0.weight"]
    torch.testing.assert_close(scores, (w * g).abs() + (w * g2).abs())


def test_grasp_keeps_the_largest_w_times_hessian_gradient():
    model, x, t, w, g = _linear_problem()
    hg = (g @ x.t()) @ x  # for ½‖Wx − t‖², H·V = (V x) xᵀ
    scores = _score("grasp", model, [(x, t)], _half_mse)["0.weight"]
    torch.testing.assert_close(scores, w * hg)


def test_synflow_is_the_path_norm_gradient():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    w1, w2 = model[0].weight.detach().abs(), model[2].weight.detach().abs()
    scores = _score("synflow", model, input_shape=[4])
    # R = 1ᵀ|W2||W1|1  ⇒  ∂R/∂W1 = (|W2|ᵀ1) 1ᵀ,  ∂R/∂W2 = 1 (|W1|1)ᵀ
    torch.testing.assert_close(scores["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], w2 * w1.sum(1)[None, :])


def test_wanda_is_abs_weight_times_input_norm():
    model, *_ = _linear_problem()
    xs = [torch.randn(6, 5), torch.randn(4, 5)]
    scores = _score("wanda", model, [(x, None) for x in xs])["0.weight"]
    norms = torch.cat(xs).norm(dim=0)
    torch.testing.assert_close(scores, model[0].weight.detach().abs() * norms)


def test_wanda_conv_norms_follow_the_unfolded_patches():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
    x = torch.randn(3, 2, 5, 5)
    weights = {"0.weight": (conv, "weight")}
    scores = CRITERIA["wanda"].score(nn.Sequential(conv), weights, [(x, None)], None, None, SparsityConfig())
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    norms = patches.norm(dim=0).reshape(2, 9)  # group 0 sees channel 0, group 1 channel 1
    expected = conv.weight.detach().abs().reshape(4, 9) * norms.repeat_interleave(2, dim=0)
    torch.testing.assert_close(scores["0.weight"].reshape(4, 9), expected)
