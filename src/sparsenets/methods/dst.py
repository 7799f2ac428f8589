"""Sparse training from scratch: a fixed sparse mask (static), or one that moves (SET, RigL).

All three mask the network at construction with the config's criterion and allocation (the
random-pruning baseline of Liu et al. 2022 is ``criterion="random", allocation="erk"``; a dict
config gets the same defaults as :class:`~sparsenets.SparsityConfig`) and train it at that
sparsity throughout. The dynamic ones rewire every ``update_every`` updates:

- :class:`SET` (Mocanu et al. 2018) drops the fraction ζ of the smallest-magnitude active weights
  of every layer and regrows as many at random inactive positions.
- :class:`RigL` (Evci et al. 2020) drops α·(1 + cos(πt/T_end))/2 of them, until ``end_step``, and
  regrows where the magnitude of the dense gradient (w.r.t. the effective weight) is largest.

With a ``block:RxC`` pattern whole blocks are dropped (lowest mean |w|) and grown (highest mean
|grad| for RigL, at random for SET). Every update swaps equal numbers of equally sized groups, so each
layer's sparsity is exactly what it was; it grows only where the mask was off before the update;
regrown weights start at zero with their optimizer state (momentum, Adam moments) zeroed.

In your own loop, build the optimizer after the method (masking moves ``weight`` into
``parametrizations.weight.original``), and tell the method about it. Under DDP, wrap the model
between the two; RigL sums the dense gradients over the ranks before regrowing::

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
from ..masking import Mask, get_mask, parametrization_list
from ..sparsify import sparsify_
from ..targets import Unit, find_units
from .base import Method


def _config(config: SparsityConfig | dict | str) -> SparsityConfig:
    config = as_config(config)
    if not config.target_pattern.supports_rewiring:
        raise PatternError(f"sparse training supports the unstructured and block:RxC patterns, "
                           f"not {str(config.pattern)!r}")
    return config


def _mask(module: nn.Module, name: str) -> Mask:
    """The mask on ``module.<name>``, which the method put on every weight it rewires."""
    mask = get_mask(module, name)
    if mask is None:
        raise RuntimeError(f"{type(module).__name__}.{name} has no mask to rewire (was it finalized?)")
    return mask


class StaticSparse(Method):
    """Static sparse training: mask at construction, then never change the mask."""

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str,
                 data: Iterable | None = None, loss_fn: LossFn | None = None) -> None:
        super().__init__(model, _config(config), data, loss_fn)
        sparsify_(model, self.config, data, loss_fn)
        self.units: list[Unit] = find_units(model, self.config)
        self.optimizer: Any = None

    def on_train_begin(self, model: nn.Module, optimizer: Any) -> None:
        self.optimizer = optimizer


class DynamicSparse(StaticSparse):
    """Drop-and-grow every ``update_every`` updates up to ``end_step`` (None: to the end).

    Subclasses say how much to drop at a step and how to score the growth candidates.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, update_every: int = 100, drop_fraction: float = 0.3,
                 end_step: int | float | None = None) -> None:
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every must be an integer >= 1, got {update_every!r}")
        if not 0.0 < drop_fraction < 1.0:
            raise ConfigError(f"drop_fraction must be in (0, 1), got {drop_fraction!r}")
        if end_step is not None and end_step < 1:
            raise ConfigError(f"end_step must be >= 1 (or None), got {end_step!r}")
        super().__init__(model, config, data, loss_fn)
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

    def grow_scores(self, unit: Unit, step: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Drop and regrow in every layer, now."""
        fraction = self.drop_fraction_at(step)
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) % 2**63)
        moved = {}
        for unit in self.units:
            if fraction > 0:
                moved[unit.name] = self._update_unit(unit, fraction, self.grow_scores(unit, step, generator))
        self.updates.append({"step": step, "fraction": fraction, "moved": moved})

    def _update_unit(self, unit: Unit, fraction: float, grow_scores: Tensor) -> int:
        active = unit.group_scores({m.qualname: _mask(m.module, m.param).mask.cpu().double()
                                    for m in unit.weights}) > 0.5
        magnitude = unit.group_scores({m.qualname: distributed.full(m.tensor()).abs().cpu() for m in unit.weights})
        sizes = unit.group_sizes()
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
        masks = unit.expand(new_active)  # group scores live on the CPU; _apply moves masks to the weights
        return sum(self._apply(m.module, m.param, masks[m.qualname]) for m in unit.weights)

    def _apply(self, module: nn.Module, name: str, new_mask: Tensor) -> int:
        """Write the new mask in place; zero the weights that left or joined and the joiners' optimizer state."""
        mask = _mask(module, name)
        original = parametrization_list(module, name).original
        new_mask = new_mask.to(mask.mask.device)
        grown = new_mask & ~mask.mask
        changed = new_mask ^ mask.mask
        mask.mask.copy_(new_mask)
        original.masked_fill_(distributed.like(changed, original), 0.0)  # like: this rank's shard under FSDP
        if self.optimizer is not None:
            for value in self.optimizer.state.get(original, {}).values():
                if isinstance(value, Tensor) and value.shape == original.shape:
                    value.masked_fill_(distributed.like(grown, value), 0.0)
        return int(grown.sum())


class SET(DynamicSparse):
    """Sparse Evolutionary Training: drop the smallest ``drop_fraction`` (ζ), regrow at random."""

    def grow_scores(self, unit: Unit, step: int, generator: torch.Generator) -> Tensor:
        return torch.rand(unit.n_groups, generator=generator, dtype=torch.float64)


class RigL(DynamicSparse):
    """Rigged Lottery: drop on a cosine-decaying fraction, regrow where the dense gradient is largest.

    The dense gradient is the gradient w.r.t. the effective (masked) weight, which is nonzero at
    inactive positions too; it is captured by hooks that are on only for the forward and backward
    pass of an update step, so the model can be copied or pickled between updates.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, update_every: int = 100, drop_fraction: float = 0.3,
                 end_step: int | float | None = None) -> None:
        super().__init__(model, config, data, loss_fn, update_every=update_every, drop_fraction=drop_fraction,
                         end_step=end_step)
        self.dense_grads: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def drop_fraction_at(self, step: int) -> float:
        if self.end_step is None:
            return self.drop_fraction
        return self.drop_fraction * (1.0 + math.cos(math.pi * step / self.end_step)) / 2.0

    def _prepare(self, next_step: int) -> None:
        self._release()
        if self.is_update_step(next_step):
            for unit in self.units:
                for m in unit.weights:
                    mask = _mask(m.module, m.param)
                    self._handles.append(mask.register_forward_hook(self._capture_hook(m.qualname)))

    def _capture_hook(self, qualname: str):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(qualname, grad))
        return hook

    def _accumulate(self, qualname: str, grad: Tensor) -> None:
        previous = self.dense_grads.get(qualname)
        self.dense_grads[qualname] = grad.detach().clone() if previous is None else previous + grad.detach()

    def _reduce_dense_grads(self) -> None:
        """Sum the dense gradients over the ranks: DDP averages only the parameters' (masked) gradients,
        and growth should follow the whole batch, not one rank's share of it."""
        present = [m.qualname for unit in self.units for m in unit.weights if m.qualname in self.dense_grads]
        distributed.all_reduce_sum_(self.dense_grads[name] for name in present)

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def grow_scores(self, unit: Unit, step: int, generator: torch.Generator) -> Tensor:
        missing = [m.qualname for m in unit.weights if m.qualname not in self.dense_grads]
        if missing:
            raise RuntimeError(f"RigL found no dense gradient for {missing} at update step {step}: call "
                               f"on_train_begin(model, optimizer) before training and step(step) after every "
                               f"optimizer step, and run forward and backward in between")
        return unit.group_scores({m.qualname: self.dense_grads[m.qualname].abs().cpu() for m in unit.weights})

    def update(self, step: int) -> None:
        try:
            self._reduce_dense_grads()
            super().update(step)
        finally:
            self.dense_grads = {}
