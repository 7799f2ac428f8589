"""Residual streams pruned as one unit, every channel unit with its BatchNorms and depthwise convs
(``couple_channel_units``), then cut by ``compress``."""

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
    return cnn.trained_batchnorm(cnn.ResNet(widths=(8, 16), classes=5))


def mobilenet() -> nn.Module:
    """Stem and two inverted residuals on one 16-wide stream, pooled head."""
    return cnn.trained_batchnorm(cnn.MobileNet(width=16, blocks=2, classes=5))


def _train_two_steps(model: nn.Module) -> None:
    """Two SGD steps in train mode on random inputs (masks must hold through them)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(*SHAPE)).sum().backward()
        opt.step()


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
    return _pruned(model, member.qualname)


def _pruned(model: nn.Module, qualname: str) -> torch.Tensor:
    mask = mask_of(model, qualname)
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


def no_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("build", [mlp, no_batchnorm])
def test_a_model_without_residual_stream_or_batchnorm_comes_back_unchanged(build) -> None:
    model = build()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5, exclude=["2"]))
    shape = (2, 20) if build is mlp else (2, 3, 6, 6)
    coupled = couple_channel_units(model, units, torch.randn(*shape))
    assert len(coupled) == len(units) and all(a is b for a, b in zip(coupled, units))


def test_a_model_fx_cannot_trace_comes_back_unchanged() -> None:
    class Branchy(nn.Module):  # data-dependent control flow: no trace, no coupling
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.conv(x))
            return self.out(h if h.sum() > 0 else -h)

    model = Branchy()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    assert all(a is b for a, b in zip(coupled, units)) and len(coupled) == len(units)


def test_a_conv_takes_its_batchnorm_along_unscored() -> None:
    model = convnet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    coupled = couple_channel_units(model, units, torch.randn(2, 3, 6, 6))
    assert [u.name for u in coupled] == [u.name for u in units]
    first, second = coupled[:2]
    assert [m.qualname for m in first.members] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [m.qualname for m in first.weights] == ["0.weight"]  # scored as before
    assert first.numel == units[0].numel and first.erk_dims == units[0].erk_dims
    assert {m.qualname for m in second.members if not m.is_weight} == {"3.bias", "4.weight", "4.bias"}
    assert coupled[2] is units[2] and coupled[3] is units[3]  # the Linear layers: no BatchNorm


def test_inner_convs_of_a_resnet_take_their_batchnorm() -> None:
    model = resnet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    coupled = {u.name: u for u in couple_channel_units(model, units, torch.randn(*SHAPE))}
    assert coupled["fc"] is units[-1]  # the head reads the stream: nothing on its way
    for block in ("layers.0.0", "layers.0.1", "layers.1.0", "layers.1.1"):
        unit = coupled[f"{block}.conv1"]
        assert [m.qualname for m in unit.members] == [f"{block}.conv1.weight", f"{block}.bn1.weight",
                                                      f"{block}.bn1.bias"]
        assert all(torch.equal(m.ids, torch.arange(unit.n_groups)) for m in unit.members[1:])


def test_a_depthwise_conv_after_an_expand_conv_merges_into_its_unit() -> None:
    model = mobilenet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5))
    coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    assert [u.name for u in coupled] == ["stream:stem", "blocks.0.expand", "blocks.1.expand", "head"]
    expand = coupled[1]
    assert [m.qualname for m in expand.weights] == ["blocks.0.expand.weight", "blocks.0.depthwise.weight"]
    assert [m.qualname for m in expand.members if not m.is_weight] == [
        f"blocks.0.{bn}.{p}" for bn in ("bn1", "bn2") for p in ("weight", "bias")]
    assert expand.n_groups == 96 and expand.erk_dims == [(96, 16, 1, 1), (96, 1, 3, 3)]


def test_an_excluded_depthwise_conv_and_what_follows_it_stay_as_configured() -> None:
    model = mobilenet()
    units = find_units(model, sn.SparsityConfig(pattern="channel", sparsity=0.5, exclude=["*depthwise"]))
    coupled = couple_channel_units(model, units, torch.randn(*SHAPE))
    expand = next(u for u in coupled if u.name == "blocks.0.expand")
    assert [m.qualname for m in expand.members] == ["blocks.0.expand.weight", "blocks.0.bn1.weight",
                                                    "blocks.0.bn1.bias"]


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
    if build is resnet:  # (MobileNet's expand and depthwise units, pruned apart, cut the union of their channels)
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
    _train_two_steps(model)
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
    model, example = cnn.trained_batchnorm(DepthwiseOnTheStream()), torch.randn(*SHAPE)
    units = prune(model, {"pattern": "channel", "sparsity": 0.5}, couple=True, example=example)
    assert [u.name for u in units] == ["stream:stem", "conv", "fc"]
    assert [m.qualname for m in units[0].weights] == ["stem.weight", "dw.weight"]
    compressed = sn.compress(model, example, autotune=False)
    assert compressed.stem.out_channels == compressed.dw.groups == compressed.conv.in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(compressed(example), model(example), rtol=0, atol=1e-5)


# ---- the whole path: sparsify_ with the channel pattern, then compress ------------------------------------


def resnet18_shape() -> nn.Module:
    """ResNet-18's layout (four stages of two basic blocks) at 8/16/32/64 channels."""
    return cnn.trained_batchnorm(cnn.ResNet(widths=(8, 16, 32, 64), classes=5))


def _sparsified(build, sparsity: float = 0.5, **config) -> tuple[nn.Module, nn.Module]:
    """(masked, dense copy) after ``sparsify_`` with the channel pattern and one batch of data."""
    model = build()
    dense = copy.deepcopy(model)
    batch = (torch.randn(*SHAPE), torch.randint(0, 5, (2,)))
    sn.sparsify_(model, {"pattern": "channel", "sparsity": sparsity, "exclude": ["fc", "head"], **config},
                 data=[batch])
    return model.eval(), dense


def _inner_layers(model: nn.Module) -> list[tuple[str, str, str]]:
    """(producer, its BatchNorm, its reader) of every block's inner channels."""
    if isinstance(model, cnn.ResNet):
        return [(f"{n}.conv1", f"{n}.bn1", f"{n}.conv2") for n, m in model.named_modules()
                if isinstance(m, cnn.BasicBlock)]
    return [(f"{n}.expand", f"{n}.bn1", f"{n}.depthwise") for n, m in model.named_modules()
            if isinstance(m, cnn.InvertedResidual)]


@pytest.mark.parametrize("build", [resnet18_shape, mobilenet])
def test_compress_cuts_every_pruned_inner_channel(build) -> None:
    model, _ = _sparsified(build)
    example = torch.randn(*SHAPE)
    small = sn.compress(model, example, autotune=False)
    for producer, norm, reader in _inner_layers(model):
        kept = int((~_pruned(model, f"{producer}.weight")).sum())
        width = model.get_submodule(producer).out_channels
        assert kept == width // 2  # exactly half: no channel kept for a BatchNorm shift
        assert small.get_submodule(producer).out_channels == kept
        assert small.get_submodule(norm).num_features == kept
        if isinstance(model, cnn.ResNet):
            assert small.get_submodule(reader).in_channels == kept
        else:  # the depthwise conv and its BatchNorm went with the expand rows, and the project's inputs
            block = producer.rsplit(".", 1)[0]
            assert small.get_submodule(reader).groups == small.get_submodule(f"{block}.bn2").num_features == kept
            assert small.get_submodule(f"{block}.project").in_channels == kept
    assert not [n for n in small.compress_report.notes if "zero channels kept" in n]
    with torch.no_grad():
        x = torch.randn(3, 3, 8, 8)
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-5)


def test_a_resnet_18_shape_compresses_to_even_widths() -> None:
    model, _ = _sparsified(resnet18_shape)
    small = sn.compress(model, torch.randn(*SHAPE), autotune=False)
    assert [small.get_submodule(p).out_channels for p, _, _ in _inner_layers(model)] == [4, 4, 8, 8, 16, 16, 32, 32]


@pytest.mark.parametrize("build", [resnet18_shape, mobilenet])
def test_coupled_units_hit_the_target_within_one_group(build) -> None:
    model = build()
    units = prune(model, {"pattern": "channel", "sparsity": 0.5, "exclude": ["fc", "head"]}, couple=True)
    targets = layer_sparsities(units, 0.5, "uniform")
    for u in units:
        pruned = sum(int((~mask_of(model, m.qualname)).sum()) for m in u.weights)
        assert abs(pruned - targets[u.name] * u.numel) <= int(u.group_sizes().max()), u.name


@pytest.mark.parametrize("build", [resnet18_shape, mobilenet])
def test_masked_training_keeps_pruned_inner_channels_exactly_zero(build) -> None:
    model, _ = _sparsified(build)
    inner = _inner_layers(model)
    gone = {p: _pruned(model, f"{p}.weight") for p, _, _ in inner}
    _train_two_steps(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(r).register_forward_pre_hook(lambda mod, args, r=r: seen.__setitem__(r, args[0]))
             for _, _, r in inner]
    for mode in (True, False):  # batch statistics, then running statistics
        model.train(mode)
        with torch.no_grad():
            model(torch.randn(*SHAPE))
        for producer, norm, reader in inner:
            bn = model.get_submodule(norm)
            assert float(bn.weight.detach()[gone[producer]].abs().max()) == 0.0
            assert float(bn.bias.detach()[gone[producer]].abs().max()) == 0.0
            assert float(seen[reader][:, gone[producer]].abs().max()) == 0.0
    for hook in hooks:
        hook.remove()
