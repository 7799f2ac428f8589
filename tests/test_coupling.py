"""Residual streams pruned as one unit (``couple_channel_units``), then cut by ``compress``."""

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsenets as sn
from sparsenets.allocation import layer_sparsities
from sparsenets.config import as_config
from sparsenets.coupling import couple_channel_units
from sparsenets.criteria import CRITERIA
from sparsenets.masking import attach
from sparsenets.patterns import MIXED
from sparsenets.sparsify import compute_masks
from sparsenets.targets import find_units

from helpers import convnet, mask_of, mlp

_spec = importlib.util.spec_from_file_location("bench_cnn", Path(__file__).parents[1] / "bench" / "cnn.py")
assert _spec is not None and _spec.loader is not None
cnn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cnn)

SHAPE = (2, 3, 8, 8)


def resnet() -> nn.Module:
    """Two stages (8 then 16 wide, the second behind a conv + BatchNorm downsample shortcut)."""
    return _trained_batchnorm(cnn.ResNet(widths=(8, 16), classes=5))


def mobilenet() -> nn.Module:
    """Stem and two inverted residuals on one 16-wide stream, pooled head."""
    return _trained_batchnorm(cnn.MobileNet(width=16, blocks=2, classes=5))


def _trained_batchnorm(model: nn.Module) -> nn.Module:
    """Statistics as after training: a zero conv row comes out of its BatchNorm as a nonzero constant."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.0)
                m.bias.normal_(0, 0.1)
    return model.eval()


def prune(model: nn.Module, config: dict, couple: bool, example=None) -> list:
    """``sparsify_`` (magnitude, no data) with the units coupled in between; returns the units."""
    config = as_config(config)
    units = find_units(model, config)
    if couple:
        units = couple_channel_units(model, units, example if example is not None else torch.randn(*SHAPE))
    masks = compute_masks(model, units, config, CRITERIA[config.criterion], [], None)
    for unit in units:  # sparsify_'s attach loop
        label = str(unit.pattern) if unit.conforms(masks) else MIXED
        for member in unit.members:
            attach(member.module, member.param, masks[member.qualname], label)
    return units


def _pruned_rows(model: nn.Module, member) -> torch.Tensor:
    mask = mask_of(model, member.qualname)
    return ~mask.reshape(mask.shape[0], -1).any(dim=1)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _streams(units: list) -> list:
    return [u for u in units if u.name.startswith("stream:")]


# ---- which units merge ------------------------------------------------------------------------------


def test_each_stream_becomes_one_unit_in_place_of_its_first_writer() -> None:
    model = resnet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    names = [u.name for u in coupled]
    assert names == ["stream:conv1", "layers.0.0.conv1", "layers.0.1.conv1", "layers.1.0.conv1",
                     "stream:layers.1.0.downsample.0", "layers.1.1.conv1", "fc"]
    first, second = _streams(coupled)
    assert first.n_groups == 8 and second.n_groups == 16
    assert [m.module_name for m in first.weights] == ["conv1", "layers.0.0.conv2", "layers.0.1.conv2"]
    # every BatchNorm on the stream goes with it (scale and shift, not scored)
    assert {m.qualname for m in second.members if not m.is_weight} == {
        f"{bn}.{p}" for bn in ("layers.1.0.downsample.1", "layers.1.0.bn2", "layers.1.1.bn2")
        for p in ("weight", "bias")}
    assert second.erk_dims == [(16, 8, 1, 1), (16, 16, 3, 3), (16, 16, 3, 3)]
    assert second.numel == sum(m.tensor().numel() for m in second.weights)


@pytest.mark.parametrize("build", [mlp, convnet])
def test_a_model_without_a_residual_stream_comes_back_unchanged(build) -> None:
    model = build()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    shape = (2, 20) if build is mlp else (2, 3, 6, 6)
    coupled = couple_channel_units(model, units, torch.randn(*shape))
    assert len(coupled) == len(units) and all(a is b for a, b in zip(coupled, units))


def test_a_stream_with_an_excluded_writer_stays_uncoupled(caplog) -> None:
    model = resnet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5, exclude=["layers.0.1.conv2"]))
    with caplog.at_level(logging.DEBUG, logger="sparsenets.coupling"):
        coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    assert [u.name for u in _streams(coupled)] == ["stream:layers.1.0.downsample.0"]
    assert {"conv1", "layers.0.0.conv2"} <= {u.name for u in coupled}
    assert "writer(s) layers.0.1.conv2 have no unit" in caplog.text


def test_writers_with_different_fixed_sparsities_stay_separate_with_a_warning() -> None:
    model = resnet()
    config = sn.SparsityConfig(pattern="channel", sparsity=0.5, overrides={"layers.0.0.conv2": {"sparsity": 0.25}})
    units = find_units(model, config)
    with pytest.warns(UserWarning, match="stream of conv1 left uncoupled: its layers have different fixed"):
        coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    assert [u.name for u in _streams(coupled)] == ["stream:layers.1.0.downsample.0"]


def test_finding_streams_leaves_batchnorm_statistics_and_modes_alone() -> None:
    model = resnet().train()
    before = copy.deepcopy(model.state_dict())
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    x, y = torch.randn(*SHAPE), torch.randint(0, 5, (2,))
    assert len(_streams(couple_channel_units(model, units, (x, y)))) == 2  # an (x, y) batch as it comes
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# ---- pruning with them, and compressing -----------------------------------------------------------------


@pytest.mark.parametrize("build", [resnet, mobilenet])
def test_coupled_streams_are_cut_by_compress_where_separate_writers_are_not(build) -> None:
    example = torch.randn(*SHAPE)
    config = {"pattern": "channel", "sparsity": 0.5}
    separate, coupled = build(), build()
    coupled.load_state_dict(separate.state_dict())
    prune(separate, config, couple=False)
    units = prune(coupled, config, couple=True, example=example)
    streams = _streams(units)
    assert streams
    for stream in streams:  # the same channels gone from every writer and BatchNorm of the stream
        pruned = [_pruned_rows(coupled, m) for m in stream.members]
        assert pruned[0].any() and not pruned[0].all()
        assert all(torch.equal(p, pruned[0]) for p in pruned)
    small = sn.compress(coupled, example, autotune=False)
    large = sn.compress(separate, example, autotune=False)
    for stream in streams:
        writer = stream.members[0].module_name
        kept = int((~_pruned_rows(coupled, stream.members[0])).sum())
        assert small.get_submodule(writer).out_channels == kept < stream.n_groups
        # separately, only the channels every writer happens to drop can go
        assert large.get_submodule(writer).out_channels > kept
    assert _n_params(small) < 0.85 * _n_params(large)
    with torch.no_grad():
        x = torch.randn(3, 3, 8, 8)
        torch.testing.assert_close(small(x), coupled(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_coupled_selection_hits_the_target_within_one_group(allocation) -> None:
    model = resnet()
    config = {"pattern": "channel", "sparsity": 0.5, "allocation": allocation}
    units = prune(model, config, couple=True)
    pruned = {u.name: sum(int((~mask_of(model, m.qualname)).sum()) for m in u.weights) for u in units}
    group = {u.name: int(u.group_sizes().max()) for u in units}
    if allocation == "global":  # one threshold: the total lands within one group
        total = sum(u.numel for u in units)
        assert abs(sum(pruned.values()) - 0.5 * total) <= max(group.values())
    else:
        targets = layer_sparsities(units, 0.5, allocation)
        for u in units:
            assert abs(pruned[u.name] - targets[u.name] * u.numel) <= group[u.name], u.name


def test_masked_training_keeps_a_coupled_channel_exactly_zero() -> None:
    model = resnet()
    units = prune(model, {"pattern": "channel", "sparsity": 0.5}, couple=True)
    stream = _streams(units)[0]
    gone = _pruned_rows(model, stream.members[0])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(*SHAPE)).sum().backward()
        opt.step()
    model.eval()
    seen = []
    hook = model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(*SHAPE))
    hook.remove()
    assert float(seen[0][:, gone].abs().max()) == 0.0  # the stream is exactly zero there


def test_pruning_again_keeps_the_streams_coupled() -> None:
    model = resnet()
    prune(model, {"pattern": "channel", "sparsity": 0.25}, couple=True)
    units = prune(model, {"pattern": "channel", "sparsity": 0.5}, couple=True)  # on the masked model
    for stream in _streams(units):
        pruned = [_pruned_rows(model, m) for m in stream.members]
        assert int(pruned[0].sum()) == stream.n_groups // 2
        assert all(torch.equal(p, pruned[0]) for p in pruned)


class DepthwiseOnTheStream(nn.Module):
    """``x + bn2(dw(x))``: the depthwise conv sits on the stream, so its channel unit merges too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.conv, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = self.conv(x + self.bn2(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_depthwise_conv_on_the_stream_is_pruned_with_it() -> None:
    model, example = _trained_batchnorm(DepthwiseOnTheStream()), torch.randn(*SHAPE)
    units = prune(model, {"pattern": "channel", "sparsity": 0.5}, couple=True, example=example)
    assert [u.name for u in units] == ["stream:stem", "conv", "fc"]
    assert [m.qualname for m in units[0].weights] == ["stem.weight", "dw.weight"]
    compressed = sn.compress(model, example, autotune=False)
    assert compressed.stem.out_channels == compressed.dw.groups == compressed.conv.in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(compressed(example), model(example), rtol=0, atol=1e-5)
