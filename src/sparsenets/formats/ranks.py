"""Ranks for the layers of a model from one parameter budget.

Each layer is described by three numbers: ``costs[name]``, the parameters one unit of rank costs
(``m + n`` for an ``m × n`` weight), ``dense[name]``, its dense parameters (``m·n``), and
``spectra[name]``, the gain of each further rank (``σ_k²`` of the weight, see
:func:`sparsenets.formats.low_rank.spectrum`). :func:`allocate_ranks` spends
``budget × Σ dense`` parameters on them; a layer whose rank would cost as much as its dense
weight stays dense (``None``).
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["ALLOCATIONS", "allocate_ranks"]

ALLOCATIONS = ("uniform", "energy", "sensitivity")


def _check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ConfigError(f"budget must be a fraction of the dense parameters in (0, 1], got {budget!r}")
    return float(budget)


def _check_count(value: Any, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}['{name}'] must be an integer >= 1, got {value!r}")
    return value


def _gains(spectrum: Any, name: str) -> list[float]:
    """The layer's gains as floats, largest first (SVD order, whatever order they came in)."""
    s = torch.as_tensor(spectrum).detach().to(device="cpu", dtype=torch.float64)
    if s.dim() != 1 or s.numel() == 0:
        raise ConfigError(f"spectra['{name}'] must be a non-empty 1-d tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ConfigError(f"spectra['{name}'] must be finite and >= 0, got min {s.min().item()}")
    return s.sort(descending=True).values.tolist()


def allocate_ranks(spectra: dict[str, Tensor], costs: dict[str, int], dense: dict[str, int], budget: float,
                   allocation: str = "uniform") -> dict[str, int | None]:
    """``{name: rank}``, or ``{name: None}`` for a layer best kept dense, within ``budget``.

    The factorised layers (``rank · costs``) and the dense ones (``dense``) together hold at most
    ``budget × Σ dense`` parameters; the one exception is that every layer gets rank 1 at least,
    so a budget below ``Σ costs / Σ dense`` cannot be met. A rank never exceeds the layer's full
    rank (the spectrum's length).

    * ``"uniform"``: rank ``⌊budget · dense / cost⌋`` in every layer, the same compression each.
    * ``"energy"``: ranks go one at a time to the layer whose next singular value keeps the most
      of that layer's energy per parameter, ``(σ_k² / ‖W‖²_F) / cost``: layers whose energy sits
      in a few directions get low ranks, layers with flat spectra high ones.
    * ``"sensitivity"``: the same with the gains unnormalised, ``σ_k² / cost``, for spectra of
      Fisher-weighted weights, whose ``σ_k²`` estimate the loss increase of dropping direction k.

    In the greedy allocations, the step at which a layer's rank would cost its dense parameters
    turns it dense instead (costing the difference, gaining all its remaining spectrum), and ranks
    that gain nothing (beyond the weight's own rank) are not bought. Ties go to the layer named
    first, then to the lower rank.
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    fraction = _check_budget(budget)
    if set(costs) != set(spectra) or set(dense) != set(spectra):
        odd = sorted(set(spectra) ^ set(costs) | set(spectra) ^ set(dense))
        raise ConfigError(f"spectra, costs and dense must name the same layers; not in all three: {odd}")
    gains = {name: _gains(s, name) for name, s in spectra.items()}
    unit = {name: _check_count(costs[name], "costs", name) for name in spectra}
    full = {name: _check_count(dense[name], "dense", name) for name in spectra}
    if allocation == "uniform":
        ranks: dict[str, int | None] = {
            name: min(len(gains[name]), max(1, math.floor(fraction * full[name] / unit[name]))) for name in spectra}
    else:
        ranks = _greedy(gains, unit, full, fraction * sum(full.values()), normalise=allocation == "energy")
    return {name: None if r is None or r * unit[name] >= full[name] else r for name, r in ranks.items()}


def _greedy(gains: dict[str, list[float]], unit: dict[str, int], full: dict[str, int], limit: float,
            normalise: bool) -> dict[str, int | None]:
    """Ranks from 1 up, best gain per parameter first, within ``limit`` parameters (None: dense)."""
    if normalise:  # each layer's fraction of its own energy; an all-zero layer gains nothing
        gains = {n: [g / total for g in s] if (total := sum(s)) > 0 else [0.0] * len(s) for n, s in gains.items()}
    ranks: dict[str, int | None] = {n: None if unit[n] >= full[n] else 1 for n in gains}
    spent = sum(full[n] if r is None else unit[n] for n, r in ranks.items())
    order = {name: i for i, name in enumerate(gains)}
    heap: list[tuple[float, int, int, int, str]] = []  # (-gain per parameter, layer order, rank, cost, name)

    def offer(name: str) -> None:
        """Queue the layer's next step: one more rank, or turning dense where that costs as much."""
        r, s, cost = ranks[name], gains[name], unit[name]
        if r is None or r >= len(s):  # dense, or exact already
            return
        if (r + 1) * cost >= full[name]:
            gain, step, after = sum(s[r:]), full[name] - r * cost, 0  # 0 stands for dense
        else:
            gain, step, after = s[r], cost, r + 1
        if gain > 0:
            heapq.heappush(heap, (-gain / step, order[name], after, step, name))

    for name in gains:
        offer(name)
    while heap:
        _, _, after, step, name = heapq.heappop(heap)
        if spent + step > limit:
            continue  # this layer stops here; cheaper steps of other layers may still fit
        spent += step
        ranks[name] = after or None
        offer(name)
    return ranks
