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
from .allocation import OUTLIER_ALLOCATIONS, layer_sparsities, outlier_ratio
from .config import SparsityConfig, as_config
from .coupling import couple_channel_units
from .criteria import CRITERIA, Criterion, Weights
from .errors import ConfigError, SparsenetsError
from .gemm import from_gemm, is_experts, to_gemm
from .integrations import distributed
from .layerwise.engine import BlockDone, prune_layerwise
from .masking import attach, finalize_, get_mask
from .patterns import MIXED, Channel
from .targets import Unit, find_units, stored_ids, uncovered

log = logging.getLogger(__name__)
WEIGHT_ONLY = frozenset({"magnitude", "random"})  # criteria that never run the model
UNCOVERED_WARNING = 0.2  # warn when matrices no mask reaches hold more than this share of the parameters


def sparsify_(
    model: nn.Module,
    config: SparsityConfig | dict | str,
    data: Iterable | None = None,
    loss_fn: B.LossFn | None = None,
    *,
    skip_blocks: int = 0,
    on_block: BlockDone | None = None,
    masks: bool = True,
) -> nn.Module:
    """Attach masks to ``model`` as ``config`` says, in place, and return ``model``.

    ``data`` is an iterable of batches for the criteria that need it (snip, grasp, taylor,
    wanda; synflow takes its input shape from it). ``loss_fn(output, targets)`` defaults to
    cross-entropy for ``(inputs, targets)`` batches and to the model's own ``.loss`` for dicts.

    With ``pattern="channel"``, the layers that write one residual stream (a ResNet's convs
    summed by its shortcuts) prune the same channels together, which is what lets ``compress``
    remove them; finding the streams traces the model on the first batch of ``data`` (or on
    ``input_shape``), and without either each layer is pruned on its own.

    Calling it again on a sparsified model keeps what is already pruned pruned (iterative
    pruning): each new mask is the new selection intersected with the mask in place. Where that
    intersection is not the new pattern's own structure (unstructured holes inside kept blocks,
    channels or heads), the layer's pattern is recorded as ``"mixed"``, which :func:`report`
    shows and compression treats as unstructured. N:M stays N:M (fewer than N of M still is).

    Criteria that judge each layer by its own inputs (magnitude, random, wanda, sparsegpt) prune
    layer by layer (:mod:`sparsenets.layerwise`): a transformer block by block, each block fed the
    outputs of the pruned blocks before it, with no copy of the model. ``sparsegpt`` also rebuilds
    the kept weights. ``on_block(stack, index, seconds)`` is called after each block;
    ``skip_blocks`` blocks of the first stack are taken as already pruned (a resumed run).
    ``masks=False`` writes the zeros into the weights and attaches no masks: no memory for them,
    for one-shot pruning of a large model (layers that already carry a mask keep it).

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
    units = _couple_residual_channels(model, units, config, batches)
    apply = _attach_unit if masks else _zero_unit
    if _layer_by_layer(model, units, config, criterion):
        prune_layerwise(model, units, config, criterion, batches, apply, skip_blocks=skip_blocks, on_block=on_block)
        return model
    new_masks = compute_masks(model, units, config, criterion, batches, loss_fn)
    for unit in units:
        apply(unit, {m.qualname: new_masks[m.qualname] for m in unit.members})
    return model


def _couple_residual_channels(model: nn.Module, units: list[Unit], config: SparsityConfig, batches: list
                              ) -> list[Unit]:
    """Channel units that write one residual stream become one unit, so that ``compress`` can cut
    the stream; tracing needs an example input (the first batch, or ``input_shape``)."""
    if distributed.is_sharded(model) or not any(isinstance(u.pattern, Channel) for u in units):
        return units
    example = batches[0] if batches else (torch.zeros(1, *config.input_shape) if config.input_shape else None)
    return units if example is None else couple_channel_units(model, units, example)


def _attach_unit(unit: Unit, new_masks: dict[str, Tensor]) -> None:
    """Attach one unit's masks, each intersected with the mask already in place."""
    for member in unit.members:
        kept = _keep_pruned(member.module, member.param, new_masks[member.qualname])
        new_masks[member.qualname] = kept.contiguous()  # may be an expanded view; the broadcast writes into it
    # every rank scored the same reduced statistics; rank 0's masks settle any tie broken differently
    distributed.broadcast_(new_masks[member.qualname] for member in unit.members)
    label = str(unit.pattern) if unit.conforms(new_masks) else MIXED
    for member in unit.members:
        attach(member.module, member.param, new_masks[member.qualname], label)


def _zero_unit(unit: Unit, new_masks: dict[str, Tensor]) -> None:
    """Zero what one unit prunes in its tensors, without masks (where a mask is in place, update it)."""
    if any(get_mask(m.module, m.param) is not None for m in unit.members):
        _attach_unit(unit, new_masks)
        return
    kept = [new_masks[m.qualname].contiguous() for m in unit.members]
    distributed.broadcast_(kept)
    with torch.no_grad():
        for m, mask in zip(unit.members, kept):
            m.tensor().mul_(mask.to(m.tensor().device))


def _layer_by_layer(model: nn.Module, units: list[Unit], config: SparsityConfig, criterion: Criterion) -> bool:
    """Whether the layer-by-layer engine can prune this: criteria that judge a layer by its own
    inputs, one round, a per-layer allocation, and layers whose inputs a hook sees."""
    why_not = None
    if criterion.layer_stats is None:
        return False
    if config.rounds != 1:
        why_not = f"rounds={config.rounds}"
    elif config.allocation == "global":
        why_not = "allocation 'global' (one threshold over all layers at once)"
    elif distributed.is_sharded(model):
        why_not = "an FSDP-sharded model"
    elif criterion.layer_stats != "weights":
        hidden = _unhookable(model, units)
        if hidden:
            why_not = (f"layer '{hidden}' (its inputs never pass a forward hook, or not all of them reach it); "
                       f"exclude it")
    if why_not is None:
        return True
    if criterion.score is None:
        raise ConfigError(f"criterion {criterion.name!r} prunes layer by layer, which cannot take {why_not}")
    return False


def _unhookable(model: nn.Module, units: list[Unit]) -> str | None:
    """The first unit whose layer's inputs a forward pre-hook does not see (recurrent layers,
    attention's functional output projection, expert banks, embeddings), or None."""
    inner = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for unit in units:
        for m in unit.weights:
            module = m.module
            if (isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Embedding)) or is_experts(module)
                    or id(module) in inner):
                return unit.name
    return None


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
    work, weights = _scoring_copy(model, units, criterion, config)
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
            if work is model:  # one round on the user's own weights: nothing to zero for a next round
                break
            with torch.no_grad():
                for name, (module, param) in weights.items():
                    getattr(module, param).mul_(masks[name].to(getattr(module, param).device))
            current = {name: masks[name] for name in weights}
    return masks


def _score(criterion: Criterion, work: nn.Module, weights: Weights, batches: list, loss_fn: B.LossFn | None,
           generator: torch.Generator, config: SparsityConfig) -> dict[str, Tensor]:
    """``criterion.score``, with a failure inside the model's own code named after the criterion."""
    assert criterion.score is not None, "criteria without a whole-model score run layer by layer"
    try:
        return criterion.score(work, weights, batches, loss_fn, generator, config)
    except (SparsenetsError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        raise ConfigError(f"criterion {criterion.name!r} failed on this model: {type(error).__name__}: {error}; "
                          f"try another criterion or exclude the layers it cannot run") from error


def _scoring_copy(model: nn.Module, units: list[Unit], criterion: Criterion, config: SparsityConfig
                  ) -> tuple[nn.Module, Weights]:
    """A plain copy of ``model`` (masks baked in) to score, and its weights by qualified name;
    the model itself for one round of a weight-only criterion, which only reads the weights.

    FSDP forbids copying a sharded model, so there the copy holds only the gathered weights:
    enough for the criteria that score weights alone (magnitude, random).
    """
    if criterion.name in WEIGHT_ONLY and config.rounds == 1 and not distributed.is_sharded(model):
        return model, {m.qualname: (m.module, m.param) for u in units for m in u.weights}  # read, never written
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
    outliers = None
    if config.allocation in OUTLIER_ALLOCATIONS:
        outliers = {u.name: outlier_ratio([scores[m.qualname] for m in u.weights]) for u in units}
    targets = layer_sparsities(units, config.target_sparsity, config.allocation, outliers)

    def at_round(sparsity: float) -> float:
        return 1.0 - (1.0 - sparsity) ** fraction

    masks: dict[str, Tensor] = {}
    pool = [u for u in units if targets[u.name] is None]
    for unit in units:
        target = targets[unit.name]
        if target is not None:
            masks.update(select_unit(unit, scores, at_round(target), row_wise))
    if pool:
        masks.update(_select_global(pool, scores, at_round(config.target_sparsity)))
    return masks


def select_unit(unit: Unit, scores: dict[str, Tensor], sparsity: float, row_wise: bool = False
                ) -> dict[str, Tensor]:
    """Masks for one unit with its own target sparsity."""
    if unit.pattern.selects_locally:
        return _select_local(unit, scores)
    if row_wise and unit.pattern.elementwise:
        return _select_rows(unit, scores, sparsity)
    if unit.pattern.elementwise and all(m.group_ids is None for m in unit.weights):
        return _select_elements(unit, scores, sparsity)
    means, live = unit.live_groups(scores)
    if unit.expert_of_group is None:
        n_prune = float(live.sum()) - (1.0 - sparsity) * unit.numel
        return unit.expand(select_groups(means, live, n_prune))
    keep = torch.ones(unit.n_groups, dtype=torch.bool)
    sizes = unit.group_sizes()
    for expert in unit.expert_of_group.unique():  # every expert to the unit's sparsity
        own = (unit.expert_of_group == expert).nonzero().squeeze(1)
        n_prune = float(live[own].sum()) - (1.0 - sparsity) * float(sizes[own].sum())
        keep[own] = select_groups(means[own], live[own], n_prune)
    return unit.expand(keep)


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
        per_row, extra = divmod(total, rows)  # the first `extra` rows prune one more
        gemm = gemm.cpu()
        keep = torch.ones(rows, cols, dtype=torch.bool)
        keep[extra:].scatter_(1, _lowest(gemm[extra:], per_row), False)
        keep[:extra].scatter_(1, _lowest(gemm[:extra], per_row + 1), False)
        out[m.qualname] = from_gemm(m.module, keep, scores[m.qualname].shape)
    return out


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` lowest scores along the last dimension (a partial sort: far cheaper
    than a full one on the tens of millions of elements of a large layer)."""
    return torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices


def _select_elements(unit: Unit, scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """The lowest-scoring elements of the unit, without a group id per element (as large as the weights)."""
    flat = torch.cat([to_gemm(m.module, scores[m.qualname]).reshape(-1).float().cpu() for m in unit.weights])
    n_prune = min(round(sparsity * len(flat)), len(flat) - 1)
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[_lowest(flat, n_prune)] = False
    out = {}
    for m, part in zip(unit.weights, keep.split([scores[m.qualname].numel() for m in unit.weights])):
        gemm_shape = to_gemm(m.module, scores[m.qualname]).shape
        out[m.qualname] = from_gemm(m.module, part.view(gemm_shape), scores[m.qualname].shape)
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
