"""Removing whole neurons and channels, together with everything that indexes them.

A *channel group* is one layer's outputs plus what reads them: the BatchNorms and depthwise
convolutions on the way and the input columns of every layer downstream. Groups are found by
tracing with torch.fx (on the largest submodules that trace) and from the known layout of
transformer feed-forward blocks, plain and gated. Anything a trace can't account for (a
concatenation, the model's output, a reshape that names a size) ends the search and the layer
stays whole; sums of several layers' outputs are residual streams (:mod:`.graph`).

An output channel can go when every reader either ignores it (its input weights are zero)
or sees a known constant there: zero, or a value that folds into the reader's bias. A layer
whose weight row is zero outputs its bias, so "dead" channels are constants, not zeros; the
constant is carried through activations, BatchNorm (eval mode) and depthwise convolutions to
each reader. In a gated block ``act(gate)·up`` is zero when either factor is a zero constant.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..gemm import is_hf_conv1d
from . import surgery as S
from .probe import Calls

Step = Callable[[Tensor], Tensor]  # what happens to per-channel constants (NaN = not constant)

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Identity,
)
# Hugging Face activations (transformers.activations), matched by name: all parameter-free.
HF_ELEMENTWISE = {
    "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
    "PytorchGELUTanh", "ClippedGELUActivation", "AccurateGELUActivation", "SiLUActivation",
    "MishActivation", "LinearActivation", "ReLUSquaredActivation", "LaplaceActivation",
}
IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.mish, F.softplus, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid,
}
IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def is_elementwise(fn: object) -> bool:
    """A parameter-free function applied to each element on its own (an activation)."""
    if isinstance(fn, nn.Module):
        return isinstance(fn, ELEMENTWISE_MODULES + IDENTITY_MODULES) or type(fn).__name__ in HF_ELEMENTWISE
    return fn in ELEMENTWISE_FUNCTIONS or fn in IDENTITY_FUNCTIONS


def _apply(fn: Callable) -> Step:
    def step(values: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(values.clone())
    return step


def _call(fn: Callable, args: tuple, kwargs: dict) -> Step:
    """``fn(values, *args, **kwargs)``, bound now: steps run after the walk has moved on to other users."""
    return _apply(lambda values: fn(values, *args, **kwargs))


def _batchnorm(norm: S.BatchNorm) -> Step:
    def step(values: Tensor) -> Tensor:
        if norm.running_mean is None:  # normalizes with batch statistics: not a constant map
            return torch.full_like(values, math.nan)
        with torch.no_grad():
            return F.batch_norm(values[None], norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                False, 0.0, norm.eps)[0]
    return step


def _depthwise(conv: nn.Module) -> Step:
    """A depthwise convolution maps channel i to channel i: a zero filter outputs its bias; a
    constant input stays constant where padding can't disturb it (always for zero inputs)."""
    def step(values: Tensor) -> Tensor:
        weight = S.weight_of(conv).detach()  # read now: another group may have cut it since
        dead, bias = S.dead_outputs(conv), S.bias_or_zeros(conv)
        moved = values * weight.reshape(weight.shape[0], -1).sum(dim=1) + bias
        out = moved if S.can_fold(conv) else torch.where(values == 0, bias, math.nan)
        return torch.where(dead, bias, out)
    return step


def _pool(pool: nn.Module) -> Step:
    # Max and adaptive pools map a constant plane to itself; average pooling with zero
    # padding counted in does not (the border averages in the padding), except for zeros.
    padded = getattr(pool, "padding", 0)
    exact = not isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) or (
        getattr(pool, "divisor_override", None) is None
        and (not pool.count_include_pad or all(p == 0 for p in _tuple(padded))))

    def step(values: Tensor) -> Tensor:
        return values if exact else torch.where(values == 0, values, math.nan)
    return step


def _tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@dataclass
class Reader:
    """A layer reading a group's channels, ``spread`` consecutive inputs per channel."""

    name: str
    module: nn.Module
    spread: int = 1
    steps: tuple[Step, ...] = ()

    def constants(self, values: Tensor) -> Tensor:
        for step in self.steps:
            values = step(values)
        return values


@dataclass
class ChannelGroup:
    """A producer's output channels, the per-channel layers they pass through, and their readers.

    ``through`` holds BatchNorms and depthwise convolutions on the way (cut along with the
    channels). A gated group computes ``gate_step(gate(x)) * producer(x)`` before its readers.
    """

    name: str
    producer: nn.Module
    readers: list[Reader]
    through: list[nn.Module] = field(default_factory=list)
    gate: nn.Module | None = None
    gate_step: Step | None = None

    def modules(self) -> list[nn.Module]:
        gate = [self.gate] if self.gate is not None else []
        return [self.producer, *gate, *self.through, *(r.module for r in self.readers)]


@dataclass
class Shrunk:
    """What :func:`shrink_group` did: a line for what went and one for zero channels kept."""

    removed: str | None = None
    kept: list[str] = field(default_factory=list)


def _constants(group: ChannelGroup) -> Tensor:
    """Per channel, the constant the readers' input sees before their own steps (NaN: not constant).

    Gated: ``act(g)·u`` is zero when either factor is a zero constant, whatever the other is.
    """
    values = torch.where(S.dead_outputs(group.producer), S.bias_or_zeros(group.producer), math.nan)
    if group.gate is None or group.gate_step is None:
        return values
    gate = S.bias_or_zeros(group.gate)
    gate = group.gate_step(torch.where(S.dead_outputs(group.gate), gate, math.nan))
    return torch.where((values == 0) | (gate == 0), 0.0, values * gate)


def shrink_group(group: ChannelGroup) -> Shrunk:
    """Remove the group's removable channels; says what went and which zero channels stayed."""
    values = _constants(group)
    constant = torch.isfinite(values)
    zero_rows = _zero_rows(group)
    removable = torch.ones_like(constant)
    plans = []
    for reader in group.readers:
        at_reader = reader.constants(values)
        free = S.unused_inputs(reader.module, reader.spread) | (at_reader == 0)
        foldable = torch.isfinite(at_reader) & S.can_fold(reader.module)
        removable &= free | foldable
        plans.append((reader, at_reader, free))
    merged = _merge_constants(plans[0], constant, removable) if len(plans) == 1 else torch.zeros_like(constant)
    removable |= merged
    if removable.all():  # keep one channel: a layer with no outputs is not a layer
        removable[int(torch.argmin(constant.to(torch.int8)))] = False
    kept = _why_kept(group, zero_rows & ~removable, values, plans)
    if not removable.any():
        return Shrunk(None, kept)
    keep = (~removable).nonzero().squeeze(1)
    for reader, at_reader, free in plans:
        fold = removable & ~free & ~merged
        if fold.any():
            S.fold_constant_inputs(reader.module, fold.nonzero().squeeze(1), at_reader[fold], reader.spread)
        S.keep_inputs(reader.module, keep, reader.spread)
    for module in group.through:
        S.keep_channels(module, keep)
    for producer in (group.producer, group.gate):
        if producer is not None:
            S.keep_outputs(producer, keep)
    readers = ", ".join(r.name for r in group.readers)
    return Shrunk(f"{group.name}: removed {int(removable.sum())} of {removable.numel()} outputs "
                  f"(and inputs of {readers})", kept)


def _zero_rows(group: ChannelGroup) -> Tensor:
    """Channels some producer of the group has no weights for: what a channel mask zeroed."""
    dead = S.dead_outputs(group.producer)
    return dead | S.dead_outputs(group.gate) if group.gate is not None else dead


def _why_kept(group: ChannelGroup, kept: Tensor, values: Tensor, plans: list) -> list[str]:
    """One line on why zero channels stayed (``kept``): the reason that applies to most."""
    count = int(kept.sum())
    if not count:
        return []
    reasons: Counter[str] = Counter()
    for channel in kept.nonzero().squeeze(1).tolist():
        reasons[_reason(group, channel, values, plans)] += 1
    reason = reasons.most_common(1)[0][0]
    return [f"{group.name}: {count} zero channels kept: {reason}"]


def _reason(group: ChannelGroup, channel: int, values: Tensor, plans: list) -> str:
    if group.gate is not None and not math.isfinite(float(values[channel])):
        if bool(S.dead_outputs(group.gate)[channel]):
            return ("the gate row is zero but act(gate bias) is not 0 and the up row is not zero, "
                    "so act(gate)·up is not constant")
        return "the up row is zero but its bias is not, and the gate row is not zero"
    for reader, at_reader, free in plans:
        if bool(free[channel]):
            continue
        value = float(at_reader[channel])
        if math.isfinite(value):
            return (f"{reader.name} still reads them and sees a constant {value:.3g} that a zero-padded "
                    "convolution cannot fold (it is not constant at the border)")
        return f"{reader.name} still reads them and they are not constant there"
    return "one channel stays so that the layer keeps an output"


def _merge_constants(plan: tuple[Reader, Tensor, Tensor], constant: Tensor, removable: Tensor) -> Tensor:
    """Constant channels a padded convolution reads: all but one can go (see merge_constant_inputs)."""
    reader, at_reader, _ = plan
    merge = constant & torch.isfinite(at_reader) & (at_reader != 0) & ~removable
    if int(merge.sum()) < 2 or reader.spread != 1:
        return torch.zeros_like(merge)
    target = int(torch.argmax(torch.where(merge, at_reader.abs(), -1.0)))
    merge[target] = False
    S.merge_constant_inputs(reader.module, target, merge.nonzero().squeeze(1), at_reader)
    return merge


# ---- known transformer feed-forward blocks -------------------------------------------------------


def feedforward_groups(model: nn.Module) -> Iterator[ChannelGroup]:
    """The hidden neurons of known transformer MLPs, found by their attribute names.

    Plain: ``out(act(inner(x)))`` — BERT/ViT ``intermediate.dense``/``output.dense``, GPT-2
    ``c_fc``/``c_proj``, OPT ``fc1``/``fc2``, T5 ``wi``/``wo``, torch ``linear1``/``linear2``.
    Gated: ``down(act(gate(x)) * up(x))`` — Llama, Mistral, Qwen2 ``gate_proj``/``up_proj``/
    ``down_proj``, T5 ``wi_0``/``wi_1``/``wo``.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for layout in (_intermediate, _gpt2, _pair("fc1", "fc2", "activation_fn"), _pair("wi", "wo", "act"),
                       _torch_layer, _gated("gate_proj", "up_proj", "down_proj", "act_fn"),
                       _gated("wi_0", "wi_1", "wo", "act")):
            if group := layout(prefix, module):
                yield group
                break


Layout = Callable[[str, nn.Module], "ChannelGroup | None"]


def _linear(module: object) -> bool:
    return isinstance(module, nn.Linear)


def _intermediate(prefix: str, module: nn.Module) -> ChannelGroup | None:
    inter: Any = getattr(module, "intermediate", None)
    out: Any = getattr(module, "output", None)
    if (_linear(getattr(inter, "dense", None)) and _linear(getattr(out, "dense", None))
            and is_elementwise(getattr(inter, "intermediate_act_fn", None))):
        return ChannelGroup(f"{prefix}intermediate.dense", inter.dense,
                            [Reader(f"{prefix}output.dense", out.dense, 1, (_apply(inter.intermediate_act_fn),))])
    return None


def _gpt2(prefix: str, module: nn.Module) -> ChannelGroup | None:
    fc, proj, act = (getattr(module, a, None) for a in ("c_fc", "c_proj", "act"))
    if is_hf_conv1d(fc) and is_hf_conv1d(proj) and is_elementwise(act):
        return ChannelGroup(f"{prefix}c_fc", cast(nn.Module, fc),
                            [Reader(f"{prefix}c_proj", cast(nn.Module, proj), 1, (_apply(cast(nn.Module, act)),))])
    return None


def _torch_layer(prefix: str, module: nn.Module) -> ChannelGroup | None:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and is_elementwise(
            module.activation):
        return ChannelGroup(f"{prefix}linear1", module.linear1,
                            [Reader(f"{prefix}linear2", module.linear2, 1, (_apply(module.activation),))])
    return None


def _pair(inner: str, outer: str, act: str) -> Layout:
    """``outer(act(inner(x)))``, Dropout allowed between (identity in eval mode)."""
    def layout(prefix: str, module: nn.Module) -> ChannelGroup | None:
        first, second, fn = (getattr(module, a, None) for a in (inner, outer, act))
        if _linear(first) and _linear(second) and is_elementwise(fn):
            return ChannelGroup(f"{prefix}{inner}", cast(nn.Module, first),
                                [Reader(f"{prefix}{outer}", cast(nn.Module, second), 1, (_apply(cast(Callable, fn)),))])
        return None
    return layout


def _gated(gate: str, up: str, down: str, act: str) -> Layout:
    """``down(act(gate(x)) * up(x))``: a hidden channel is zero when its up row is zero (no bias),
    or its gate row is zero with ``act(gate bias or 0) == 0`` (SiLU, GELU, ReLU of 0)."""
    def layout(prefix: str, module: nn.Module) -> ChannelGroup | None:
        g, u, d, fn = (getattr(module, a, None) for a in (gate, up, down, act))
        if _linear(g) and _linear(u) and _linear(d) and is_elementwise(fn):
            return ChannelGroup(f"{prefix}{up}", cast(nn.Module, u), [Reader(f"{prefix}{down}", cast(nn.Module, d))],
                                gate=cast(nn.Module, g), gate_step=_apply(cast(Callable, fn)))
        return None
    return layout


# ---- traced models ---------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Stops at torch layers, HF Conv1D and known activations; everything else is inlined."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(module, qualname) or is_hf_conv1d(module) or is_elementwise(module)


def traced_regions(model: nn.Module) -> Iterator[tuple[str, nn.Module, fx.Graph]]:
    """The largest submodules that torch.fx traces, each with its graph (top-down search)."""
    tracer = _Tracer()

    def visit(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module, fx.Graph]]:
        if tracer.is_leaf_module(module, prefix) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = tracer.trace(module)
        except Exception:  # noqa: BLE001 - any failure just means "look inside"
            for name, child in module.named_children():
                yield from visit(f"{prefix}.{name}" if prefix else name, child)
            return
        yield prefix, module, graph

    yield from visit("", model)


class _Stop(Exception):
    """The channels reach something we can't follow."""


class _Output(_Stop):
    """The channels are outputs of the traced region."""


def _stop_at(user: fx.Node) -> _Stop:
    return (_Output if user.op == "output" else _Stop)(_why(user))


@dataclass
class _Search:
    root: nn.Module
    prefix: str
    usable: Callable[[str], bool]
    shapes: dict[nn.Module, Calls]
    readers: list[Reader] = field(default_factory=list)
    through: list[nn.Module] = field(default_factory=list)

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(cast(str, node.target))  # a call_module node's target: its name

    def qualname(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def output_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        calls = self.shapes.get(module)
        return calls.output_shape if calls else None


def graph_groups(prefix: str, root: nn.Module, graph: fx.Graph, shapes: dict[nn.Module, Calls],
                 shared: set[int], stopped: dict[str, str] | None = None) -> list[ChannelGroup]:
    """Channel groups of every layer in a traced graph whose channels can be followed to their readers.

    ``stopped`` receives, per layer whose channels could not be followed, what stopped them.
    """
    usable = usable_in(root, graph, shared)
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or not usable(node.target):
            continue
        module = root.get_submodule(node.target)
        if not S.is_gemm_layer(module):
            continue
        search = _Search(root, prefix, usable, shapes)
        shape = search.output_shape(module)
        axes = {1} if isinstance(module, S.CONV_TYPES) else {-1}
        if shape is not None and len(shape) == 2:
            axes = {1, -1}
        try:
            _follow(node, search, axes, shape, 1, ())
        except _Stop as stop:
            if stopped is not None:  # the model's own outputs need no explanation: ""
                model_output = isinstance(stop, _Output) and not prefix
                stopped[search.qualname(node.target)] = "" if model_output else str(stop)
            continue
        if search.readers:
            groups.append(ChannelGroup(search.qualname(node.target), module, search.readers, search.through))
    return groups


def usable_in(root: nn.Module, graph: fx.Graph, shared: set[int]) -> Callable[[str], bool]:
    """Whether a layer of the graph may be cut: called once, its weights not read as tensors
    elsewhere, not shared with another path."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attrs = [n.target for n in graph.nodes if n.op == "get_attr" and not _reads_only_metadata(n)]

    def usable(target: str) -> bool:
        return (calls[target] == 1 and id(root.get_submodule(target)) not in shared
                and not any(a == target or a.startswith(target + ".") for a in attrs))
    return usable


def _reads_only_metadata(node: fx.Node) -> bool:
    """A weight read only for its dtype or device (T5's cast before ``wo``), or not at all."""
    return all(u.op == "call_function" and u.target is getattr and u.args[1:] in (("dtype",), ("device",))
               for u in node.users)


def _why(user: fx.Node) -> str:
    """What a channel search stopped at, in words."""
    if user.op == "output":
        return "they are outputs of a traced region (the model output or a residual stream)"
    name = getattr(user.target, "__name__", str(user.target))
    if user.op == "call_function" and user.target in (operator.add, operator.iadd, torch.add):
        return "they join a residual sum with other layers' outputs"
    if name in ("cat", "concat", "stack"):
        return f"they are concatenated ({name})"
    return f"they reach `{name}` ({user.op}), which the channel search does not follow"


def _only_input(user: fx.Node, node: fx.Node) -> None:
    """``node`` must be the first argument of ``user`` and appear nowhere else in its arguments."""
    others: list[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), others.append)
    if not user.args or user.args[0] is not node or node in others:
        raise _stop_at(user)


def _constant_args(user: fx.Node) -> None:
    """Every argument after the first is a plain constant (not another tensor)."""
    found: list[fx.Node] = []
    fx.node.map_arg((user.args[1:], user.kwargs), found.append)
    if found:
        raise _stop_at(user)


def _reads_only_batch_size(user: fx.Node, node: fx.Node) -> bool:
    """``x.size(0)``, ``x.shape[0]``: reads that stay true when channels go."""
    if user.op == "call_method" and user.target == "size" and len(user.args) == 2 and user.args[1] == 0:
        return True
    whole = (user.op == "call_method" and user.target == "size" and len(user.args) == 1) or (
        user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",))
    return whole and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                         for u in user.users)


def _is_batch_size(arg: object, node: fx.Node) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size" and arg.args == (node, 0):
        return True
    return bool(arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0
                and isinstance(arg.args[0], fx.Node) and arg.args[0].args[:1] == (node,))


def _flattens(user: fx.Node, node: fx.Node, module: nn.Module | None) -> bool:
    """``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``."""
    if module is not None:
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    args, kwargs = user.args, user.kwargs
    if (user.op == "call_function" and user.target is torch.flatten) or (
            user.op == "call_method" and user.target == "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return bool(start == 1 and end == -1)
    if user.op == "call_method" and user.target in ("view", "reshape"):
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return bool(len(sizes) == 2 and _is_batch_size(sizes[0], node) and sizes[1] == -1)
    return False


def _follow(node: fx.Node, search: _Search, axes: set[int], shape: tuple[int, ...] | None,
            spread: int, steps: tuple[Step, ...]) -> None:
    """Walk every use of ``node``'s channels (at ``axes``) to the layers that read them."""
    for user in node.users:
        if _reads_only_batch_size(user, node):
            continue
        _only_input(user, node)
        module = search.module(user) if user.op == "call_module" else None
        target = cast(str, user.target)  # the module's name when module is not None
        stateless = module is not None and (is_elementwise(module) or isinstance(module, (POOLS, nn.Flatten)))
        if module is not None and not stateless and not search.usable(target):
            raise _Stop(f"{search.qualname(target)} is called twice or read as a tensor")
        if module is not None and S.is_gemm_layer(module):
            wanted = 1 if isinstance(module, S.CONV_TYPES) else -1
            if wanted not in axes or (wanted == 1 and spread != 1):
                raise _Stop(f"{search.qualname(target)} reads them along another axis")
            search.readers.append(Reader(search.qualname(target), module, spread, steps))
        elif module is not None and S.is_depthwise(module):
            if 1 not in axes or spread != 1:
                raise _Stop(f"{search.qualname(target)} reads them along another axis")
            search.through.append(module)
            _follow(user, search, {1}, search.output_shape(module), spread, steps + (_depthwise(module),))
        elif _flattens(user, node, module):
            if shape is None or 1 not in axes or spread != 1:
                raise _Stop("a flatten whose sizes are unknown")
            inner = math.prod(shape[2:])
            _follow(user, search, {1, -1}, (shape[0], math.prod(shape[1:])), inner, steps)
        elif module is not None and isinstance(module, S.BATCHNORM_TYPES):
            if 1 not in axes or spread != 1:
                raise _Stop(f"{search.qualname(target)} normalizes another axis")
            search.through.append(module)
            _follow(user, search, axes, shape, spread, steps + (_batchnorm(module),))
        elif module is not None and isinstance(module, POOLS):
            if 1 not in axes or spread != 1 or shape is None or len(shape) < 3:
                raise _Stop(f"{search.qualname(target)} pools another axis")
            _follow(user, search, {1}, search.output_shape(module), spread, steps + (_pool(module),))
        elif module is not None and isinstance(module, IDENTITY_MODULES):
            _follow(user, search, axes, shape, spread, steps)
        elif module is not None and is_elementwise(module):
            _follow(user, search, axes, shape, spread, steps + (_apply(module),))
        elif user.op == "call_function" and user.target in IDENTITY_FUNCTIONS:
            _constant_args(user)
            _follow(user, search, axes, shape, spread, steps)
        elif user.op == "call_function" and user.target in ELEMENTWISE_FUNCTIONS:
            _constant_args(user)
            fn, args, kwargs = user.target, user.args[1:], dict(user.kwargs)
            kwargs.pop("inplace", None)
            _follow(user, search, axes, shape, spread, steps + (_call(fn, args, kwargs),))
        elif user.op == "call_method" and user.target in ELEMENTWISE_METHODS and len(user.args) == 1:
            method = user.target.rstrip("_")
            _follow(user, search, axes, shape, spread, steps + (_apply(operator.methodcaller(method)),))
        else:
            raise _stop_at(user)
