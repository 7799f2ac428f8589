"""Low-rank factorisation: truncated SVD and FWSVD, LowRankLinear, Fisher rows, rank allocation."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sparsenets.errors import ConfigError
from sparsenets.formats.fisher import fisher_rows
from sparsenets.formats.low_rank import LowRankLinear, spectrum, truncated_svd
from sparsenets.formats.ranks import ALLOCATIONS, allocate_ranks
from sparsenets.masking import attach

from helpers import assert_compiled_matches_eager


def _svd_truncation(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def _weighted_error(w: torch.Tensor, approx: torch.Tensor, rows: torch.Tensor) -> float:
    return (rows[:, None] * (w - approx).square()).sum().item()


# ---- truncated SVD -------------------------------------------------------------------------------


def test_truncated_svd_is_the_svd_truncation_and_meets_eckart_young():
    w = torch.randn(12, 8, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 3, 5):
        left, right = truncated_svd(w, r)
        assert left.shape == (12, r) and right.shape == (r, 8) and left.dtype == torch.float64
        torch.testing.assert_close(left @ right, _svd_truncation(w, r))
        error = torch.linalg.matrix_norm(w - left @ right)
        torch.testing.assert_close(error, s[r:].square().sum().sqrt())


def test_truncated_svd_balances_the_factors():
    left, right = truncated_svd(torch.randn(10, 7, dtype=torch.float64), 4)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1))
    # the factors' directions are orthogonal, as U and V are
    gram = left.t() @ left
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)))


@pytest.mark.parametrize("rank", [7, 50])
def test_truncated_svd_is_exact_at_full_rank(rank):
    w = torch.randn(10, 7, dtype=torch.float64)
    left, right = truncated_svd(w, rank)
    assert left.shape == (10, 7) and right.shape == (7, 7)
    torch.testing.assert_close(left @ right, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_truncated_svd_returns_the_weight_dtype(dtype):
    w = torch.randn(16, 12).to(dtype)
    left, right = truncated_svd(w, 4)
    assert left.dtype == right.dtype == dtype
    torch.testing.assert_close((left.float() @ right.float()), _svd_truncation(w.float(), 4), atol=0.05, rtol=0.05)


def test_fwsvd_matches_its_formula():
    w = torch.randn(9, 6, dtype=torch.float64)
    rows = torch.rand(9, dtype=torch.float64) * 10 + 0.1
    root = rows.sqrt()
    left, right = truncated_svd(w, 2, row_weights=rows)
    torch.testing.assert_close(left @ right, _svd_truncation(root[:, None] * w, 2) / root[:, None])


def test_fwsvd_with_uniform_weights_is_the_plain_svd():
    w = torch.randn(9, 6, dtype=torch.float64)
    left, right = truncated_svd(w, 3, row_weights=torch.full((9,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(left @ right, _svd_truncation(w, 3))


def test_fwsvd_beats_the_plain_svd_on_the_weighted_error():
    w = torch.randn(32, 24)
    rows = torch.randn(32).mul(2).exp()  # a few rows matter much more than the rest
    weighted, plain = truncated_svd(w, 6, rows), truncated_svd(w, 6)
    fw_error = _weighted_error(w, weighted[0] @ weighted[1], rows)
    plain_error = _weighted_error(w, plain[0] @ plain[1], rows)
    assert fw_error < 0.9 * plain_error
    # and it attains the weighted Eckart-Young bound: the tail of the weighted spectrum
    assert fw_error == pytest.approx(spectrum(w, rows)[6:].sum().item(), rel=1e-3)


def test_fwsvd_handles_zero_weights():
    w = torch.randn(8, 6)
    rows = torch.tensor([0.0, 0.0, 1.0, 2.0, 0.5, 0.0, 3.0, 1.0])
    left, right = truncated_svd(w, 2, rows)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    # the rows that count are fitted as well as the weighted SVD of those rows alone allows
    kept = rows > 0
    bound = spectrum(w[kept], rows[kept])[2:].sum().item()
    assert _weighted_error(w, left @ right, rows) == pytest.approx(bound, rel=1e-3, abs=1e-5)
    # all-zero weights carry no preference: the plain SVD
    left, right = truncated_svd(w, 2, torch.zeros(8))
    torch.testing.assert_close(left @ right, _svd_truncation(w, 2), atol=1e-5, rtol=1e-4)


def test_spectrum_is_the_squared_singular_values():
    w = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(spectrum(w), torch.linalg.svdvals(w).square())


@pytest.mark.parametrize("call, bad", [
    (lambda: truncated_svd(torch.randn(4, 3), 0), "0"),
    (lambda: truncated_svd(torch.randn(4, 3), 2.5), "2.5"),
    (lambda: truncated_svd(torch.randn(4), 1), "(4,)"),
    (lambda: truncated_svd(torch.randn(4, 3), 1, torch.ones(3)), "(3,)"),
    (lambda: truncated_svd(torch.randn(4, 3), 1, torch.tensor([1.0, -1.0, 0.0, 1.0])), "-1"),
    (lambda: LowRankLinear(4, 3, 0), "0"),
    (lambda: LowRankLinear.from_dense(torch.randn(4, 3)), "rank"),
    (lambda: LowRankLinear.from_dense(torch.randn(4, 3), torch.zeros(3), rank=1), "(3,)"),
])
def test_bad_factorisation_arguments_raise(call, bad):
    with pytest.raises(ConfigError, match=bad.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


# ---- LowRankLinear -------------------------------------------------------------------------------


def test_forward_is_the_dense_product_plus_bias():
    layer = LowRankLinear(10, 7, 3)
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)
    assert layer.dense_weight().shape == (7, 10)
    no_bias = LowRankLinear(10, 7, 3, bias=False)
    assert no_bias.bias is None and "bias" not in dict(no_bias.named_parameters())
    torch.testing.assert_close(no_bias(x), x @ no_bias.dense_weight().t())


def test_gradients_reach_both_factors_as_through_the_dense_product():
    layer = LowRankLinear(10, 7, 3)
    x = torch.randn(6, 10, requires_grad=True)
    target = torch.randn(6, 7)
    params = [x, layer.left, layer.right, layer.bias]
    got = torch.autograd.grad(F.mse_loss(layer(x), target), params)
    want = torch.autograd.grad(F.mse_loss(F.linear(x, layer.left @ layer.right, layer.bias), target), params)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


def _output_variance(make, seeds=4, n=256) -> float:
    variances = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = make()
        with torch.no_grad():
            variances.append(layer(torch.randn(1024, n)).var().item())
    return sum(variances) / len(variances)


def test_fresh_layer_has_the_output_variance_of_a_fresh_linear():
    n = 256
    expected = 1 / 3 + 1 / (3 * n)  # U(±1/√n) weights and bias on a unit-variance input
    linear = _output_variance(lambda: nn.Linear(n, 128))
    for rank in (4, 32):
        low_rank = _output_variance(lambda rank=rank: LowRankLinear(n, 128, rank))
        assert low_rank == pytest.approx(expected, rel=0.1)
        assert low_rank == pytest.approx(linear, rel=0.1)


def test_from_dense_is_the_truncated_svd():
    w, b = torch.randn(9, 12), torch.randn(9)
    rows = torch.rand(9) + 0.1
    for row_weights in (None, rows):
        layer = LowRankLinear.from_dense(w, b, rank=4, row_weights=row_weights)
        left, right = truncated_svd(w, 4, row_weights)
        assert layer.rank == 4 and (layer.in_features, layer.out_features) == (12, 9)
        torch.testing.assert_close(layer.left.detach(), left)
        torch.testing.assert_close(layer.right.detach(), right)
        torch.testing.assert_close(layer.bias.detach(), b)
    full = LowRankLinear.from_dense(w.double(), rank=100)
    assert full.rank == 9 and full.bias is None and full.left.dtype == torch.float64
    torch.testing.assert_close(full.dense_weight().detach(), w.double())


def test_describes_itself():
    layer = LowRankLinear(12, 9, 4, bias=False)
    assert layer.format_name() == "low-rank:4"
    assert layer.num_parameters() == 4 * (12 + 9) == sum(p.numel() for p in layer.parameters())
    assert layer.init_args() == {"in_features": 12, "out_features": 9, "rank": 4, "bias": False}
    rebuilt = LowRankLinear(**layer.init_args())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    assert "rank=4" in repr(layer) and "bias=False" in repr(layer)


def test_survives_state_dict_deepcopy_and_pickle():
    layer = LowRankLinear.from_dense(torch.randn(9, 12), torch.randn(9), rank=3)
    x = torch.randn(4, 12)
    rebuilt = LowRankLinear(**layer.init_args())
    rebuilt.load_state_dict(layer.state_dict())
    for other in (rebuilt, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(other(x), layer(x))


def test_compiled_matches_eager(one_thread):
    assert_compiled_matches_eager(LowRankLinear(12, 9, 3), torch.randn(4, 12, requires_grad=True))


# ---- Fisher rows ---------------------------------------------------------------------------------


def _manual_fisher(model, weights, batches, loss_of, transposed=False):
    totals = [torch.zeros(w.shape[1] if transposed else w.shape[0]) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(loss_of(batch), weights)
        for total, g in zip(totals, grads):
            total += g.square().sum(dim=0 if transposed else 1)
    return totals


def test_fisher_rows_of_linears_is_the_sum_of_squared_gradients_per_row():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    want = _manual_fisher(model, [model[0].weight, model[2].weight], data,
                          lambda b: F.cross_entropy(model(b[0]), b[1]))
    model[0].bias.requires_grad_(False)
    model.eval()
    with torch.no_grad():  # the caller's grad mode does not matter
        got = fisher_rows(model, {"first": model[0], "last": model[2]}, data)
    assert list(got) == ["first", "last"]
    torch.testing.assert_close(got["first"], want[0])
    torch.testing.assert_close(got["last"], want[1])
    assert not model.training and all(not m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert all(p.grad is None for p in model.parameters())
    # a limit on the batches, and a custom loss
    two = fisher_rows(model, {"last": model[2]}, iter(data), loss_fn=lambda out, y: F.cross_entropy(out, y) * 2,
                      batches=2)
    torch.testing.assert_close(two["last"], 4 * _manual_fisher(model, [model[2].weight], data[:2],
                                                               lambda b: F.cross_entropy(model(b[0]), b[1]))[0])


def test_fisher_rows_of_a_masked_layer_is_that_of_its_masked_weight():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    attach(model[0], "weight", torch.rand(5, 6) > 0.5, "unstructured")
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    got = fisher_rows(model, {"first": model[0]}, data)["first"]
    weight = model[0].weight.detach().clone().requires_grad_()
    want = _manual_fisher(model, [weight], data, lambda b: F.cross_entropy(
        model[2](F.relu(F.linear(b[0], weight, model[0].bias))), b[1]))[0]
    torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in model.parameters())
    # any parametrization: the gradient is the one of the weight the forward uses, not of the stored one
    parametrize.register_parametrization(model[2], "weight", _Double())
    got = fisher_rows(model, {"last": model[2]}, data)["last"]
    weight = model[2].weight.detach().clone().requires_grad_()
    want = _manual_fisher(model, [weight], data, lambda b: F.cross_entropy(
        F.linear(model[1](model[0](b[0])), weight, model[2].bias), b[1]))[0]
    torch.testing.assert_close(got, want)


class _Double(nn.Module):
    def forward(self, tensor):
        return 2 * tensor


def test_fisher_rows_keeps_train_mode():
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3)).train()
    data = [(torch.randn(64, 6), torch.randint(0, 3, (64,)))]
    torch.manual_seed(1)
    got = fisher_rows(model, {"first": model[0]}, data)["first"]
    torch.manual_seed(1)  # the same dropout masks: the model ran in train mode
    want = _manual_fisher(model, [model[0].weight], data, lambda b: F.cross_entropy(model(b[0]), b[1]))[0]
    torch.testing.assert_close(got, want)
    assert model.training


def test_fisher_rows_of_gpt2_conv1d_is_per_output_feature():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()
    ids = [torch.randint(0, 50, (2, 10)) for _ in range(2)]
    data = [{"input_ids": x, "labels": x} for x in ids]
    block = model.transformer.h[0]
    layers = {"attn.c_attn": block.attn.c_attn, "mlp.c_fc": block.mlp.c_fc, "mlp.c_proj": block.mlp.c_proj}
    flags = [p.requires_grad for p in model.parameters()]
    got = fisher_rows(model, layers, data)
    want = _manual_fisher(model, [m.weight for m in layers.values()], data, lambda b: model(**b).loss,
                          transposed=True)
    for (name, layer), expected in zip(layers.items(), want):
        assert got[name].shape == (layer.weight.shape[1],) == (layer.nf,)
        torch.testing.assert_close(got[name], expected)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_fisher_rows_rejects_bad_layers_and_data():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
    data = [(torch.randn(4, 6), torch.randint(0, 5, (4,)))]
    with pytest.raises(ConfigError, match="'act'"):
        fisher_rows(model, {"act": model[1]}, data)
    with pytest.raises(ConfigError, match="'stray'"):
        fisher_rows(model, {"stray": nn.Linear(6, 5)}, data)
    with pytest.raises(ConfigError, match="batches"):
        fisher_rows(model, {"0": model[0]}, data, batches=0)
    with pytest.raises(ConfigError, match="data"):
        fisher_rows(model, {"0": model[0]}, None)


# ---- rank allocation -----------------------------------------------------------------------------


def _layers(shapes):
    costs = {name: m + n for name, (m, n) in shapes.items()}
    dense = {name: m * n for name, (m, n) in shapes.items()}
    return costs, dense


def _spent(ranks, costs, dense):
    return sum(dense[n] if r is None else r * costs[n] for n, r in ranks.items())


def test_uniform_ranks_follow_the_formula():
    shapes = {"a": (64, 32), "b": (128, 128), "c": (10, 300), "thin": (1, 100), "tiny": (2, 100), "square": (4, 4)}
    costs, dense = _layers(shapes)
    spectra = {n: torch.ones(min(s)) for n, s in shapes.items()}
    ranks = allocate_ranks(spectra, costs, dense, 0.3)
    assert ranks["a"] == math.floor(0.3 * 64 * 32 / 96) == 6
    assert ranks["b"] == math.floor(0.3 * 128 * 128 / 256) == 19
    assert ranks["c"] == math.floor(0.3 * 3000 / 310) == 2
    assert ranks["tiny"] == 1  # at least 1, and 1 · 102 < 200 still saves
    assert ranks["thin"] is None  # one rank costs 101 > 100 dense parameters
    assert ranks["square"] == 1
    assert allocate_ranks(spectra, costs, dense, 1.0)["square"] is None  # rank 2 costs 16 = dense


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6, 0.95])
def test_every_allocation_keeps_to_the_budget(allocation, budget):
    g = torch.Generator().manual_seed(7)
    shapes = {f"layer{i}": tuple(int(v) for v in torch.randint(16, 96, (2,), generator=g)) for i in range(8)}
    costs, dense = _layers(shapes)
    spectra = {n: torch.rand(min(s), generator=g).sort(descending=True).values * torch.rand(1, generator=g) * 10
               for n, s in shapes.items()}
    ranks = allocate_ranks(spectra, costs, dense, budget, allocation)
    limit = budget * sum(dense.values())
    assert _spent(ranks, costs, dense) <= limit
    assert all(r is None or 1 <= r <= min(shapes[n]) and r * costs[n] < dense[n] for n, r in ranks.items())
    if allocation != "uniform":  # the greedy leaves less than one more rank unspent
        assert limit - _spent(ranks, costs, dense) < max(costs.values())
        assert ranks == allocate_ranks(spectra, costs, dense, budget, allocation)


def test_energy_gives_flat_spectra_more_rank_than_decaying_ones():
    costs, dense = _layers({"flat": (32, 32), "decaying": (32, 32)})
    spectra = {"flat": torch.ones(32), "decaying": 0.2 ** torch.arange(32.0)}
    ranks = allocate_ranks(spectra, costs, dense, 0.4, "energy")
    # the decaying layer keeps its directions above 1/32 of its energy (3: 80%, 16%, 3.2%), the flat one the rest
    assert ranks == {"flat": 9, "decaying": 3}
    assert _spent(ranks, costs, dense) <= 0.4 * 2048


def test_energy_normalises_each_layer_and_sensitivity_does_not():
    costs, dense = _layers({"a": (32, 32), "b": (32, 32)})
    spectra = {"a": torch.linspace(1, 0.5, 32), "b": 100 * torch.linspace(1, 0.5, 32)}
    energy = allocate_ranks(spectra, costs, dense, 0.3, "energy")
    assert abs(energy["a"] - energy["b"]) <= 1 and energy["a"] >= energy["b"]  # ties go to the first layer
    sensitivity = allocate_ranks(spectra, costs, dense, 0.3, "sensitivity")
    assert sensitivity["b"] > sensitivity["a"] == 1


def test_greedy_turns_layers_dense_and_skips_useless_ranks():
    costs, dense = _layers({"a": (32, 32), "b": (32, 32)})
    spectra = {"a": torch.rand(32).sort(descending=True).values + 0.1, "b": torch.rand(32) + 0.1}
    assert allocate_ranks(spectra, costs, dense, 1.0, "energy") == {"a": None, "b": None}
    low_rank = torch.cat([torch.ones(2), torch.zeros(30)])  # a weight of rank 2: more rank gains nothing
    ranks = allocate_ranks({"a": low_rank, "b": spectra["b"]}, costs, dense, 0.9, "sensitivity")
    assert ranks["a"] == 2 and ranks["b"] is None


@pytest.mark.parametrize("kwargs, bad", [
    ({"allocation": "greedy"}, "'greedy'.*uniform, energy, sensitivity"),
    ({"budget": 0.0}, "0.0"),
    ({"budget": 1.5}, "1.5"),
    ({"budget": float("nan")}, "nan"),
    ({"costs": {"a": 0}}, "costs\\['a'\\].*0"),
    ({"dense": {"a": 1024, "b": 10}}, "'b'"),
    ({"spectra": {"a": -torch.ones(32)}}, "spectra\\['a'\\]"),
])
def test_bad_allocation_arguments_raise(kwargs, bad):
    args = {"spectra": {"a": torch.ones(32)}, "costs": {"a": 64}, "dense": {"a": 1024}, "budget": 0.5,
            "allocation": "energy"} | kwargs
    with pytest.raises(ConfigError, match=bad):
        allocate_ranks(**args)
