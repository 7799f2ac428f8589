"""A small training engine: SGD/Adam, learning-rate schedules, seeded data order, hooks.

Everything random is a function of a seed, so a training run can be repeated or resumed
bit for bit: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``, and ``fit(start_step=k)`` replays the schedule and the data order from step k.

Sparsity methods plug in as hooks (:class:`sparsenets.methods.Method`): the trainer calls
``on_train_begin(model, optimizer)``, ``before_optimizer_step(step)``, ``step(step)`` after each
optimizer step (``step`` counts the updates done so far, from 1) and ``on_epoch_end(epoch)``.

The model and each batch go to ``config.device``; with a ``precision`` other than float32 the
forward pass and the loss run under autocast (:mod:`.devices`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, create_model
from torch import Tensor, nn

from ..errors import ConfigError
from .data import Dataset
from .devices import Precision, autocast, check_device_name, check_precision, grad_scaler, resolve_device
from .schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Section, check

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainConfig:
    """How to train. Lengths are in epochs (whole passes over the training set) or steps.

    Args:
        optimizer: ``sgd`` (with ``momentum``; Nesterov off) or ``adam``.
        lr: peak learning rate.
        schedule: ``constant``, ``cosine`` (to zero at the end) or ``step`` (multiply by
            ``gamma`` at each epoch in ``milestones``).
        warmup_steps: linear warm-up from ~0 to ``lr`` over this many steps, before the schedule.
        batch_size: examples per step; the last, smaller batch of an epoch is kept.
        eval_every: test-set evaluation every this many steps (default: once per epoch).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if available, else CPU).
        precision: ``float32``, or ``bfloat16``/``float16`` autocast (float16 on CUDA only).

    Checked on creation by :data:`TrainSchema` (strict types, ranges, no NaN); a bad value
    raises :class:`~sparsenets.errors.ConfigError` naming every bad key.
    """

    optimizer: Literal["sgd", "adam"] = "adam"
    lr: PositiveFloat = 1e-3
    momentum: NonNegativeFloat = 0.9
    weight_decay: NonNegativeFloat = 0.0
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 100
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: NonNegativeInt = 0
    milestones: list[PositiveInt] = field(default_factory=list)
    gamma: NonNegativeFloat = 0.1
    eval_every: PositiveInt | None = None
    device: typing.Annotated[str, AfterValidator(check_device_name)] = "cpu"
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        checked, problems = check(TrainSchema, {f.name: getattr(self, f.name) for f in fields(self)}, "")
        if checked is None:
            raise ConfigError("; ".join(problems))
        for key, value in checked.model_dump().items():
            setattr(self, key, value)
        self.milestones = sorted(self.milestones)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**validated(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schema() -> type[Section]:
    hints = typing.get_type_hints(TrainConfig, include_extras=True)
    definitions: dict[str, Any] = {  # name → (annotation, default)
        f.name: (hints[f.name], f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
        for f in fields(TrainConfig)}
    return create_model("train", __base__=Section, **definitions)


def validated(data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A train section's values, checked; raises :class:`ConfigError` listing every problem."""
    checked, problems = check(TrainSchema, data, where)
    if checked is None:
        raise ConfigError("; ".join(problems))
    return checked.model_dump()


if TYPE_CHECKING:  # a model made at run time: to the type checker, a section like any other
    TrainSchema = Section
else:
    TrainSchema = _schema()  # the train section of a recipe, field for field TrainConfig's


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_at(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate for update number ``step`` (0-based): warm-up, then the schedule."""
    lr = config.lr
    if config.schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    elif config.schedule == "step":
        epoch = step // steps_per_epoch
        lr *= config.gamma ** sum(epoch >= m for m in config.milestones)
    if step < config.warmup_steps:
        lr *= (step + 1) / config.warmup_steps
    return lr


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (a seed, an epoch, a name), stable across runs and machines."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        for byte in str(part).encode():
            value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ 0xFF) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value >> 1


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled example order of one epoch, a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, "epoch", epoch)))


def batches(data: Dataset, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Training batches forever, epoch after epoch, starting at update ``start_step``."""
    n = len(data.y_train)
    per_epoch = math.ceil(n / batch_size)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        order = epoch_order(n, seed, epoch)
        for i in range(offset, per_epoch):
            index = order[i * batch_size:(i + 1) * batch_size]
            yield data.x_train[index], data.y_train[index]
        epoch, offset = epoch + 1, 0


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000,
             precision: Precision = "float32") -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y), in eval mode (restored after).

    Batches go to the model's device; ``precision`` autocasts as in training.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with autocast(device, precision):
                logits = model(xb)
                loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": loss / len(y), "accuracy": correct / len(y)}


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class Trainer:
    """Train ``model`` on ``data`` as ``config`` says, calling ``hooks`` along the way.

    >>> history = Trainer(model, data, TrainConfig(epochs=5), seed=0, hooks=[method]).fit()

    ``history`` has one row per evaluation: step, epoch, mean train loss since the last
    evaluation, test loss, test accuracy and ``seconds``, the wall-clock time spent training
    since ``fit`` started (evaluations excluded).
    """

    def __init__(self, model: nn.Module, data: Dataset, config: TrainConfig, seed: int = 0,
                 hooks: Sequence[Any] = (), on_step: Callable[[int], None] | None = None) -> None:
        self.model, self.data, self.config, self.seed = model, data, config, seed
        self.hooks = list(hooks)
        self.on_step = on_step  # e.g. a progress bar's advance
        self.steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        try:
            self.device = resolve_device(config.device)
            check_precision(config.precision, self.device)
        except ConfigError as err:
            raise ConfigError(f"train: {err}") from None
        model.to(self.device)  # in place: hooks holding its parameters keep them
        self.optimizer = make_optimizer(model, config)
        self.scaler = grad_scaler(self.device, config.precision)

    def _call(self, hook_name: str, *args: Any) -> None:
        for hook in self.hooks:
            method = getattr(hook, hook_name, None)
            if method is not None:
                method(*args)

    def fit(self, start_step: int = 0) -> list[dict[str, float]]:
        """Train from update ``start_step`` (a rewinding point) to the end of the schedule."""
        config, model = self.config, self.model
        eval_every = config.eval_every or self.steps_per_epoch
        seconds, started = 0.0, time.perf_counter()  # training time so far, evaluations excluded
        model.train()
        self._call("on_train_begin", model, self.optimizer)
        history: list[dict[str, float]] = []
        losses: list[float] = []
        stream = batches(self.data, config.batch_size, self.seed, start_step)
        for step in range(start_step + 1, self.total_steps + 1):
            x, y = (t.to(self.device, non_blocking=True) for t in next(stream))
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(config, step - 1, self.total_steps, self.steps_per_epoch)
            with autocast(self.device, config.precision):
                loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss.item()}); "
                                         f"lower the learning rate (lr={config.lr:g})")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # hooks read and change true gradients
            self._call("before_optimizer_step", step)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._call("step", step)
            losses.append(loss.item())
            if self.on_step is not None:
                self.on_step(step)
            if step % self.steps_per_epoch == 0:
                self._call("on_epoch_end", step // self.steps_per_epoch)
            if step % eval_every == 0 or step == self.total_steps:
                seconds += time.perf_counter() - started
                history.append(self._evaluation(step, losses, seconds))
                losses, started = [], time.perf_counter()
        if not history:  # nothing left to train (start_step at the end): still measure the model
            seconds += time.perf_counter() - started
            history.append(self._evaluation(self.total_steps, losses, seconds))
        return history

    def _evaluation(self, step: int, losses: list[float], seconds: float) -> dict[str, float]:
        test = evaluate(self.model, self.data.x_test, self.data.y_test, precision=self.config.precision)
        return {"step": step, "epoch": step / self.steps_per_epoch,
                "train_loss": sum(losses) / max(len(losses), 1),
                "test_loss": test["loss"], "test_accuracy": test["accuracy"], "seconds": seconds}
