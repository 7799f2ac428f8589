"""Sparsity methods, each usable from the built-in Trainer or from your own training loop.

- :class:`OneShot`: prune once, then fine-tune.
- :class:`GradualMagnitudePruning`: Zhu & Gupta's cubic schedule during training.
- :class:`LotteryTicket`: iterative magnitude pruning with rewinding (Frankle & Carbin), with the
  controls :func:`reinitialize` (same mask, fresh init) and :func:`random_prune` (random mask,
  same per-layer densities).
"""

from .base import Method, config_at
from .gradual import GradualMagnitudePruning, cubic_sparsity
from .lottery import LotteryTicket, layer_sparsities, level_configs, level_sparsities, random_prune, reinitialize
from .oneshot import OneShot
from .state import apply_masks, copy_masks, rewind_, snapshot

__all__ = [
    "GradualMagnitudePruning", "LotteryTicket", "Method", "OneShot", "apply_masks", "config_at", "copy_masks",
    "cubic_sparsity", "layer_sparsities", "level_configs", "level_sparsities", "random_prune", "reinitialize",
    "rewind_", "snapshot",
]
