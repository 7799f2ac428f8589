"""Block stacks: the repeated layers of a transformer, and the inputs that reach them.

A *stack* is a ``ModuleList`` of same-class blocks (``model.layers`` in Llama, ``transformer.h``
in GPT-2, ``encoder.layer`` in BERT, ``encoder.block`` and ``decoder.block`` in T5). Pruning
walks a stack block by block: the calibration inputs of the first block are caught on their way
in, and each block's outputs become the next block's inputs, so only one block's activations
live at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import batches as B
from ..errors import ConfigError


@dataclass
class Stack:
    name: str
    blocks: nn.ModuleList

    def block_name(self, index: int) -> str:
        return f"{self.name}.{index}" if self.name else str(index)


def find_stacks(model: nn.Module, holds: set[str]) -> list[Stack]:
    """The outermost stacks of ``model`` whose blocks hold any of the module names ``holds``, in
    registration order (the order a forward pass meets them in every common architecture)."""
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(name.startswith(f"{s.name}.") for s in stacks):
            continue  # inside a block of an outer stack (a mixture's experts)
        prefix = f"{name}." if name else ""
        if any(h.startswith(prefix) for h in holds):
            stacks.append(Stack(name, module))
    return stacks


class _Caught(Exception):
    """Stops the forward pass once the first block has its inputs."""


Call = tuple[tuple, dict[str, Any]]  # one batch's (args, kwargs) for a block


def capture(model: nn.Module, first: nn.Module, batches: list) -> list[Call]:
    """The (args, kwargs) each batch brings to ``first``, running ``model`` only up to it."""
    calls: list[Call] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Caught

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad(), _no_cache(model):
            for batch in batches:
                try:
                    B.run(model, B.to_device(batch, device))
                except _Caught:
                    continue
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise ConfigError(f"the calibration batches never reached block '{type(first).__name__}' "
                          f"({len(calls)} of {len(batches)} did)")
    return calls


def run_block(block: nn.Module, call: Call) -> Any:
    args, kwargs = call
    with torch.no_grad():
        return block(*args, **kwargs)


def advance(call: Call, output: Any) -> Call:
    """The next block's call: this block's hidden states in place of its input's."""
    hidden = output if isinstance(output, Tensor) else output[0]
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))  # hidden states passed by keyword
    return args, {**kwargs, key: hidden}


@contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models without their key/value cache: blocks must not grow one per batch."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before is not None:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if before is not None:
            config.use_cache = before  # type: ignore[union-attr]
