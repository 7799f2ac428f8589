"""One-shot pruning: prune a (usually trained) model once, then fine-tune it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..batches import LossFn
from ..config import SparsityConfig
from ..errors import ConfigError
from .base import Method


class OneShot(Method):
    """Prune to the config's sparsity in one go: now with :meth:`apply`, or at update ``at_step``.

    Training on afterwards is the fine-tuning; the masks keep pruned weights at zero::

        OneShot(model, {"sparsity": 0.9}).apply()   # then keep training
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, at_step: int | None = None) -> None:
        super().__init__(model, config, data, loss_fn)
        if at_step is not None and at_step < 0:
            raise ConfigError(f"at_step must be >= 0, got {at_step!r}")
        self.at_step = at_step
        self.done = False
        self.reserve_masks()

    def apply(self) -> None:
        self.prune(self.config.target_sparsity)
        self.done = True

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        if self.at_step == 0 and not self.done:
            self.apply()

    def step(self, step: int) -> None:
        if step == self.at_step and not self.done:
            self.apply()
