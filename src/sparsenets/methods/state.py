"""Model state by plain names: weights as the forward pass sees them, and masks to carry over.

A masked weight lives in ``module.parametrizations.<name>.original`` and its mask in a
parametrization; these helpers read and write them under the plain name (``fc1.weight``),
so a state can move between a dense and a masked copy of the same architecture.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..masking import attach, get_mask, masks, parametrization_list


def _tensor_names(module: nn.Module) -> list[str]:
    names = [n for n, t in module._parameters.items() if t is not None]
    names += [n for n, t in module._buffers.items() if t is not None]
    if parametrize.is_parametrized(module):
        names += list(cast(nn.ModuleDict, module.parametrizations))
    return names


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter and buffer under its plain name (``fc1.weight``), masks applied."""
    state = {}
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue
        for name in _tensor_names(module):
            state[f"{module_name}.{name}" if module_name else name] = getattr(module, name).detach().clone()
    return state


@torch.no_grad()
def rewind_(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Write a :func:`snapshot` back, in place. A masked weight's values go into
    ``parametrizations.<name>.original``, with zeros where it is masked."""
    for key, value in state.items():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        mask = get_mask(module, name)
        if mask is not None:
            parametrization_list(module, name).original.copy_(value * mask.mask)
        else:
            getattr(module, name).copy_(value)
    return model


def copy_masks(model: nn.Module) -> dict[str, tuple[Tensor, str]]:
    """``{"fc1.weight": (mask, pattern)}`` for every mask on ``model``."""
    return {f"{m}.{n}" if m else n: (mask.mask.clone(), mask.pattern) for m, _, n, mask in masks(model)}


def apply_masks(model: nn.Module, saved: dict[str, tuple[Tensor, str]]) -> nn.Module:
    """Put masks from :func:`copy_masks` on a model of the same architecture, in place."""
    for key, (mask, pattern) in saved.items():
        module_name, _, name = key.rpartition(".")
        attach(model.get_submodule(module_name), name, mask.clone(), pattern)
    return model
