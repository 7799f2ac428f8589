"""Masks on nn.LSTM / nn.GRU / nn.RNN weights: the same contract as Linear and Conv layers.

torch's recurrent layers cache their weights (``_flat_weights``) and call a fused kernel, so a
mask only counts if that kernel sees the masked weight; references here are built by zeroing
a plain copy's weights by hand.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Tagger(nn.Module):
    """Two-layer LSTM, then a bidirectional GRU, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.gru = nn.GRU(16, 8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


RECURRENT = ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
             "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l0_reverse", "gru.weight_hh_l0_reverse"]


def masked_reference(model: nn.Module) -> nn.Module:
    """A plain copy with the masked model's effective weights written into ordinary parameters."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for module_name, module, tensor_name, _ in sn.masking.masks(model):
        state[f"{module_name}.{tensor_name}"] = getattr(module, tensor_name).detach()
    plain = Tagger()
    plain.load_state_dict(state)
    return plain


@pytest.fixture
def masked():
    torch.manual_seed(0)
    model = Tagger()
    sn.sparsify_(model, sn.SparsityConfig(sparsity=0.75, pattern="block:8x1"))
    return model


def test_every_recurrent_weight_is_masked_and_the_fused_kernel_sees_it(masked):
    x = torch.randn(4, 5, 8)
    for module_name in ("lstm", "gru"):  # one unit per recurrent module: 75% of all its weights
        weights = [getattr(getattr(masked, module_name), q.split(".")[1]) for q in RECURRENT
                   if q.startswith(module_name)]
        assert all(0 < (w == 0).float().mean() < 1 for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert zeros == pytest.approx(0.75, abs=0.01)
    assert torch.allclose(masked(x), masked_reference(masked)(x), atol=1e-6)
    # biases stay dense: a recurrent unit's bias is split over bias_ih and bias_hh
    assert not [name for _, _, name, _ in sn.masking.masks(masked) if name.startswith("bias")]


def test_gradients_of_pruned_recurrent_weights_are_zero(masked):
    masked(torch.randn(4, 5, 8)).sum().backward()
    original = masked.lstm.parametrizations.weight_hh_l0.original
    mask = masked.lstm.parametrizations.weight_hh_l0[0].mask
    assert original.grad[~mask].abs().max() == 0
    assert original.grad[mask].abs().max() > 0


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_masked_recurrent_layers_compute_the_same(masked, how):
    x = torch.randn(3, 5, 8)
    if how == "deepcopy":
        clone = copy.deepcopy(masked)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(masked))
    else:
        buffer = io.BytesIO()
        torch.save(masked, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    assert torch.equal(clone(x), masked(x))
    with torch.no_grad():  # the copy owns its weights: changing it leaves the original alone
        clone.lstm.parametrizations.weight_hh_l0.original.add_(1.0)
    assert not torch.equal(clone(x), masked(x))
    sn.finalize_(clone)
    assert torch.allclose(masked(x), masked_reference(masked)(x), atol=1e-6)


def test_state_dict_round_trip_and_finalize(masked):
    x = torch.randn(3, 5, 8)
    fresh = Tagger()
    sn.sparsify_(fresh, sn.SparsityConfig(sparsity=0.75, pattern="block:8x1", criterion="random"))
    fresh.load_state_dict(masked.state_dict())
    assert torch.equal(fresh(x), masked(x))
    expected = masked(x)
    sn.finalize_(masked)
    assert isinstance(masked.lstm.weight_hh_l0, nn.Parameter)
    assert torch.allclose(masked(x), expected, atol=1e-6)


def test_report_counts_each_weight_once_per_step(masked):
    x = torch.randn(2, 5, 8)
    rows = {r.name: r for r in sn.report(masked, [(x, torch.zeros(2, dtype=torch.long))]).rows}
    assert set(RECURRENT) <= set(rows)
    row = rows["lstm.weight_hh_l0"]
    assert row.shape == (64, 16)
    assert row.dense_flops == 2 * 64 * 16 * 5  # five time steps per sample
    assert row.sparse_flops == 2 * row.nonzeros * 5


def test_only_torch_recurrent_layers_count_as_recurrent():
    class RNN(nn.Module):  # a user's model that happens to be called RNN
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

    model = RNN()
    sn.sparsify_(model, sn.SparsityConfig(sparsity=0.5))
    assert [n for n, *_ in sn.masking.masks(model)] == ["fc"]


def test_module_types_can_leave_recurrent_layers_dense():
    model = Tagger()
    sn.sparsify_(model, sn.SparsityConfig(sparsity=0.5, module_types=["Linear"]))
    assert [n for n, *_ in sn.masking.masks(model)] == ["head"]


def test_wanda_refuses_recurrent_layers_by_name():
    model = Tagger()
    data = [(torch.randn(4, 5, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="lstm.weight_ih_l0"):
        sn.sparsify_(model, sn.SparsityConfig(sparsity=0.5, criterion="wanda"), data)
    assert not list(sn.masking.masks(model))  # nothing attached before the error


@pytest.mark.parametrize("criterion", ["snip", "taylor", "synflow"])
def test_gradient_criteria_score_recurrent_weights(criterion):
    torch.manual_seed(0)
    model = Tagger()
    data = [(torch.randn(4, 5, 8), torch.randint(0, 8, (4,)))]
    sn.sparsify_(model, sn.SparsityConfig(sparsity=0.5, criterion=criterion), data)
    assert sn.report(model).density == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_built_in_recurrent_classifier(cell):
    model = build_model("rnn", (40,), 10, cell=cell, hidden=16, patch=4)
    assert model(torch.randn(3, 40)).shape == (3, 10)
    assert model.rnn.input_size == 4
    with pytest.raises(ValueError, match="patch 3"):
        build_model("rnn", (40,), 10, patch=3)
    with pytest.raises(ValueError, match="'rnn2'"):
        build_model("rnn", (40,), 10, cell="rnn2")
