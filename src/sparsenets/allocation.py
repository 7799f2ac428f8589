"""Allocation: how much sparsity each layer gets.

An allocation is one function registered with :func:`allocation`: given the units whose
sparsity is free and the overall target, it returns each unit's sparsity, or None for units
that share one score threshold (which selection applies, :func:`sparsenets.sparsify.select`).
``SparsityConfig`` takes its choices from :data:`ALLOCATIONS`. Layers with a fixed sparsity
(an override, or an N:M pattern) keep it, and the target applies to the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .targets import Unit

Split = Callable[[list[Unit], float], dict[str, "float | None"]]
ALLOCATIONS: dict[str, Split] = {}


def allocation(name: str) -> Callable[[Split], Split]:
    """Register ``split(free_units, sparsity) -> {unit name: sparsity or None}`` under ``name``."""
    def register(split: Split) -> Split:
        ALLOCATIONS[name] = split
        return split
    return register


@allocation("uniform")
def uniform(units: list[Unit], sparsity: float) -> dict[str, float | None]:
    """The same sparsity in every layer."""
    return {u.name: sparsity for u in units}


@allocation("global")
def global_threshold(units: list[Unit], sparsity: float) -> dict[str, float | None]:
    """One score threshold over all layers: selection decides each layer's share."""
    return {u.name: None for u in units}


@allocation("erk")
def erk(units: list[Unit], sparsity: float) -> dict[str, float | None]:
    """Erdős–Rényi-kernel densities (Evci et al. 2020)."""
    return {n: 1.0 - d for n, d in erk_densities(units, 1.0 - sparsity).items()}


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
    return {**fixed, **(ALLOCATIONS[allocation](free, sparsity) if free else {})}
