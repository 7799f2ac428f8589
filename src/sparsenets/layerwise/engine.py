"""Prune a model layer by layer, block by block, as SparseGPT and Wanda do.

For each stack of blocks: catch the calibration inputs of the first block, collect what the
criterion needs from each layer's inputs (column norms or a Gram matrix), prune the block, run
the inputs through the pruned block and hand its outputs to the next. Memory stays at the model
plus one block's working set plus the calibration activations; nothing copies the model.
Weight-only criteria (magnitude, random) never run the model at all. Layers outside every stack
(a classifier head, a plain MLP's layers) are pruned last, from one pass over the whole model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import batches as B
from ..allocation import OUTLIER_ALLOCATIONS, layer_sparsities, outlier_ratio
from ..config import SparsityConfig
from ..criteria import Criterion
from ..errors import ConfigError
from ..gemm import from_gemm, to_gemm
from ..masking import get_mask, parametrization_list
from ..targets import Unit
from .blocks import Call, Stack, advance, capture, find_stacks, run_block
from .sparsegpt import sparsegpt_prune_
from .stats import Collector, InputStats

log = logging.getLogger(__name__)
Masks = dict[str, Tensor]
# called once per block after it is pruned: (stack, block index, seconds it took)
BlockDone = Callable[[Stack, int, float], None]
# rebuilds one unit from its layers' input statistics and target sparsity, returns its masks:
# stands in for the criterion's own selection (quantization solves each layer this way)
Solver = Callable[[Unit, dict[nn.Module, InputStats], float], Masks]
# |W|·‖X‖ (just |W| without input statistics): what OWL counts outliers in, whatever the criterion
WANDA_SCORES = Criterion("wanda scores", None, needs_data=True, row_wise=True, layer_stats="norms")


@dataclass
class Plan:
    """Which units sit in which block; the rest are outside every stack."""

    stacks: list[Stack]
    blocks: dict[tuple[int, int], list[Unit]] = field(default_factory=dict)
    rest: list[Unit] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, units: list[Unit]) -> Plan:
        holds = {m.module_name for u in units for m in u.members}
        plan = cls(find_stacks(model, holds))
        for unit in units:
            place = next(((s, b) for s, stack in enumerate(plan.stacks) for b in range(len(stack.blocks))
                          if all(_inside(m.module_name, stack.block_name(b)) for m in unit.members)), None)
            if place is None:
                plan.rest.append(unit)
            else:
                plan.blocks.setdefault(place, []).append(unit)
        return plan


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(f"{block}.")


def prune_layerwise(model: nn.Module, units: list[Unit], config: SparsityConfig, criterion: Criterion,
                    batches: list, apply: Callable[[Unit, Masks], None], *,
                    skip_blocks: int = 0, on_block: BlockDone | None = None, solve: Solver | None = None) -> None:
    """Prune ``units`` of ``model`` in place; ``apply(unit, masks)`` attaches each unit's masks.

    ``skip_blocks`` blocks of the first stack are taken as already pruned (a resumed run): their
    inputs still flow through them, unchanged. ``solve(unit, stats, target)``, if given, replaces
    the criterion's selection for every unit (the statistics are still the criterion's).
    """
    if criterion.layer_stats == "weights":
        targets = _targets(units, config, lambda: {u.name: outlier_ratio(_scores(u, WANDA_SCORES, {}, config))
                                                   for u in units})
        for unit in units:
            apply(unit, _select(unit, criterion, {}, config, targets[unit.name]))
        return
    plan = Plan.of(model, units)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        targets = _targets(units, config, lambda: _outliers(model, plan, criterion, config, batches))
        for s, stack in enumerate(plan.stacks):
            calls = capture(model, stack.blocks[0], batches)
            for b, block in enumerate(stack.blocks):
                start = time.perf_counter()
                block_units = plan.blocks.get((s, b), [])
                if block_units and not (s == 0 and b < skip_blocks):
                    stats = _collect_block(block, block_units, calls, criterion)
                    for i, unit in enumerate(block_units):
                        apply(unit, _select(unit, criterion, stats, config, targets[unit.name], solve))
                        _release(stats, block_units[i + 1:])
                    del stats
                calls = _forward(block, calls)
                if on_block is not None:
                    on_block(stack, b, time.perf_counter() - start)
            del calls
        if plan.rest:
            stats = _collect_whole(model, plan.rest, batches, criterion)
            for unit in plan.rest:
                apply(unit, _select(unit, criterion, stats, config, targets[unit.name], solve))
    finally:
        model.train(modes[model])  # masks attached meanwhile follow the model's own mode
        for module, training in modes.items():
            module.training = training


def _targets(units: list[Unit], config: SparsityConfig, outliers: Callable[[], dict[str, float]]
             ) -> dict[str, float]:
    needs = config.allocation in OUTLIER_ALLOCATIONS and any(u.sparsity is None for u in units)
    targets = layer_sparsities(units, config.target_sparsity, config.allocation, outliers() if needs else None)
    missing = [name for name, t in targets.items() if t is None]
    if missing:
        raise ConfigError(f"allocation {config.allocation!r} compares scores across layers, which layer-by-layer "
                          f"pruning never holds at once; use uniform, erk or owl")
    return {name: float(t) for name, t in targets.items() if t is not None}


def _forward(block: nn.Module, calls: list[Call]) -> list[Call]:
    """Each call's inputs replaced by the block's outputs, one batch at a time."""
    for i, call in enumerate(calls):
        calls[i] = advance(call, run_block(block, call))
    return calls


def _collect(units: list[Unit], criterion: Criterion, run: Callable[[Any], Any], items: list
             ) -> dict[nn.Module, InputStats]:
    """The input statistics of ``units``' layers while ``run`` takes each of ``items``."""
    collector = Collector(_modules(units), gram=criterion.layer_stats == "gram")
    try:
        for item in items:
            run(item)
            collector.next_call()
    finally:
        stats = collector.close()
    return stats


def _collect_block(block: nn.Module, units: list[Unit], calls: list[Call], criterion: Criterion
                   ) -> dict[nn.Module, InputStats]:
    return _collect(units, criterion, lambda call: run_block(block, call), calls)


def _collect_whole(model: nn.Module, units: list[Unit], batches: list, criterion: Criterion
                   ) -> dict[nn.Module, InputStats]:
    device = next(model.parameters()).device

    def run(batch: Any) -> None:
        with torch.no_grad():
            B.run(model, B.to_device(batch, device))

    return _collect(units, criterion, run, batches)


def _release(stats: dict[nn.Module, InputStats], later: list[Unit]) -> None:
    """Drop the Gram matrices no later unit reads: a large layer's is hundreds of MB."""
    needed = {id(stats[m.module]) for u in later for m in u.weights if m.module in stats}
    for s in stats.values():
        if id(s) not in needed:
            s.gram = None


def _modules(units: list[Unit]) -> list[nn.Module]:
    return list({id(m.module): m.module for u in units for m in u.weights}.values())


def _outliers(model: nn.Module, plan: Plan, criterion: Criterion, config: SparsityConfig,
              batches: list) -> dict[str, float]:
    """OWL's layer outlier ratios on the dense model, one per block: Wanda scores |W|·‖X‖ of
    every layer of the block together (outside stacks, one per layer)."""
    ratios: dict[str, float] = {}
    norms = criterion.layer_stats != "weights"
    wanda_like = WANDA_SCORES
    for s, stack in enumerate(plan.stacks):
        calls = capture(model, stack.blocks[0], batches)
        for b, block in enumerate(stack.blocks):
            units = plan.blocks.get((s, b), [])
            if units:
                stats = _collect_block(block, units, calls, wanda_like) if norms else {}
                ratio = outlier_ratio([t for u in units for t in _scores(u, wanda_like, stats, config)])
                ratios.update({u.name: ratio for u in units})
            calls = _forward(block, calls)
        del calls
    if plan.rest:
        stats = _collect_whole(model, plan.rest, batches, wanda_like) if norms else {}
        ratios.update({u.name: outlier_ratio(_scores(u, wanda_like, stats, config)) for u in plan.rest})
    return ratios


# ---- one unit --------------------------------------------------------------------------------


def _scores(unit: Unit, criterion: Criterion, stats: dict[nn.Module, InputStats], config: SparsityConfig
            ) -> list[Tensor]:
    """The unit's weight scores (in each weight's shape), already pruned entries −inf."""
    out = []
    generator = torch.Generator().manual_seed(config.seed)
    for m in unit.weights:
        weight = m.tensor().detach()
        if criterion.name == "random":
            score = torch.rand(weight.shape, generator=generator).to(weight.device)
        elif criterion.layer_stats == "weights" or m.module not in stats:
            score = weight.abs().float()
        else:
            gemm = to_gemm(m.module, weight).abs().float() * stats[m.module].norms()
            score = from_gemm(m.module, gemm, weight.shape)
        existing = get_mask(m.module, m.param)
        if existing is not None:
            score = score.masked_fill(~existing.mask.to(score.device), float("-inf"))
        out.append(score)
    return out


def _select(unit: Unit, criterion: Criterion, stats: dict[nn.Module, InputStats], config: SparsityConfig,
            target: float, solve: Solver | None = None) -> Masks:
    if solve is not None:
        return solve(unit, stats, target)
    if criterion.layer_stats == "gram":
        return _sparsegpt(unit, stats, target)
    from ..sparsify import select_unit  # selection lives with sparsify_, which imports this module

    scores = dict(zip((m.qualname for m in unit.weights), _scores(unit, criterion, stats, config)))
    return select_unit(unit, scores, target, row_wise=criterion.row_wise)


def _sparsegpt(unit: Unit, stats: dict[nn.Module, InputStats], target: float) -> Masks:
    """Rebuild the unit's one weight with SparseGPT; its stored tensor takes the new values."""
    if len(unit.members) != 1:
        raise ConfigError(f"criterion 'sparsegpt' prunes one weight at a time; pattern {unit.pattern} groups "
                          f"{len(unit.members)} tensors in '{unit.name}'")
    m = unit.members[0]
    gram = stats[m.module].gram
    if gram is None:
        raise ConfigError(f"criterion 'sparsegpt': layer '{unit.name}' saw no input in the calibration batches")
    existing = get_mask(m.module, m.param)
    # the stored tensor (a mask's original has its pruned entries zeroed): rebuilt in place, no copy
    stored = (parametrization_list(m.module, m.param).original if existing is not None
              else getattr(m.module, m.param)).data
    keep = None if existing is None else to_gemm(m.module, existing.mask.to(stored.device))
    mask = sparsegpt_prune_(to_gemm(m.module, stored), gram, unit.pattern, target, keep=keep)
    return {m.qualname: from_gemm(m.module, mask, stored.shape)}
