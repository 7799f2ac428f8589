"""Allocation: how much sparsity each layer gets.

``uniform`` gives every layer the target; ``erk`` scales densities by the Erdős–Rényi-kernel
ratio (Evci et al. 2020); ``global`` leaves the split to one score threshold over all layers,
which selection applies (:func:`sparsenets.sparsify.select`). Layers with a fixed sparsity
(an override, or an N:M pattern) keep it, and the target applies to the rest.
"""

from __future__ import annotations

import math

from .targets import Unit


def erk_ratio(unit: Unit) -> float:
    """(Σ dims) / (Π dims) of the weight; summed over the weights of multi-weight units."""
    return sum(sum(d) for d in unit.erk_dims) / sum(math.prod(d) for d in unit.erk_dims)


def erk_densities(units: list[Unit], density: float) -> dict[str, float]:
    """Densities ∝ ERK ratio with overall ``density``; layers that would exceed 1 stay dense."""
    sizes = {u.name: u.numel for u in units}
    ratios = {u.name: erk_ratio(u) for u in units}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in sizes if n not in dense]
        if not free:
            return {n: 1.0 for n in sizes}
        scale = (budget - sum(sizes[n] for n in dense)) / sum(ratios[n] * sizes[n] for n in free)
        capped = {n for n in free if scale * ratios[n] > 1.0}
        if not capped:
            return {n: 1.0 if n in dense else scale * ratios[n] for n in sizes}
        dense |= capped


def layer_sparsities(units: list[Unit], sparsity: float, allocation: str) -> dict[str, float | None]:
    """Each unit's target sparsity; ``None`` marks units that share one global threshold."""
    fixed = {u.name: u.sparsity for u in units if u.sparsity is not None}
    free = [u for u in units if u.sparsity is None]
    if allocation == "global":
        return {**fixed, **{u.name: None for u in free}}
    if allocation == "erk" and free:
        return {**fixed, **{n: 1.0 - d for n, d in erk_densities(free, 1.0 - sparsity).items()}}
    return {**fixed, **{u.name: sparsity for u in free}}
