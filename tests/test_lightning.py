"""Lightning: any method inside lightning.pytorch.Trainer through SparsityCallback."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

import sparsenets as sn  # noqa: E402
from sparsenets.integrations.lightning import SparsityCallback  # noqa: E402
from sparsenets.masking import masks  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def fit(net: nn.Module, method, max_steps: int = 6, **overrides) -> pl.Trainer:
    data = TensorDataset(torch.randn(64, 20), torch.randint(0, 4, (64,)))
    options = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[SparsityCallback(method)])
    trainer = pl.Trainer(**(options | overrides))
    trainer.fit(Classifier(net), DataLoader(data, batch_size=8))
    return trainer


def mask_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{module_name}.{name}": mask.mask.clone() for module_name, _, name, mask in masks(model)}


def test_gradual_pruning_in_lightning_reaches_its_target():
    net = mlp()
    method = sn.GradualMagnitudePruning(net, {"sparsity": 0.8}, start=0, end=4, frequency=2)
    fit(net, method)
    kept = mask_tensors(net)
    assert len(kept) == 3
    density = sum(int(m.sum()) for m in kept.values()) / sum(m.numel() for m in kept.values())
    assert density == pytest.approx(0.2, abs=0.01)


def test_rigl_in_lightning_moves_masks_at_exact_sparsity():
    net = mlp()
    method = sn.RigL(net, {"sparsity": 0.8, "criterion": "random"}, update_every=2, drop_fraction=0.3)
    before = mask_tensors(net)
    fit(net, method)
    after = mask_tensors(net)
    assert [u["step"] for u in method.updates] == [2, 4, 6]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # RigL saw dense gradients and rewired
    assert {k: int(m.sum()) for k, m in after.items()} == {k: int(m.sum()) for k, m in before.items()}


class Recorder(sn.Method):
    """Records each hook, whether gradients are there, and whether the weights moved since the last hook."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, {"sparsity": 0.5})
        self.events: list[tuple] = []
        self.weight = net[0].weight

    def on_train_begin(self, model, optimizer):
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.events.append(("begin", model is self.model, id(self.weight) in owned))

    def before_optimizer_step(self, step):
        self.seen = self.weight.detach().clone()
        has_grad = self.weight.grad is not None and bool(self.weight.grad.abs().sum() > 0)
        self.events.append(("before", step, has_grad))

    def step(self, step):
        self.events.append(("step", step, not torch.equal(self.weight, self.seen)))

    def on_epoch_end(self, epoch):
        self.events.append(("epoch", epoch))


def test_lightning_calls_the_hooks_in_order_once_per_update_with_gradients():
    net = mlp()
    recorder = Recorder(net)
    # 8 batches an epoch, two batches per update: 4 updates an epoch
    fit(net, recorder, max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    updates = [[("before", s, True), ("step", s, True)] for s in range(1, 9)]
    assert recorder.events == [("begin", True, True), *sum(updates[:4], []), ("epoch", 1),
                               *sum(updates[4:], []), ("epoch", 2)]
