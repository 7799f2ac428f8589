"""Activation density: the fraction of activations that are nonzero, measured with forward hooks.

A zero activation is a skipped multiply in the next layer, so the density of post-ReLU (or
:class:`~sparsenets.layers.topk.TopK`) outputs bounds what activation-sparse kernels can save.
For smooth activations (GELU, SiLU) nothing is exactly zero; ``threshold`` counts ``|a| <= threshold``
as zero. Activations applied functionally (``F.relu`` inside ``forward``) have no module to hook
and are not seen; wrap them in modules to measure them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from . import batches as B
from .errors import ConfigError
from .layers.topk import TopK

__all__ = ["ACTIVATION_TYPES", "activation_density", "input_density"]

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softshrink, nn.Hardshrink, TopK)


def _is_activation(module: nn.Module) -> bool:
    # Hugging Face models use their own activation classes (GELUActivation, NewGELUActivation, ...).
    return isinstance(module, ACTIVATION_TYPES) or type(module).__name__.endswith("Activation")


def activation_density(model: nn.Module, data: Iterable, threshold: float = 0.0,
                        max_batches: int | None = None) -> dict[str, float]:
    """Density (fraction of nonzero outputs, ``|a| > threshold``) of every activation module, by name;
    the activation sparsity is one minus it.

    ``data`` is an iterable of batches (``(x, y)`` tuples, tensors or dicts of keyword inputs);
    all of them are used unless ``max_batches`` is given. The model runs in eval mode without
    gradients, and its training flags are restored afterwards.
    """
    modules = [(name, m) for name, m in model.named_modules() if name and _is_activation(m)]
    return _density(model, modules, data, threshold, max_batches, of="output")


def input_density(model: nn.Module, modules: list[tuple[str, nn.Module]], data: Iterable,
                  threshold: float = 0.0, max_batches: int | None = 1) -> dict[str, float]:
    """Fraction of nonzero entries (``|x| > threshold``) in the first input of each named module."""
    return _density(model, modules, data, threshold, max_batches, of="input")


def _density(model: nn.Module, modules: list[tuple[str, nn.Module]], data: Iterable, threshold: float,
             max_batches: int | None, of: str) -> dict[str, float]:
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0, got {threshold!r}")
    counts: dict[str, list[int]] = {}  # name -> [nonzero, total]

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            value = (args[0] if args else None) if of == "input" else output
            value = value[0] if isinstance(value, (tuple, list)) else value
            if not isinstance(value, Tensor) or not value.is_floating_point():
                return
            count = counts.setdefault(name, [0, 0])
            count[0] += int((value.abs() > threshold).sum())
            count[1] += value.numel()
        return record

    B.observe(model, B.take(data, max_batches), [(m, hook(name)) for name, m in modules])
    return {name: nonzero / total for name, (nonzero, total) in counts.items() if total}
