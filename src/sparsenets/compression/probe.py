"""One run of the example input with hooks: every module's input and output shape, and call count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import batches as B


@dataclass
class Calls:
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    count: int = 0


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return tuple(value.shape) if isinstance(value, Tensor) else None


def probe(model: nn.Module, example_input: Any) -> dict[nn.Module, Calls]:
    """Shapes seen by each module when ``model`` runs ``example_input`` (a tensor, tuple or dict).

    A module called more than once keeps the shapes of its first call; its ``count`` says so.
    """
    seen: dict[nn.Module, Calls] = {}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        calls = seen.setdefault(module, Calls(_shape(args), _shape(output)))
        calls.count += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            B.run(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen
