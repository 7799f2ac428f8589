"""Sparsity methods, each usable from the built-in Trainer or from your own training loop.

- :class:`OneShot`: prune once, then fine-tune.
- :class:`BlockReweighted`: BLK-REW, a reweighted group-lasso penalty, then block pruning (Ma et al.).
- :class:`GradualMagnitudePruning`: Zhu & Gupta's cubic schedule during training.
- :class:`LotteryTicket`: iterative magnitude pruning with rewinding (Frankle & Carbin), with the
  controls :func:`reinitialize` (same mask, fresh init) and :func:`random_prune` (random mask,
  same per-layer densities).
- :class:`StaticSparse`, :class:`SET`, :class:`RigL`: sparse training from scratch, with a fixed
  mask or one rewired during training (drop by magnitude, regrow at random or by dense gradient).
- :class:`EdgePopup`, :func:`edge_popup_`, :func:`lottery_jackpot_`: strong lottery tickets, subnetworks
  of frozen random (or trained) weights found by learning a score per weight (Ramanujan et al. 2020).
- :class:`SRSTE`, :class:`ProgressiveNM`: N:M sparse training for any N:M (SR-STE; progressive
  gradient flow with decaying pruned-weight scale and/or a denser-to-target structure).
"""

from .base import Method, config_at
from .blkrew import BlockReweighted
from .dst import SET, DynamicSparse, RigL, StaticSparse
from .edgepopup import EdgePopup, ScoreMask, edge_popup_, lottery_jackpot_
from .edgepopup import finalize_ as finalize_edge_popup_
from .gradual import GradualMagnitudePruning, cubic_sparsity
from .lottery import LotteryTicket, layer_sparsities, level_configs, level_sparsities, random_prune, reinitialize
from .nm_training import SRSTE, NMMethod, NMTraining, ProgressiveNM
from .oneshot import OneShot
from .state import apply_masks, copy_masks, rewind_, snapshot

__all__ = [
    "BlockReweighted", "DynamicSparse", "EdgePopup", "GradualMagnitudePruning", "LotteryTicket", "Method",
    "NMMethod", "NMTraining", "OneShot", "ProgressiveNM", "RigL", "SET", "SRSTE", "ScoreMask", "StaticSparse",
    "apply_masks", "config_at", "copy_masks", "cubic_sparsity", "edge_popup_", "finalize_edge_popup_",
    "layer_sparsities", "level_configs", "level_sparsities", "lottery_jackpot_", "random_prune", "reinitialize",
    "rewind_", "snapshot",
]
