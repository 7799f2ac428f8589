"""Channel units pruned so that ``compress`` can cut them: residual streams as one unit, and every
channel unit with the BatchNorms and depthwise convolutions that carry its channels.

Channel i of a residual stream is the sum of what every writer (the stem or downsample conv and
each block's last conv, each through its BatchNorm) puts there. ``compress`` can cut it only when
all of them are zero there, so pruning each writer on its own leaves the stream almost whole. One
unit per stream, with group i = row i of every writer, scores a channel by the mean over all the
writers' rows and prunes it everywhere at once.

A zero conv row followed by a trained BatchNorm outputs ``β − γ·μ/σ``, a constant that a
zero-padded reader (a ResNet block's 3×3 conv, a MobileNet depthwise conv) cannot fold, so
``compress`` would keep the channel anyway. Every channel unit therefore also masks, as members
that are not scored, the scale and shift of each BatchNorm its channels pass on the way to their
readers (a stream's BatchNorms, a block's inner ``conv1 → bn1``): a pruned channel is then exactly
zero after the BatchNorm, and after ReLU, and ``compress`` cuts it with its readers' inputs.

A depthwise convolution reading a unit's channels (MobileNet's expand → BN → depthwise) maps
channel i to channel i, so it is pruned with the unit instead of on its own: its channel unit is
merged in, its filter rows scored with the unit's rows (group i = row i of both), and the
BatchNorm after it masked too. A depthwise convolution without a channel unit of its own (the
config excludes it, or gives it another pattern or another fixed sparsity) is left as the config
says, with whatever follows it; ``compress`` still cuts the channel when the convolution has no
bias and its reader can fold the BatchNorm's constant (a 1×1 projection can).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from . import batches as B
from .compression import surgery as S
from .compression.channels import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    IDENTITY_FUNCTIONS,
    IDENTITY_MODULES,
    POOLS,
    graph_groups,
    is_elementwise,
    traced_regions,
    usable_in,
)
from .compression.graph import CoupledChannels, stream_groups
from .compression.probe import probe
from .patterns import Channel
from .targets import Member, Unit

log = logging.getLogger(__name__)


@dataclass
class _PerChannel:
    """A layer after ``producer`` that maps its channel i to channel i (BatchNorm or depthwise conv),
    with the depthwise convolutions between them (all must join the unit for this one to)."""

    name: str
    module: nn.Module
    behind: tuple[str, ...]


@dataclass
class _Chain:
    """A channel unit's layer and the per-channel layers its channels pass before their readers."""

    producer: str
    after: list[_PerChannel] = field(default_factory=list)


def couple_channel_units(model: nn.Module, units: list[Unit], example_input: Any) -> list[Unit]:
    """Merge the channel units of every residual stream's writers into one unit per stream, and give
    every channel unit the BatchNorms (masked, not scored) and depthwise convolutions its channels pass.

    ``example_input`` is anything :func:`sparsenets.batches.run` takes: a tensor, an ``(x, y)``
    batch (``x`` is run) or a dict batch (run as ``model(**batch)``). It is moved to the model's
    device and run once in eval mode (BatchNorm statistics untouched) to find the streams.

    A stream is merged when every writer has a channel unit in ``units`` as wide as the stream
    and all share one fixed sparsity (or none). Its unit, named ``stream:<first writer>``, holds
    every writer's weight and bias members with group i = stream channel i, the weight and bias
    of any depthwise conv on the way that has a channel unit of its own, and, as non-scored
    members, the scale and shift of every BatchNorm on the way. It takes the place of the first
    of those units in ``units``.

    Any other channel unit whose outputs ``compress`` can follow to their readers keeps its name
    and gains, as non-scored members, the scale and shift of every BatchNorm on the way; a
    depthwise conv on the way whose own channel unit has the same width and fixed sparsity (or
    none) is merged in (its rows scored with the unit's), with the BatchNorms after it. Every
    other unit passes through unchanged (the same object). A model torch.fx can't trace comes
    back unchanged.
    """
    by_name = {u.name: u for u in units}
    groups, chains = _trace(model, example_input)
    merged: dict[str, Unit] = {}  # name of a replaced unit -> the unit taking its place
    for group in groups:
        stream = _stream_unit(model, group, by_name)
        if stream is not None:
            merged.update({name: stream for name in _replaced(group, by_name)})
    for chain in chains:
        if chain.producer in merged:
            continue
        coupled = _chain_unit(chain, by_name, merged)
        if coupled is not None:
            merged.update({m.module_name: coupled for m in coupled.weights})
    out: list[Unit] = []
    placed: set[int] = set()  # by id: Unit's dataclass == would compare tensors
    for unit in units:
        stream = merged.get(unit.name, unit)
        if id(stream) not in placed:
            placed.add(id(stream))
            out.append(stream)
    return out


def _trace(model: nn.Module, example_input: Any) -> tuple[list[CoupledChannels], list[_Chain]]:
    """The residual streams and the per-channel chains of every other layer ``compress`` can follow,
    found in eval mode: a forward in train mode would update BatchNorm statistics."""
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        shapes = probe(model, B.to_device(example_input, device))
        names = {id(m): n for n, m in model.named_modules()}
        streams, chains = [], []
        for prefix, root, graph in traced_regions(model):
            usable = usable_in(root, graph, set())
            for stream in stream_groups(prefix, root, graph, shapes, usable):
                streams.append(CoupledChannels(list(stream.producers), [r.name for r, _ in stream.readers],
                                               [names[id(m)] for m in stream.through],
                                               S.n_outputs(stream.producers[stream.name])))
            nodes = {_qualname(prefix, n): n for n in graph.nodes if n.op == "call_module"}
            for group in graph_groups(prefix, root, graph, shapes, set()):
                if group.through:
                    chain = _Chain(group.name)
                    chain.after = list(_per_channel(root, prefix, nodes[group.name], ()))
                    chains.append(chain)
        return streams, chains
    finally:
        for module, training in modes.items():
            module.training = training


def _qualname(prefix: str, node: fx.Node) -> str:
    return f"{prefix}.{node.target}" if prefix else cast(str, node.target)


def _per_channel(root: nn.Module, prefix: str, node: fx.Node, behind: tuple[str, ...]) -> Iterator[_PerChannel]:
    """The BatchNorms and depthwise convs ``node``'s channels reach, through activations, dropout and
    pools, before any layer reads them (``graph_groups`` has checked that nothing else is on the way)."""
    for user in node.users:
        module = root.get_submodule(cast(str, user.target)) if user.op == "call_module" else None
        if module is not None and (isinstance(module, S.BATCHNORM_TYPES) or S.is_depthwise(module)):
            name = _qualname(prefix, user)
            yield _PerChannel(name, module, behind)
            yield from _per_channel(root, prefix, user, behind + (name,) if S.is_depthwise(module) else behind)
        elif (module is not None and (is_elementwise(module) or isinstance(module, IDENTITY_MODULES + POOLS))) or (
                user.op == "call_function" and user.target in ELEMENTWISE_FUNCTIONS | IDENTITY_FUNCTIONS) or (
                user.op == "call_method" and user.target in ELEMENTWISE_METHODS):
            yield from _per_channel(root, prefix, user, behind)


def _chain_unit(chain: _Chain, by_name: dict[str, Unit], merged: dict[str, Unit]) -> Unit | None:
    """A channel unit with the BatchNorms and depthwise convs on its channels' way, or None when
    there is nothing to add (no unit, not the channel pattern, no BatchNorm)."""
    unit = by_name.get(chain.producer)
    if unit is None or not isinstance(unit.pattern, Channel):
        return None
    joined: dict[str, Unit] = {}  # depthwise convs merged in, by name
    left: set[str] = set()
    for layer in chain.after:
        if not S.is_depthwise(layer.module) or layer.name in joined or layer.name in left:
            continue
        other = by_name.get(layer.name)
        if (other is not None and other.name not in merged and isinstance(other.pattern, Channel)
                and other.n_groups == unit.n_groups and other.sparsity == unit.sparsity):
            joined[layer.name] = other
        else:
            left.add(layer.name)
            log.debug("depthwise %s after %s left as it is: %s", layer.name, unit.name,
                      "no channel unit of its own" if other is None else
                      "its unit is not a channel unit of the same width and fixed sparsity")
    members = list(unit.members)
    dims = list(unit.erk_dims)
    for layer in chain.after:
        if any(d in left for d in (*layer.behind, layer.name)):
            continue
        if layer.name in joined:
            members += joined[layer.name].members
            dims += joined[layer.name].erk_dims
        elif getattr(layer.module, "num_features", None) == unit.n_groups:
            members += _batchnorm_members(layer.name, layer.module)  # none for a BatchNorm without affine
    if len(members) == len(unit.members):
        return None
    return Unit(unit.name, unit.pattern, members, unit.n_groups, dims, unit.sparsity)


def _batchnorm_members(name: str, module: nn.Module) -> list[Member]:
    """A BatchNorm's scale and shift as non-scored members, group i = channel i."""
    return [Member(name, p, module, _channel_ids(t), is_weight=False)
            for p in ("weight", "bias") if isinstance(t := getattr(module, p, None), Tensor)]


def _replaced(group: CoupledChannels, by_name: dict[str, Unit]) -> list[str]:
    """The units a stream's unit takes the place of: its writers' and its depthwise convs'."""
    return group.writers + [n for n in group.through if n in by_name]


def _stream_unit(model: nn.Module, group: CoupledChannels, by_name: dict[str, Unit]) -> Unit | None:
    """The merged unit of one stream, or None (with a log line saying why) when it can't be."""
    first = group.writers[0]
    missing = [w for w in group.writers if w not in by_name]
    if missing:
        log.debug("stream of %s left uncoupled: writer(s) %s have no unit (excluded by the config)",
                  first, ", ".join(missing))
        return None
    replaced = [by_name[n] for n in _replaced(group, by_name)]
    odd = [u.name for u in replaced if not isinstance(u.pattern, Channel) or u.n_groups != group.width]
    if odd:
        log.debug("stream of %s left uncoupled: %s not channel unit(s) of the stream's width %d",
                  first, ", ".join(odd), group.width)
        return None
    sparsities = {u.sparsity for u in replaced}
    if len(sparsities) > 1:
        # the user asked for different sparsities per layer: one stream unit can't honour them all
        warnings.warn(f"residual stream of {first} left uncoupled: its layers have different fixed sparsities "
                      f"({', '.join(f'{u.name}={u.sparsity}' for u in replaced)}), so compress can cut only the "
                      "channels they happen to share", stacklevel=3)
        return None
    # a channel unit's row i is group i already (Channel.group_ids): stream channel i in every writer
    members = [m for u in replaced for m in u.members]
    for name in group.through:
        module = model.get_submodule(name)
        if isinstance(module, S.BATCHNORM_TYPES):
            members += _batchnorm_members(name, module)
    return Unit(f"stream:{first}", replaced[0].pattern, members, group.width,
                [d for u in replaced for d in u.erk_dims], sparsities.pop())


def _channel_ids(tensor: Tensor) -> Tensor:
    """Group ids of a per-channel tensor (dim 0 is the channel)."""
    return torch.arange(tensor.shape[0])
