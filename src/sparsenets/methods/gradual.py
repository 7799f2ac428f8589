"""Gradual magnitude pruning (Zhu & Gupta 2017): sparsity grows on a cubic schedule during training."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..batches import LossFn
from ..config import SparsityConfig
from ..errors import ConfigError
from .base import Method


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """s_t = s_f + (s_i − s_f)(1 − (t − t0)/(end − t0))³, held at s_i before ``start`` and s_f after ``end``."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


class GradualMagnitudePruning(Method):
    """Prune every ``frequency`` updates from ``start`` to ``end`` along :func:`cubic_sparsity`.

    In Zhu & Gupta's notation t0 = ``start``, Δt = ``frequency`` and n = (end − start)/Δt;
    the final target, the config's sparsity, is reached at ``end`` even when Δt does not
    divide the span. Pruning uses the config's criterion (magnitude by default).
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, start: int, end: int, frequency: int,
                 initial_sparsity: float = 0.0) -> None:
        super().__init__(model, config, data, loss_fn)
        if not 0 <= start <= end:
            raise ConfigError(f"need 0 <= start <= end, got start={start!r}, end={end!r}")
        if frequency < 1:
            raise ConfigError(f"frequency must be >= 1 update, got {frequency!r}")
        final = self.config.target_sparsity
        if not 0.0 <= initial_sparsity <= final:
            raise ConfigError(f"initial_sparsity must be in [0, {final:g}] "
                             f"(the final sparsity), got {initial_sparsity!r}")
        self.start, self.end, self.frequency = start, end, frequency
        self.initial_sparsity = initial_sparsity
        self.reserve_masks()

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.initial_sparsity, self.config.target_sparsity, self.start, self.end)

    def is_pruning_step(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.frequency == 0)

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        if self.start == 0:
            self.step(0)

    def step(self, step: int) -> None:
        if self.is_pruning_step(step):
            self.prune(self.sparsity_at(step))
