"""Residual streams: channels that several layers write into one sum, cut as one group.

In a ResNet, channel i of a stage's stream is written by the stem (or the downsample
shortcut) and by the last conv + BatchNorm of every block, and read by each block's first
conv, the next downsample and the head. It can go only when every reader ignores it, sees
zero there, or sees a constant it folds into its bias. The constant is worked out node by
node from the writers' biases through BatchNorm, activations, pooling and the sums.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from ..gemm import is_hf_conv1d
from . import surgery as S
from .channels import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    IDENTITY_FUNCTIONS,
    IDENTITY_MODULES,
    POOLS,
    Reader,
    Shrunk,
    Step,
    _apply,
    _batchnorm,
    _call,
    _depthwise,
    _flattens,
    _only_input,
    _reads_only_batch_size,
    _Stop,
    _why,
    is_elementwise,
    traced_regions,
    usable_in,
)
from .probe import Calls, probe

ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class Stream:
    """The layers writing (``producers``) and reading one set of summed channels."""

    producers: dict[str, nn.Module] = field(default_factory=dict)
    readers: list[tuple[Reader, fx.Node]] = field(default_factory=list)
    through: list[nn.Module] = field(default_factory=list)  # BatchNorms, depthwise convs on the way
    steps: dict[fx.Node, Callable[[list[Tensor]], Tensor]] = field(default_factory=dict)
    inputs: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # the stream nodes each one reads
    flattened: set[fx.Node] = field(default_factory=set)  # flatten nodes: H·W inputs per channel after them

    def add(self, node: fx.Node, step: Callable[[list[Tensor]], Tensor], inputs: list[fx.Node]) -> list[fx.Node]:
        self.steps[node], self.inputs[node] = step, inputs
        return [node]

    @property
    def name(self) -> str:
        return next(iter(self.producers))

    def modules(self) -> list[nn.Module]:
        return [*self.producers.values(), *self.through, *(r.module for r, _ in self.readers)]

    def constants(self, node: fx.Node, memo: dict[fx.Node, Tensor]) -> Tensor:
        """Per channel, the constant at ``node`` (NaN where not constant)."""
        if node not in memo:
            memo[node] = self.steps[node]([self.constants(a, memo) for a in self.inputs[node]])
        return memo[node]


def _is_add(node: fx.Node) -> bool:
    adds = (node.op == "call_function" and node.target in ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))
    return adds and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


@dataclass
class _Walk:
    root: nn.Module
    prefix: str
    shapes: dict[nn.Module, Calls]
    usable: Callable[[str], bool]
    stream: Stream = field(default_factory=Stream)

    def qualname(self, node: fx.Node) -> str:
        return f"{self.prefix}.{node.target}" if self.prefix else cast(str, node.target)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.root.get_submodule(cast(str, node.target)) if node.op == "call_module" else None

    def grow(self, start: fx.Node) -> None:
        queue = self.stream.add(start, _sum, _args(start))
        while queue:
            node = queue.pop()
            for arg in self.stream.inputs[node]:
                if arg not in self.stream.steps:
                    queue += self._enter(arg, f"they come from `{arg.name}`, which is not a layer or a sum")
            for user in node.users:  # a layer may read the stream and write it too: x + layer(x)
                reads = user not in self.stream.steps or self._is_layer(user)
                if reads and not _reads_only_batch_size(user, node):
                    queue += self._read(user, node)

    def _is_layer(self, node: fx.Node) -> bool:
        module = self.module(node)
        return module is not None and S.is_gemm_layer(module)

    def _enter(self, node: fx.Node, why: str) -> list[fx.Node]:
        """Take ``node`` into the stream (met going backwards); returns it if it needs a visit."""
        module = self.module(node)
        if module is not None and S.is_gemm_layer(module):
            self._check_usable(node)
            self.stream.producers[self.qualname(node)] = module
            return self.stream.add(node, _producer(module), [])
        if _is_add(node):
            return self.stream.add(node, _sum, _args(node))
        step = self._channelwise(node)
        if step is None:
            raise _Stop(why)
        return self.stream.add(node, step, _args(node)[:1])

    def _read(self, user: fx.Node, node: fx.Node) -> list[fx.Node]:
        """Follow a use of the stream (met going forwards)."""
        if _is_add(user):
            return self._enter(user, "")
        _only_input(user, node)
        module = self.module(user)
        if module is not None and S.is_gemm_layer(module):
            self._check_usable(user)
            self.stream.readers.append((Reader(self.qualname(user), module), node))
            return []
        if _flattens(user, node, module):
            self.stream.flattened.add(user)
            return self.stream.add(user, _first, [node])
        return self._enter(user, _why(user))

    def _channelwise(self, node: fx.Node) -> Callable[[list[Tensor]], Tensor] | None:
        """The constant map of a layer or function acting on each channel alone, or None."""
        module = self.module(node)
        if module is not None:
            self._check_usable(node, stateless=is_elementwise(module) or isinstance(module, POOLS))
            return _unary(self._module_step(module))
        if node.op == "call_function" and node.target in IDENTITY_FUNCTIONS | ELEMENTWISE_FUNCTIONS:
            found: list[fx.Node] = []
            fx.node.map_arg((node.args[1:], node.kwargs), found.append)
            if found:
                return None
            kwargs = dict(node.kwargs)
            kwargs.pop("inplace", None)
            return _unary(_call(cast(Callable, node.target), node.args[1:], kwargs))
        if node.op == "call_method" and node.target in ELEMENTWISE_METHODS and len(node.args) == 1:
            return _unary(_apply(operator.methodcaller(cast(str, node.target).rstrip("_"))))
        return None

    def _module_step(self, module: nn.Module) -> Step:
        if isinstance(module, S.BATCHNORM_TYPES):
            self.stream.through.append(module)
            return _batchnorm(module)
        if S.is_depthwise(module):
            self.stream.through.append(module)
            return _depthwise(module)
        if isinstance(module, IDENTITY_MODULES + POOLS) and not isinstance(
                module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return lambda values: values
        if is_elementwise(module):
            return _apply(module)
        raise _Stop(f"they reach {type(module).__name__}, which the channel search does not follow")

    def _check_usable(self, node: fx.Node, stateless: bool = False) -> None:
        if not stateless and not self.usable(cast(str, node.target)):
            raise _Stop(f"{self.qualname(node)} is called twice or read as a tensor")


def _args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _sum(inputs: list[Tensor]) -> Tensor:
    return inputs[0] + inputs[1]


def _first(inputs: list[Tensor]) -> Tensor:
    return inputs[0]


def _unary(step: Step) -> Callable[[list[Tensor]], Tensor]:
    return lambda inputs: step(inputs[0])


def _producer(module: nn.Module) -> Callable[[list[Tensor]], Tensor]:
    return lambda _: torch.where(S.dead_outputs(module), S.bias_or_zeros(module), math.nan)


def stream_groups(prefix: str, root: nn.Module, graph: fx.Graph, shapes: dict[nn.Module, Calls],
                  usable: Callable[[str], bool], stopped: dict[str, str] | None = None) -> list[Stream]:
    """Every residual stream in a traced graph whose readers and writers can all be followed."""
    streams: list[Stream] = []
    seen: set[fx.Node] = set()
    for node in graph.nodes:
        if not _is_add(node) or node in seen:
            continue
        walk = _Walk(root, prefix, shapes, usable)
        try:
            walk.grow(node)
            _check_widths(walk.stream)
        except _Stop as stop:
            for name in walk.stream.producers:
                if stopped is not None:
                    stopped[name] = f"coupled by a residual sum to other layers, and that stream stops: {stop}"
            seen |= set(walk.stream.steps)
            continue
        seen |= set(walk.stream.steps)
        order = {walk.qualname(n): i for i, n in enumerate(graph.nodes) if n.op == "call_module"}
        walk.stream.producers = dict(sorted(walk.stream.producers.items(), key=lambda item: order[item[0]]))
        if walk.stream.readers:
            streams.append(walk.stream)
    return streams


def _check_widths(stream: Stream) -> None:
    """One channel axis: every writer has the same number of outputs, all convolutions or all not.

    A Linear after a flatten reads H·W inputs per channel: its width over the stream's.
    """
    widths = {S.n_outputs(m) for m in stream.producers.values()}
    if len(widths) != 1:
        raise _Stop("its writers have different widths")
    width = widths.pop()
    for reader, node in stream.readers:
        if node in stream.flattened:
            reader.spread, rest = divmod(S.n_inputs(reader.module), width)
            if rest:
                raise _Stop(f"{reader.name} reads a flatten of another width")
    convs = {isinstance(m, S.CONV_TYPES) for m in stream.producers.values()}
    readers = {isinstance(r.module, S.CONV_TYPES) or n in stream.flattened for r, n in stream.readers}
    if len(convs) != 1 or not readers <= convs or (stream.through and convs != {True}):
        raise _Stop("the channels sit on different axes")


def shrink_stream(stream: Stream) -> Shrunk:
    """Cut the stream's removable channels from every writer, pass-through layer and reader."""
    memo: dict[fx.Node, Tensor] = {}
    plans = []
    width = S.n_outputs(stream.producers[stream.name])
    removable = torch.ones(width, dtype=torch.bool)
    for reader, node in stream.readers:
        at_reader = stream.constants(node, memo)
        free = S.unused_inputs(reader.module, reader.spread) | (at_reader == 0)
        removable &= free | (torch.isfinite(at_reader) & S.can_fold(reader.module))
        plans.append((reader, at_reader, free))
    if removable.all():
        removable[0] = False  # keep one channel: a layer with no outputs is not a layer
    kept = _why_kept(stream, removable, plans)
    if not removable.any():
        return Shrunk(None, kept)
    keep = (~removable).nonzero().squeeze(1)
    for reader, at_reader, free in plans:
        fold = removable & ~free
        if fold.any():
            S.fold_constant_inputs(reader.module, fold.nonzero().squeeze(1), at_reader[fold], reader.spread)
        S.keep_inputs(reader.module, keep, reader.spread)
    for module in stream.through:
        S.keep_channels(module, keep)
    for module in stream.producers.values():
        S.keep_outputs(module, keep)
    writers = ", ".join(stream.producers)
    return Shrunk(f"residual stream written by {writers}: removed {int(removable.sum())} of {width} channels "
                  f"(and inputs of {', '.join(r.name for r, _ in stream.readers)})", kept)


def _why_kept(stream: Stream, removable: Tensor, plans: list) -> list[str]:
    """Per writer with zero rows that stay: which other writer or reader still uses them."""
    notes = []
    for name, module in stream.producers.items():
        kept = S.dead_outputs(module) & ~removable
        if not kept.any():
            continue
        channel = int(kept.nonzero()[0])
        live = [other for other, m in stream.producers.items() if not bool(S.dead_outputs(m)[channel])]
        if live:
            why = f"coupled by the residual stream to {live[0]}, which still writes them"
        else:
            readers = [r.name for r, _, free in plans if not bool(free[channel])]
            why = (f"every writer of the residual stream is zero there, but {readers[0]} still reads "
                   "a constant it cannot fold" if readers else "one channel stays so that the layers keep one")
        notes.append(f"{name}: {int(kept.sum())} zero channels kept: {why}")
    return notes


# ---- for users -------------------------------------------------------------------------------------


@dataclass
class CoupledChannels:
    """Channels that must be pruned together: one residual stream's writers, pass-through layers and readers."""

    writers: list[str]
    readers: list[str]
    through: list[str]  # BatchNorms and depthwise convolutions the channels pass
    width: int

    def zero_(self, model: nn.Module, channels: list[int] | Tensor) -> None:
        """Zero ``channels`` in every writer (rows and bias) and every BatchNorm on the way (scale
        and shift), so that the stream is exactly zero there and ``compress`` removes them."""
        index = torch.as_tensor(channels, dtype=torch.long)
        with torch.no_grad():
            for name in self.writers + self.through:
                module = model.get_submodule(name)
                for tensor in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if isinstance(tensor, Tensor):
                        rows = tensor.t() if is_hf_conv1d(module) and tensor.dim() == 2 else tensor
                        rows.index_fill_(0, index.to(tensor.device), 0)


def channel_groups(model: nn.Module, example_input: Any) -> list[CoupledChannels]:
    """The residual streams of ``model`` that ``compress`` can cut, each as one coupled group.

    Zero a group's channels together (:meth:`CoupledChannels.zero_`) and ``compress`` removes
    them from every writer, BatchNorm and reader at once.
    """
    shapes = probe(model, example_input)
    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    for prefix, root, graph in traced_regions(model):
        for stream in stream_groups(prefix, root, graph, shapes, usable_in(root, graph, set())):
            through = [names[id(m)] for m in stream.through]
            groups.append(CoupledChannels(list(stream.producers), [r.name for r, _ in stream.readers], through,
                                          S.n_outputs(stream.producers[stream.name])))
    return groups
