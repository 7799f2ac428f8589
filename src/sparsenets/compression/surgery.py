"""Cutting layers down: drop outputs or inputs of Linear, Conv, HF ``Conv1D`` and BatchNorm layers.

Every function edits a module in place and keeps its attributes (``in_features``,
``out_channels``, ...) in step with its tensors, so the module's own forward still works.
A removed input whose value is a known constant is *folded* into the bias first, so the
layer's output does not change.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from ..gemm import is_hf_conv1d
from ..record import set_record

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d


def is_gemm_layer(module: nn.Module) -> bool:
    """A layer whose outputs and inputs we can cut: Linear, ungrouped Conv, HF Conv1D."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    return isinstance(module, CONV_TYPES) and module.groups == 1


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one filter per input channel: channel i in, channel i out."""
    return (isinstance(module, CONV_TYPES) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def weight_of(module: nn.Module) -> Tensor:
    """The ``weight`` of a layer known to have one (torch types module attributes as ``Tensor | Module``)."""
    return cast(Tensor, module.weight)


def _out_dim(module: nn.Module) -> int:
    return 1 if is_hf_conv1d(module) else 0  # HF Conv1D stores in × out


def _in_dim(module: nn.Module) -> int:
    return 0 if is_hf_conv1d(module) else 1


def n_outputs(module: nn.Module) -> int:
    return weight_of(module).shape[_out_dim(module)]


def n_inputs(module: nn.Module) -> int:
    return weight_of(module).shape[_in_dim(module)]


def dead_outputs(module: nn.Module) -> Tensor:
    """Bool per output: its weights are all zero, so it always outputs its bias (or 0)."""
    weight = weight_of(module).detach().movedim(_out_dim(module), 0)
    return ~weight.reshape(weight.shape[0], -1).any(dim=1)


def bias_or_zeros(module: nn.Module) -> Tensor:
    bias = getattr(module, "bias", None)
    if bias is None:
        return weight_of(module).new_zeros(n_outputs(module))
    return bias.detach().clone()


def unused_inputs(module: nn.Module, spread: int = 1) -> Tensor:
    """Bool per input channel (``spread`` consecutive inputs each): all its weights are zero."""
    weight = weight_of(module).detach().movedim(_in_dim(module), 0)
    return ~weight.reshape(weight.shape[0] // spread, -1).any(dim=1)


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    set_record(module, resized=True)  # tells load() that these shapes differ from the dense model's
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous())


def keep_outputs(module: nn.Module, keep: Tensor) -> None:
    """Keep only the outputs ``keep`` (sorted indices) of a GEMM layer."""
    _replace(module, "weight", weight_of(module).detach().index_select(_out_dim(module), keep))
    bias: Tensor | None = getattr(module, "bias", None)
    if bias is not None:
        _replace(module, "bias", bias.detach()[keep])
    _set_size(module, "out", keep.numel())


def keep_inputs(module: nn.Module, keep: Tensor, spread: int = 1) -> None:
    """Keep only the input channels ``keep`` of a GEMM layer (each ``spread`` inputs wide)."""
    columns = (keep[:, None] * spread + torch.arange(spread, device=keep.device)).reshape(-1)
    _replace(module, "weight", weight_of(module).detach().index_select(_in_dim(module), columns))
    _set_size(module, "in", columns.numel())


def _set_size(module: nn.Module, side: str, size: int) -> None:
    """Record a new output (``side="out"``) or input width in the layer's own attribute."""
    hf, linear, conv = {"out": ("nf", "out_features", "out_channels"), "in": ("nx", "in_features", "in_channels")}[side]
    setattr(module, hf if is_hf_conv1d(module) else linear if isinstance(module, nn.Linear) else conv, size)


def can_fold(module: nn.Module) -> bool:
    """Whether a constant input channel can move into the bias exactly.

    A convolution padding with zeros sees a constant channel as non-constant near the border,
    unless there is no padding; the other padding modes repeat the constant.
    """
    if isinstance(module, CONV_TYPES) and module.padding_mode == "zeros":
        padding = module.padding
        return padding == "valid" or (not isinstance(padding, str) and all(p == 0 for p in padding))
    return True


def fold_constant_inputs(module: nn.Module, channels: Tensor, values: Tensor, spread: int = 1) -> None:
    """Add to the bias what input ``channels`` contribute when they hold ``values`` (constants)."""
    weight = weight_of(module).detach().movedim(_in_dim(module), 1)  # out × in × ...
    weight = weight.reshape(weight.shape[0], weight.shape[1] // spread, -1)  # out × channel × rest
    contribution = (weight[:, channels] * values.to(weight.dtype)[None, :, None]).sum(dim=(1, 2))
    bias = getattr(module, "bias", None)
    if bias is None:
        set_record(module, resized=True)
        module.bias = nn.Parameter(contribution, requires_grad=weight_of(module).requires_grad)
    else:
        _replace(module, "bias", bias.detach() + contribution)


def merge_constant_inputs(module: nn.Module, target: int, sources: Tensor, values: Tensor) -> None:
    """Make input ``target`` carry what input ``sources`` contribute, all being constant planes.

    Constant planes (zero-padded alike) are multiples of each other, so weights move over
    scaled by ``values[source] / values[target]``; the sources can then be removed.
    """
    weight = weight_of(module).detach().clone()
    dim = _in_dim(module)
    scale = (values[sources] / values[target]).to(weight.dtype)
    moved = (weight.index_select(dim, sources) * scale.reshape([-1 if d == dim else 1 for d in range(weight.dim())]))
    weight.select(dim, target).add_(moved.sum(dim))
    _replace(module, "weight", weight)


def keep_batchnorm_channels(norm: BatchNorm, keep: Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(norm, name, None) is not None:
            _replace(norm, name, getattr(norm, name).detach()[keep])
    norm.num_features = keep.numel()


def keep_channels(module: nn.Module, keep: Tensor) -> None:
    """Keep channels ``keep`` of a layer that maps channel i to channel i (BatchNorm, depthwise conv)."""
    if isinstance(module, BATCHNORM_TYPES):
        keep_batchnorm_channels(module, keep)
        return
    keep_outputs(module, keep)  # a depthwise filter is one output row
    for size in ("in_channels", "groups"):
        setattr(module, size, keep.numel())

