"""Residual streams pruned as one: the channel units of a stream's writers merged into one unit.

Channel i of a residual stream is the sum of what every writer (the stem or downsample conv and
each block's last conv, each through its BatchNorm) puts there. ``compress`` can cut it only when
all of them are zero there, so pruning each writer on its own leaves the stream almost whole. One
unit per stream, with group i = row i of every writer, scores a channel by the mean over all the
writers' rows and prunes it everywhere at once.

The unit also masks the scale and shift of every BatchNorm the stream passes: a zero conv row
followed by a trained BatchNorm outputs ``β − γ·μ/σ``, a constant that a zero-padded reader (a
ResNet block's 3×3 conv) cannot fold, so without them compress would keep the channel anyway.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import batches as B
from .compression import surgery as S
from .compression.graph import CoupledChannels, channel_groups
from .patterns import Channel
from .targets import Member, Unit

log = logging.getLogger(__name__)


def couple_channel_units(model: nn.Module, units: list[Unit], example_input: Any) -> list[Unit]:
    """Merge the channel units of every residual stream's writers into one unit per stream.

    ``example_input`` is anything :func:`sparsenets.batches.run` takes: a tensor, an ``(x, y)``
    batch (``x`` is run) or a dict batch (run as ``model(**batch)``). It is moved to the model's
    device and run once in eval mode (BatchNorm statistics untouched) to find the streams.

    A stream is merged when every writer has a channel unit in ``units`` as wide as the stream
    and all share one fixed sparsity (or none). Its unit, named ``stream:<first writer>``, holds
    every writer's weight and bias members with group i = stream channel i, the weight and bias
    of any depthwise conv on the way that has a channel unit of its own, and, as non-scored
    members, the scale and shift of every BatchNorm on the way. It takes the place of the first
    of those units in ``units``; every other unit passes through unchanged.
    """
    by_name = {u.name: u for u in units}
    merged: dict[str, Unit] = {}  # name of a replaced unit -> its stream's unit
    for group in _groups(model, example_input):
        stream = _stream_unit(model, group, by_name)
        if stream is not None:
            merged.update({name: stream for name in _replaced(group, by_name)})
    out: list[Unit] = []
    placed: set[int] = set()  # by id: Unit's dataclass == would compare tensors
    for unit in units:
        stream = merged.get(unit.name, unit)
        if id(stream) not in placed:
            placed.add(id(stream))
            out.append(stream)
    return out


def _groups(model: nn.Module, example_input: Any) -> list[CoupledChannels]:
    """``channel_groups`` without side effects: a forward in train mode would update BatchNorm."""
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        return channel_groups(model, B.to_device(example_input, device))
    finally:
        for module, training in modes.items():
            module.training = training


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
            members += [Member(name, p, module, _channel_ids(t), is_weight=False)
                        for p in ("weight", "bias") if isinstance(t := getattr(module, p, None), Tensor)]
    return Unit(f"stream:{first}", replaced[0].pattern, members, group.width,
                [d for u in replaced for d in u.erk_dims], sparsities.pop())


def _channel_ids(tensor: Tensor) -> Tensor:
    """Group ids of a per-channel tensor (dim 0 is the channel)."""
    return torch.arange(tensor.shape[0])
