"""Structured matrices beside sparsity: low-rank factors, Monarch products, MoRe adapters
(and, stored the same way, quantized layers' integer codes).

A structured layer stands in for a dense ``nn.Linear`` and stores only its factors. Every
such layer class answers ``dense_weight()``, ``format_name()``, ``init_args()`` and
``num_parameters()``, so ``report``, ``save``/``load`` and the experiments treat all of them
alike; :data:`STRUCTURED` names the classes a checkpoint may rebuild (nothing else is built
from a file).
"""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def structured_classes() -> dict[str, type[nn.Module]]:
    """Class name -> class of every structured layer (imported lazily: the core never needs them)."""
    from ..quant.layers import QuantizedLinear
    from .low_rank import LowRankLinear
    from .monarch import MonarchLinear
    from .more import MoReLinear

    return {cls.__name__: cls for cls in (LowRankLinear, MonarchLinear, MoReLinear, QuantizedLinear)}


def is_structured(module: nn.Module) -> bool:
    """A layer stored as factors (or a frozen layer with an adapter) rather than one dense weight."""
    return type(module).__name__ in _NAMES and type(module) in structured_classes().values()


_NAMES = frozenset({"LowRankLinear", "MonarchLinear", "MoReLinear", "QuantizedLinear"})

__all__ = ["is_structured", "structured_classes"]
