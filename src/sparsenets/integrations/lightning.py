"""Lightning: run any sparsenets method inside ``lightning.pytorch.Trainer``::

    trainer = Trainer(..., callbacks=[SparsityCallback(method)])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ..methods import Method


class SparsityCallback(Callback):
    """Drive ``method`` from Lightning's hooks; ``step`` is ``trainer.global_step`` (optimizer updates done).

    Build the method before ``trainer.fit``. With several optimizers the method gets the first.
    With gradient accumulation ``step`` runs once per update, after the batch that made it.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self._last_step = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers:
            raise RuntimeError("SparsityCallback needs an optimizer: configure_optimizers returned none")
        self._last_step = trainer.global_step
        self.method.on_train_begin(self.method.model, trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.method.before_optimizer_step(trainer.global_step + 1)  # the update about to be made

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._last_step:  # an accumulation batch made no update
            self._last_step = trainer.global_step
            self.method.step(trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.method.on_epoch_end(trainer.current_epoch + 1)
