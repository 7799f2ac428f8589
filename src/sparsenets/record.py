"""What ``compress`` did to a layer, kept on the layer so ``save`` can write it and ``load`` restore it.

One :class:`CompressionRecord` per layer that compress touched, in a private attribute: it
travels with the module through ``copy.deepcopy`` and pickle, and is never mistaken for one of
the module's own (public) attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

_ATTRIBUTE = "_sparsenets_record"


@dataclass
class CompressionRecord:
    """``origin``: for a sparse kernel layer, the dense layer it replaced (as ``describe_layer``
    gives it), which ``load`` builds first. ``pattern``: the mask pattern the layer had, so ``save``
    can pick the block encoding. ``resized``: compress cut its tensors down, so their shapes differ
    from the dense model's."""

    origin: dict[str, Any] | None = None
    pattern: str | None = None
    resized: bool = False


def get_record(module: nn.Module) -> CompressionRecord:
    """The module's record (an empty one, not attached, when compress never touched it)."""
    return vars(module).get(_ATTRIBUTE) or CompressionRecord()


def has_record(module: nn.Module) -> bool:
    return _ATTRIBUTE in vars(module)


def set_record(module: nn.Module, **fields: Any) -> CompressionRecord:
    """Update the given fields of the module's record (creating it), and return it."""
    record = dataclasses.replace(get_record(module), **fields)
    setattr(module, _ATTRIBUTE, record)
    return record


__all__ = ["CompressionRecord", "get_record", "has_record", "set_record"]
