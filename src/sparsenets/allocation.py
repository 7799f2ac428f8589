"""Allocation: how much sparsity each layer gets.

An allocation is one function registered with :func:`allocation`: given the units whose
sparsity is free and the overall target, it returns each unit's sparsity, or None for units
that share one score threshold (which selection applies, :func:`sparsenets.sparsify.select`).
``SparsityConfig`` takes its choices from :data:`ALLOCATIONS`. Layers with a fixed sparsity
(an override, or an N:M pattern) keep it, and the target applies to the rest. An allocation
registered with ``outliers=True`` also gets each unit's outlier ratio (:func:`outlier_ratio` of
its criterion scores) as a third argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .errors import ConfigError
from .targets import Unit

Split = Callable[..., dict[str, "float | None"]]
ALLOCATIONS: dict[str, Split] = {}
OUTLIER_ALLOCATIONS: set[str] = set()  # allocations that read each unit's outlier ratio


def allocation(name: str, *, outliers: bool = False) -> Callable[[Split], Split]:
    """Register ``split(free_units, sparsity[, outliers]) -> {unit name: sparsity or None}`` under ``name``."""
    def register(split: Split) -> Split:
        ALLOCATIONS[name] = split
        if outliers:
            OUTLIER_ALLOCATIONS.add(name)
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


# OWL's defaults (Yin et al. 2024): a score is an outlier above M × its layer's mean score, and
# layer densities spread over ±LAMBDA around the target, in the order of their outlier ratios.
OWL_M = 5.0
OWL_LAMBDA = 0.08


def outlier_ratio(scores: Sequence[Tensor]) -> float:
    """The share of live scores above ``OWL_M`` × their mean (already pruned entries, −inf, left out)."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    live = flat[torch.isfinite(flat)]
    if not len(live):
        return 0.0
    return float((live > OWL_M * live.mean()).float().mean())


@allocation("owl", outliers=True)
def owl(units: list[Unit], sparsity: float, outliers: dict[str, float]) -> dict[str, float | None]:
    """Outlier-weighted layer-wise sparsity (Yin et al. 2024): layers with more outlier scores
    keep more weights. Densities are spread linearly over ±``OWL_LAMBDA`` by outlier ratio, then
    shifted so the parameter-weighted density is the target's."""
    ratios = torch.tensor([outliers[u.name] for u in units], dtype=torch.float64)
    sizes = torch.tensor([u.numel for u in units], dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    normal = (ratios - ratios.min()) / spread if spread > 0 else torch.full_like(ratios, 0.5)
    density = (1.0 - sparsity) + OWL_LAMBDA * (2 * normal - 1)
    density += (1.0 - sparsity) - (density * sizes).sum() / sizes.sum()
    density = density.clamp(0.0, 1.0)
    return {u.name: 1.0 - float(d) for u, d in zip(units, density)}


def layer_sparsities(units: list[Unit], sparsity: float, allocation: str,
                     outliers: dict[str, float] | None = None) -> dict[str, float | None]:
    """Each unit's target sparsity; ``None`` marks units that share one global threshold.
    ``outliers`` (unit name → outlier ratio) is what allocations such as OWL read."""
    fixed: dict[str, float | None] = {u.name: u.sparsity for u in units if u.sparsity is not None}
    free = [u for u in units if u.sparsity is None]
    if not free:
        return fixed
    if allocation in OUTLIER_ALLOCATIONS:
        if outliers is None:
            raise ConfigError(f"allocation {allocation!r} needs each layer's outlier ratio")
        return {**fixed, **ALLOCATIONS[allocation](free, sparsity, outliers)}
    return {**fixed, **ALLOCATIONS[allocation](free, sparsity)}
