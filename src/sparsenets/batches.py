"""Batches as users have them: ``(inputs, targets)`` tuples, dicts of keyword inputs, or bare inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

LossFn = Callable[[Any, Any], Tensor]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def take(data: Iterable | None, limit: int | None) -> list:
    """At most ``limit`` batches of ``data`` as a list (data may be a one-shot iterator)."""
    if data is None:
        return []
    batches = list(islice(iter(data), limit))
    if not batches:
        raise ConfigError("data gave no batches")
    return batches


def run(model: nn.Module, batch: Any) -> Any:
    """Forward a batch: ``model(x)`` for tuples and tensors, ``model(**batch)`` for dicts."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"can't find the output tensor in a {type(output).__name__}")


def loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> Tensor:
    """The scalar loss of one batch.

    With ``loss_fn``: ``loss_fn(output, targets)`` for ``(x, y)`` batches, ``loss_fn(output, batch)``
    for dict batches. Without it: cross-entropy for ``(x, y)``; the model's own ``.loss`` for dicts.
    """
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    output = run(model, batch)
    if isinstance(batch, (list, tuple)):
        if len(batch) < 2:
            raise ConfigError("a batch tuple needs (inputs, targets) to compute a loss")
        target = batch[1]
        if loss_fn is not None:
            return loss_fn(logits(output), target)
        out = logits(output)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    if loss_fn is not None:
        return loss_fn(output, batch)
    model_loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if model_loss is None:
        raise ConfigError("can't compute a loss from this batch: give (inputs, targets) batches, "
                         "a dict the model returns a .loss for, or pass loss_fn")
    return model_loss


ForwardHook = Callable[[nn.Module, tuple, Any], None]


def observe(model: nn.Module, batches: Iterable, hooks: list[tuple[nn.Module, ForwardHook]]) -> None:
    """Run ``batches`` through ``model`` in eval mode without gradients, with forward ``hooks`` on
    the given modules, to measure something; the hooks come off and every module gets its own
    train/eval flag back afterwards, whatever happens."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()
            for batch in batches:
                run(model, to_device(batch, device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
