"""``sparsify_``: score, allocate, select and attach masks, in place.

Everything that can fail (config, layer discovery, pattern checks, scoring) runs before the
first mask is attached, so a bad input leaves the model untouched.

Already pruned elements score −inf, count as pruned towards each target, and every new mask is
intersected with the one in place, so iterative pruning never brings a weight back.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import batches as B
from .allocation import layer_sparsities
from .config import SparsityConfig, as_config
from .criteria import CRITERIA, Criterion, Weights
from .errors import ConfigError, SparsenetsError
from .gemm import from_gemm, to_gemm
from .integrations import distributed
from .masking import attach, finalize_, get_mask
from .patterns import MIXED
from .targets import Unit, find_units, stored_ids, uncovered

log = logging.getLogger(__name__)
WEIGHT_ONLY = frozenset({"magnitude", "random"})  # criteria that never run the model
UNCOVERED_WARNING = 0.2  # warn when matrices no mask reaches hold more than this share of the parameters


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | dict | str,
    data: Iterable | None = None,
    loss_fn: B.LossFn | None = None,
) -> nn.Module:
    """Attach masks to ``model`` as ``config`` says, in place, and return ``model``.

    ``data`` is an iterable of batches for the criteria that need it (snip, grasp, taylor,
    wanda; synflow takes its input shape from it). ``loss_fn(output, targets)`` defaults to
    cross-entropy for ``(inputs, targets)`` batches and to the model's own ``.loss`` for dicts.

    Calling it again on a sparsified model keeps what is already pruned pruned (iterative
    pruning): each new mask is the new selection intersected with the mask in place. Where that
    intersection is not the new pattern's own structure (unstructured holes inside kept blocks,
    channels or heads), the layer's pattern is recorded as ``"mixed"``, which :func:`report`
    shows and compression treats as unstructured. N:M stays N:M (fewer than N of M still is).

    Under a running ``torch.distributed`` process group the call is collective (every rank calls
    it): data-driven scores are summed over the ranks' data and every rank attaches rank 0's masks.
    """
    config = as_config(config)
    criterion = CRITERIA[config.criterion]
    units = find_units(model, config)
    _warn_uncovered(model, units)
    if criterion.needs_data and data is None:
        raise ConfigError(f"criterion {config.criterion!r} needs data: pass an iterable of batches "
                          f"as sparsify_(model, config, data=...)")
    batches = B.take(data, config.batches) if data is not None else []
    new_masks = compute_masks(model, units, config, criterion, batches, loss_fn)
    for unit in units:
        for member in unit.members:
            kept = _keep_pruned(member.module, member.param, new_masks[member.qualname])
            new_masks[member.qualname] = kept.contiguous()  # may be an expanded view; the broadcast writes into it
        # every rank scored the same reduced statistics; rank 0's masks settle any tie broken differently
        distributed.broadcast_(new_masks[member.qualname] for member in unit.members)
        label = str(unit.pattern) if unit.conforms(new_masks) else MIXED
        for member in unit.members:
            attach(member.module, member.param, new_masks[member.qualname], label)
    return model


def _warn_uncovered(model: nn.Module, units: list[Unit]) -> None:
    """Say so when the config leaves a large share of the weights dense (``report`` says why)."""
    left = [u for u in uncovered(model, stored_ids(units)) if u.ndim >= 2]
    total = sum(p.numel() for p in model.parameters())
    share = sum(u.numel for u in left) / max(total, 1)
    if share > UNCOVERED_WARNING:
        biggest = "; ".join(f"{u.name} ({u.numel:,}): {u.reason}" for u in left[:3])
        warnings.warn(f"{share:.0%} of the parameters are weights this config leaves dense, biggest: {biggest}",
                      stacklevel=3)


def _keep_pruned(module: nn.Module, name: str, mask: Tensor) -> Tensor:
    """``mask`` ∩ the mask already on ``module.<name>`` (if any)."""
    existing = get_mask(module, name)
    return mask if existing is None else mask & existing.mask.to(mask.device)


def compute_masks(model: nn.Module, units: list[Unit], config: SparsityConfig, criterion: Criterion,
                  batches: list, loss_fn: B.LossFn | None) -> dict[str, Tensor]:
    """Masks for every member of every unit, scored on a private copy of ``model``."""
    assert config.rounds is not None  # SparsityConfig fills in the criterion's default
    work, weights = _scoring_copy(model, units, criterion)
    current = {m.qualname: _existing_mask(m.module, m.param) for u in units for m in u.weights}
    generator = torch.Generator().manual_seed(config.seed)
    rounds = range(1, config.rounds + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for r in rounds:
            log.debug("%s: round %d of %d", config.criterion, r, config.rounds)
            scores = _score(criterion, work, weights, batches, loss_fn, generator, config)
            for name, score in scores.items():
                if torch.isnan(score).any():
                    raise SparsenetsError(f"criterion {config.criterion!r} gave NaN scores for '{name}'")
                kept = current[name]
                if kept is not None:
                    score.masked_fill_(~kept.to(score.device), float("-inf"))
            masks = select(units, scores, config, fraction=r / config.rounds, row_wise=criterion.row_wise)
            for name in weights:
                kept = current[name]
                if kept is not None:
                    masks[name] = masks[name] & kept.to(masks[name].device)
            with torch.no_grad():
                for name, (module, param) in weights.items():
                    getattr(module, param).mul_(masks[name].to(getattr(module, param).device))
            current = {name: masks[name] for name in weights}
    return masks


def _score(criterion: Criterion, work: nn.Module, weights: Weights, batches: list, loss_fn: B.LossFn | None,
           generator: torch.Generator, config: SparsityConfig) -> dict[str, Tensor]:
    """``criterion.score``, with a failure inside the model's own code named after the criterion."""
    try:
        return criterion.score(work, weights, batches, loss_fn, generator, config)
    except (SparsenetsError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        raise ConfigError(f"criterion {criterion.name!r} failed on this model: {type(error).__name__}: {error}; "
                          f"try another criterion or exclude the layers it cannot run") from error


def _scoring_copy(model: nn.Module, units: list[Unit], criterion: Criterion) -> tuple[nn.Module, Weights]:
    """A plain copy of ``model`` (masks baked in) to score, and its weights by qualified name.

    FSDP forbids copying a sharded model, so there the copy holds only the gathered weights:
    enough for the criteria that score weights alone (magnitude, random).
    """
    if not distributed.is_sharded(model):
        work = finalize_(copy.deepcopy(model))
        return work, {m.qualname: (work.get_submodule(m.module_name), m.param) for u in units for m in u.weights}
    if criterion.name not in WEIGHT_ONLY:
        raise ConfigError(f"criterion {criterion.name!r} runs the model on a copy, which FSDP cannot make of a "
                          f"sharded model: prune before fully_shard, or use one of {sorted(WEIGHT_ONLY)}")
    work, weights = nn.Module(), {}
    for m in (m for u in units for m in u.weights):
        holder = nn.Module()
        holder.register_buffer(m.param, distributed.full(m.tensor()).detach().clone())
        weights[m.qualname] = (holder, m.param)
    return work, weights


def _existing_mask(module: nn.Module, name: str) -> Tensor | None:
    mask = get_mask(module, name)
    return None if mask is None else mask.mask.clone()


def select(units: list[Unit], scores: dict[str, Tensor], config: SparsityConfig,
           fraction: float = 1.0, row_wise: bool = False) -> dict[str, Tensor]:
    """Pick what each unit keeps. ``fraction`` of the way to the target on a density-exponential
    schedule, so rounds r/R reach density d^(r/R). Elements scored −inf are already pruned: they
    go first and count towards the target."""
    targets = layer_sparsities(units, config.target_sparsity, config.allocation)

    def at_round(sparsity: float) -> float:
        return 1.0 - (1.0 - sparsity) ** fraction

    masks: dict[str, Tensor] = {}
    pool = [u for u in units if targets[u.name] is None]
    for unit in units:
        target = targets[unit.name]
        if target is None:
            continue
        if unit.pattern.selects_locally:
            masks.update(_select_local(unit, scores))
        elif row_wise and unit.pattern.elementwise:
            masks.update(_select_rows(unit, scores, at_round(target)))
        else:
            means, live = unit.live_groups(scores)
            n_prune = float(live.sum()) - (1.0 - at_round(target)) * unit.numel
            masks.update(unit.expand(select_groups(means, live, n_prune)))
    if pool:
        masks.update(_select_global(pool, scores, at_round(config.target_sparsity)))
    return masks


def select_groups(scores: Tensor, sizes: Tensor, n_prune: float) -> Tensor:
    """Keep-vector that prunes the lowest-scoring groups whose total size is nearest to ``n_prune``
    elements (so within one group of the target); at least one group always stays."""
    order = torch.argsort(scores, stable=True)
    reached = torch.cat([sizes.new_zeros(1), sizes[order].cumsum(0)])
    count = min(int(torch.argmin((reached - n_prune).abs())), len(scores) - 1)
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:count]] = False
    return keep


def _select_local(unit: Unit, scores: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for m in unit.weights:
        gemm = to_gemm(m.module, scores[m.qualname])
        out[m.qualname] = from_gemm(m.module, unit.pattern.select(gemm), scores[m.qualname].shape)
    return out


def _select_rows(unit: Unit, scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Prune the same number of elements in every output row (Wanda's comparison group)."""
    out = {}
    for m in unit.weights:
        gemm = to_gemm(m.module, scores[m.qualname])
        rows, cols = gemm.shape
        total = min(round(sparsity * rows * cols), rows * cols - 1)
        per_row = torch.full((rows,), total // rows)
        per_row[: total % rows] += 1
        rank = torch.argsort(torch.argsort(gemm.cpu(), dim=1, stable=True), dim=1)
        out[m.qualname] = from_gemm(m.module, rank >= per_row[:, None], scores[m.qualname].shape)
    return out


def _select_global(pool: list[Unit], scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over every unit's group scores. Each unit's best group is exempt, so no
    layer is emptied (which would cut the network) and the total still lands within one group."""
    group_scores, sizes = [], []
    for unit in pool:
        unit_scores, live = unit.live_groups(scores)
        unit_scores[torch.argmax(unit_scores)] = float("inf")
        group_scores.append(unit_scores)
        sizes.append(live)
    live_total = float(sum(s.sum() for s in sizes))
    n_prune = live_total - (1.0 - sparsity) * sum(u.numel for u in pool)
    keep = select_groups(torch.cat(group_scores), torch.cat(sizes), n_prune)
    out = {}
    for unit, part in zip(pool, keep.split([len(s) for s in sizes])):
        out.update(unit.expand(part))
    return out
