"""Sparse training from scratch: a fixed sparse mask (static), or one that moves (SET, RigL).

All three mask the network at construction with the config's criterion and allocation (the
random-pruning baseline of Liu et al. 2022 is ``criterion="random", allocation="erk"``; a dict
config gets the same defaults as :class:`~sparsenets.SparsityConfig`) and train it at that
sparsity throughout. The dynamic ones rewire every ``update_every`` updates:

- :class:`SET` (Mocanu et al. 2018) drops the fraction ζ of the smallest-magnitude active weights
  of every layer and regrows as many at random inactive positions.
- :class:`RigL` (Evci et al. 2020) drops α·(1 + cos(πt/T_end))/2 of them, until ``end_step``, and
  regrows where the magnitude of the dense gradient (w.r.t. the effective weight) is largest.

With a ``block:RxC`` pattern whole blocks are dropped (lowest mean |w|) and grown (largest norm of
the dense gradient for RigL, at random for SET). Every update swaps equal numbers of equally sized
groups, so each layer's sparsity is exactly what it was; it grows only where the mask was off before
the update; regrown weights start at zero with their optimizer state (momentum, Adam moments) zeroed.

``mode="fast"`` (block patterns) trains on block-sparse layers instead of masks: each ``nn.Linear``
becomes a :class:`~sparsenets.layers.BlockSparseLinear` (each ``nn.Conv1d``/``nn.Conv2d`` a
block-sparse convolution) whose forward and backward run on its kept blocks only, and
drop-and-grow rewrites its block layout in place (see :mod:`.groups`). The same seed gives the
same training in both modes, up to floating-point rounding.

In your own loop, build the optimizer after the method (masking moves ``weight`` into
``parametrizations.weight.original``; fast mode replaces layers), and tell the method about it.
Under DDP, wrap the model between the two; RigL sums the dense gradients over the ranks before regrowing::

    method = RigL(model, {"sparsity": 0.9, "criterion": "random", "allocation": "erk"},
                  update_every=100, end_step=0.75 * total_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.on_train_begin(model, optimizer)
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        method.step(step)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import LossFn
from ..config import SparsityConfig, as_config
from ..errors import ConfigError, PatternError
from ..integrations import distributed
from ..sparsify import sparsify_
from ..targets import find_units
from .base import Method
from .groups import BlockGroups, MaskedGroups, check_mode, rewirable_groups


def _config(config: SparsityConfig | dict | str) -> SparsityConfig:
    config = as_config(config)
    if not config.target_pattern.supports_rewiring:
        raise PatternError(f"sparse training supports the unstructured and block:RxC patterns, "
                           f"not {str(config.pattern)!r}")
    return config


class StaticSparse(Method):
    """Static sparse training: mask at construction, then never change the mask.

    ``mode``: ``"masked"`` (any layer, dense compute under masks) or ``"fast"`` (block patterns:
    ``nn.Linear`` layers become block-sparse layers that compute only their kept blocks).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str,
                 data: Iterable | None = None, loss_fn: LossFn | None = None, *, mode: str = "masked") -> None:
        super().__init__(model, _config(config), data, loss_fn)
        check_mode(mode, self.config)
        sparsify_(model, self.config, data, loss_fn)
        self.mode = mode
        self.groups: list[MaskedGroups | BlockGroups] = rewirable_groups(model, find_units(model, self.config), mode)
        self.optimizer: Any = None

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        self.optimizer = optimizer


class DynamicSparse(StaticSparse):
    """Drop-and-grow every ``update_every`` updates up to ``end_step`` (None: to the end).

    Subclasses say how much to drop at a step and how to score the growth candidates.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, update_every: int = 100, drop_fraction: float = 0.3,
                 end_step: int | float | None = None, mode: str = "masked") -> None:
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every must be an integer >= 1, got {update_every!r}")
        if not 0.0 < drop_fraction < 1.0:
            raise ConfigError(f"drop_fraction must be in (0, 1), got {drop_fraction!r}")
        if end_step is not None and end_step < 1:
            raise ConfigError(f"end_step must be >= 1 (or None), got {end_step!r}")
        super().__init__(model, config, data, loss_fn, mode=mode)
        self.update_every, self.drop_fraction = update_every, drop_fraction
        self.end_step = None if end_step is None else int(end_step)
        self.last_step = 0
        self.updates: list[dict[str, Any]] = []  # per update: step and weights moved per layer

    # ---- the schedule ----------------------------------------------------------------------------

    def is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0 and (self.end_step is None or step < self.end_step)

    def drop_fraction_at(self, step: int) -> float:
        return self.drop_fraction

    # ---- hooks -----------------------------------------------------------------------------------

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        super().on_train_begin(model, optimizer)
        self._prepare(self.last_step + 1)

    def step(self, step: int) -> None:
        self.last_step = step
        if self.is_update_step(step):
            self.update(step)
        self._prepare(step + 1)

    def _prepare(self, next_step: int) -> None:
        """Called before the forward pass of ``next_step``; RigL arms its gradient capture here."""

    # ---- one update ------------------------------------------------------------------------------

    def grow_scores(self, groups: MaskedGroups | BlockGroups, step: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Drop and regrow in every layer, now."""
        fraction = self.drop_fraction_at(step)
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) % 2**63)
        moved = {}
        for groups in self.groups:
            if fraction > 0:
                moved[groups.name] = self._rewire(groups, fraction, self.grow_scores(groups, step, generator))
        self.updates.append({"step": step, "fraction": fraction, "moved": moved})

    def _rewire(self, groups: MaskedGroups | BlockGroups, fraction: float, grow_scores: Tensor) -> int:
        active, magnitude, sizes = groups.active(), groups.magnitudes(), groups.sizes()
        new_active = active.clone()
        # swap equally sized groups only (edge blocks with edge blocks), so the count stays exact
        for size in torch.unique(sizes):
            same = sizes == size
            on, off = torch.nonzero(same & active).flatten(), torch.nonzero(same & ~active).flatten()
            count = min(round(fraction * len(on)), len(off))
            if count == 0:
                continue
            drop = on[torch.argsort(magnitude[on], stable=True)[:count]]
            grow = off[torch.argsort(grow_scores[off], descending=True, stable=True)[:count]]
            new_active[drop] = False
            new_active[grow] = True
        distributed.broadcast_([new_active])  # a guard: ranks decide alike, ties included, or take rank 0's
        return groups.move(new_active, self.optimizer)


class SET(DynamicSparse):
    """Sparse Evolutionary Training: drop the smallest ``drop_fraction`` (ζ), regrow at random."""

    def grow_scores(self, groups: MaskedGroups | BlockGroups, step: int, generator: torch.Generator) -> Tensor:
        return torch.rand(groups.n_groups, generator=generator, dtype=torch.float64)


class RigL(DynamicSparse):
    """Rigged Lottery: drop on a cosine-decaying fraction, regrow where the dense gradient is largest.

    The dense gradient is the gradient w.r.t. the effective (masked) weight, which is nonzero at
    inactive positions too; a group's growth score is its mean square (its norm, for comparing
    groups of one size). It is captured by hooks that are on only for the forward and backward
    pass of an update step, so the model can be copied or pickled between updates. In fast mode
    it comes from each layer's input and output gradient, block by block (:mod:`..kernels.block_norms`).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, update_every: int = 100, drop_fraction: float = 0.3,
                 end_step: int | float | None = None, mode: str = "masked") -> None:
        super().__init__(model, config, data, loss_fn, update_every=update_every, drop_fraction=drop_fraction,
                         end_step=end_step, mode=mode)
        self._handles: list[Any] = []

    def drop_fraction_at(self, step: int) -> float:
        if self.end_step is None:
            return self.drop_fraction
        return self.drop_fraction * (1.0 + math.cos(math.pi * step / self.end_step)) / 2.0

    def _prepare(self, next_step: int) -> None:
        self._release()
        if self.is_update_step(next_step):
            for groups in self.groups:
                self._handles += groups.capture_gradients()

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def grow_scores(self, groups: MaskedGroups | BlockGroups, step: int, generator: torch.Generator) -> Tensor:
        return groups.gradient_scores()

    def update(self, step: int) -> None:
        try:
            super().update(step)
        finally:
            for groups in self.groups:
                groups.clear()
