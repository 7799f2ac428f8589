"""Lottery tickets: iterative magnitude pruning with rewinding, and its two controls.

Frankle & Carbin (2019) train, prune a fraction p of the remaining weights, rewind the
survivors to their initial values θ0 and train again, level after level. Frankle et al.
(2020) rewind to an early iterate θ_k instead ("late rewinding"), which lets tickets be
found in larger networks. The controls tell a ticket from any sparse network of the same
size: the same mask with a fresh initialisation (:func:`reinitialize`), and a random mask
with the same per-layer densities (:func:`random_prune`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ..batches import LossFn
from ..config import SparsityConfig, as_config
from ..errors import ConfigError
from ..integrations import distributed
from ..masking import get_mask
from ..patterns import Pattern
from ..sparsify import sparsify_
from ..targets import Member, find_units
from .base import Method, config_at
from .state import apply_masks, copy_masks, rewind_, snapshot


def level_sparsities(final: float, prune_fraction: float = 0.2) -> list[float]:
    """s_l = 1 − (1 − p)^l for l = 1, 2, ... until ``final``, the last one capped at ``final``."""
    if not 0.0 < prune_fraction < 1.0:
        raise ConfigError(f"prune_fraction must be in (0, 1), got {prune_fraction!r}")
    levels: list[float] = []
    while not levels or levels[-1] < final - 1e-12:
        levels.append(min(1.0 - (1.0 - prune_fraction) ** (len(levels) + 1), final))
    return levels


def level_configs(config: SparsityConfig | dict | str, prune_fraction: float = 0.2) -> list[SparsityConfig]:
    """The config of each level, one per distinct pruning step (N:M steps through n:M)."""
    config = as_config(config)
    out: list[SparsityConfig] = []
    for sparsity in level_sparsities(config.target_sparsity, prune_fraction):
        level = config_at(config, sparsity)
        if level is not None and (not out or level.to_dict() != out[-1].to_dict()):
            out.append(level)
    return out


class LotteryTicket(Method):
    """Iterative magnitude pruning with rewinding to update ``rewind_step`` (0: the initialisation θ0).

    Each level prunes ``prune_fraction`` of the remaining weights with the config's criterion
    and rewinds the survivors; levels continue until the config's sparsity::

        ticket = LotteryTicket(model, {"sparsity": 0.9}, prune_fraction=0.2, rewind_step=0)
        train(model, step_hook=ticket.step)          # records θ_k at update k
        while not ticket.done:
            ticket.next_level()                       # prune, then rewind to θ_k
            train(model, start=ticket.rewind_step)    # fresh optimizer; schedule from update k
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, prune_fraction: float = 0.2, rewind_step: int = 0,
                 rewind_point: dict[str, Tensor] | None = None, level: int = 0) -> None:
        super().__init__(model, config, data, loss_fn)
        if rewind_step < 0:
            raise ConfigError(f"rewind_step must be >= 0, got {rewind_step!r}")
        self.levels = level_configs(self.config, prune_fraction)
        self.prune_fraction = prune_fraction
        self.rewind_step = rewind_step
        self.level = level  # levels already done; with ``rewind_point``, resumes a saved search
        if rewind_point is None and rewind_step == 0:
            rewind_point = _shared_snapshot(model)
        self.rewind_point = rewind_point
        self.reserve_masks()

    @property
    def done(self) -> bool:
        return self.level >= len(self.levels)

    def step(self, step: int) -> None:
        if step == self.rewind_step and self.rewind_point is None:
            self.rewind_point = _shared_snapshot(self.model)

    def next_level(self) -> SparsityConfig:
        """Prune the trained model to the next level's sparsity and rewind it; returns that level's config."""
        if self.done:
            raise RuntimeError(f"all {len(self.levels)} levels are done (sparsity {self.config.sparsity:g})")
        if self.rewind_point is None:
            raise RuntimeError(f"no weights recorded at update {self.rewind_step}: call step(step) after "
                               f"every optimizer step of the first training run")
        config = self.levels[self.level]
        sparsify_(self.model, config, self.data, self.loss_fn)
        rewind_(self.model, self.rewind_point)
        self.level += 1
        return config


def _shared_snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A :func:`snapshot`, rank 0's under a process group: θ0 is taken before DDP syncs the ranks' weights."""
    state = snapshot(model)
    distributed.broadcast_(state.values())
    return state


# ---- controls ----------------------------------------------------------------------------------


def reinitialize(ticket: nn.Module, fresh: nn.Module) -> nn.Module:
    """Random reinitialisation control: ``fresh`` (same architecture, new initial weights) gets the
    ticket's masks, in place; returns ``fresh``."""
    return apply_masks(fresh, copy_masks(ticket))


def layer_sparsities(model: nn.Module, config: SparsityConfig) -> dict[str, float]:
    """The sparsity each unit of ``config`` has on ``model`` now, by unit (layer) name."""
    out = {}
    for unit in find_units(model, config):
        out[unit.name] = 1.0 - sum(_kept(m) for m in unit.weights) / unit.numel
    return out


def _kept(member: Member) -> int:
    """How many elements of a weight its mask keeps (all of them when it has no mask)."""
    mask = get_mask(member.module, member.param)
    return int(mask.mask.sum()) if mask is not None else member.tensor().numel()


def random_prune(model: nn.Module, ticket: nn.Module, config: SparsityConfig | dict | str, seed: int = 0) -> nn.Module:
    """Random pruning control: mask ``model`` (e.g. at θ0) at random, in place, with the ticket's
    per-layer sparsity and ``config``'s patterns (the ticket's level config)."""
    config = as_config(config)
    sparsities = layer_sparsities(ticket, config)
    overrides = {}
    # deeper names first: an override glob also matches a layer's children, and the first match wins
    for name in sorted(sparsities, key=lambda n: -n.count(".")):
        pattern = config.pattern_for(name)
        # None: an override of sparsity 0 keeps this layer dense in the ticket; keep it dense here too
        overrides[name] = _same_level(pattern, sparsities[name]) if pattern is not None else {"sparsity": 0.0}
    random_config = dataclasses.replace(config, criterion="random", allocation="uniform", seed=seed,
                                        overrides=overrides, rounds=1)
    return sparsify_(model, random_config)


def _same_level(pattern: Pattern, sparsity: float) -> dict[str, Any]:
    """An override that repeats a layer's pattern and sparsity: a fixed-density pattern (N:M) sets
    the sparsity itself, and an attention-wide pattern (head) can only be the config's own."""
    override: dict[str, Any] = {} if pattern.fixed_density is not None else {"sparsity": sparsity}
    if pattern.scope == "layer":
        override["pattern"] = pattern
    return override
