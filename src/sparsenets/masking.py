"""Masks on any model through ``torch.nn.utils.parametrize``: the user's model code is untouched.

A masked weight is ``original * mask`` in every forward, so it is exactly zero where masked
and its gradient there is zero. state_dict keys are parametrize's own
(``parametrizations.weight.original`` and ``parametrizations.weight.0.mask``), deepcopy works,
and pickling works too (parametrize alone refuses it; see :func:`_make_picklable`).

Masks cost (almost) nothing in training: rather than a masked copy of the weight in every forward
and a masked copy of its gradient in every backward, ``original`` itself is kept zero where masked
and the forward returns it as it is (:mod:`.mask_upkeep` says how that stays exact). Where that
can't apply (torch.compile, a sharded or non-leaf tensor, another parametrization before the
mask) the forward multiplies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import mask_upkeep as upkeep
from .errors import SparsenetsError
from .integrations.distributed import like


class Mask(nn.Module):
    """The parametrization: the tensor with the entries of a fixed boolean mask zero."""

    mask: Tensor

    def __init__(self, mask: Tensor, pattern: str = "unstructured") -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))
        self.pattern = pattern
        self.known = upkeep.Known()

    def forward(self, tensor: Tensor) -> Tensor:
        if not upkeep.applies(tensor, self.mask):
            return tensor * like(self.mask, tensor)  # a sharded (FSDP) weight takes its shard of the mask
        upkeep.keep_zero(tensor, self)
        return tensor.view_as(tensor)  # a fresh node per forward, so hooks on the output stay per forward

    def right_inverse(self, tensor: Tensor) -> Tensor:
        return tensor

    def extra_repr(self) -> str:
        density = self.mask.float().mean().item()
        return f"pattern={self.pattern}, density={density:.4f}"


def parametrization_list(module: nn.Module, name: str) -> parametrize.ParametrizationList:
    """``module.parametrizations[name]`` of a parametrized module."""
    return cast(parametrize.ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])


def get_mask(module: nn.Module, name: str) -> Mask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in parametrization_list(module, name) if isinstance(p, Mask)), None)


def masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Mask]]:
    """Every mask on ``model``: (module name, module, tensor name, Mask)."""
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                mask = get_mask(module, name)
                if mask is not None:
                    yield module_name, module, name, mask


def attach(module: nn.Module, name: str, mask: Tensor, pattern: str) -> None:
    """Mask ``module.<name>``, or replace its mask. Masked entries of the stored tensor are zeroed."""
    current = get_mask(module, name)
    if current is not None:
        current.mask.copy_(mask)
        current.pattern = pattern
    else:
        tensor = getattr(module, name)
        current = Mask(mask.to(tensor.device), pattern)
        parametrize.register_parametrization(module, name, current)
        _make_picklable(module)
    with torch.no_grad():
        original = parametrization_list(module, name).original
        original.mul_(like(current.mask, original))


def finalize_(model: nn.Module) -> nn.Module:
    """Bake masks into the weights and remove the masking machinery, in place; returns ``model``."""
    for _, module, name, _ in list(masks(model)):
        others = [p for p in parametrization_list(module, name) if not isinstance(p, Mask)]
        if others:
            raise SparsenetsError(f"{type(module).__name__}.{name} has other parametrizations "
                             f"({[type(p).__name__ for p in others]}); remove them first")
        upkeep.release(get_mask(module, name))
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


# ---- copying and pickling --------------------------------------------------------------------
# parametrize swaps a module's class for a dynamically made subclass that holds the property.
# Two consequences we repair: pickle cannot name that class, and torch's deepcopy shares it
# between original and copy, so finalizing the copy would strip the original's property.


def _own_class(cls: type) -> type:
    return type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def _state(module: nn.Module) -> dict:
    # recurrent layers cache their weights (and weak references to them); under a mask those are
    # computed tensors, which can be neither deep-copied nor pickled: the copy rebuilds the cache
    if isinstance(module, nn.RNNBase):
        return {k: v for k, v in module.__dict__.items() if k not in ("_flat_weights", "_flat_weight_refs")}
    return module.__dict__


def _rebuild_flat_weights(module: nn.Module) -> None:
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def _deepcopy_masked(module: nn.Module, memo: dict) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    replica: nn.Module = module.__new__(_own_class(type(module)))
    memo[id(module)] = replica
    replica.__dict__ = copy.deepcopy(_state(module), memo)
    _rebuild_flat_weights(replica)
    return replica


def _reduce_masked(module: nn.Module, protocol: int) -> tuple:
    return _rebuild_masked, (type(module).__bases__[0], _state(module))


def _rebuild_masked(cls: type[nn.Module], state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    parametrize._inject_new_class(module)
    for name in cast(nn.ModuleDict, module.parametrizations):
        parametrize._inject_property(module, name)
    _make_picklable(module)
    _rebuild_flat_weights(module)
    return module


def _make_picklable(module: nn.Module) -> None:
    cls: Any = type(module)  # parametrize's subclass made for this module alone
    cls.__reduce_ex__ = _reduce_masked
    cls.__deepcopy__ = _deepcopy_masked
