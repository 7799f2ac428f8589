"""Whole experts removed from mixture-of-experts blocks, physically.

A block is a module with ``experts`` (a bank of 3-D ``experts × …`` parameters, see
:func:`~sparsenets.gemm.is_experts`) and a router (``gate`` or ``router``) whose output rows are
the experts. Removing experts slices every ``experts × …`` tensor of the bank and the router's
rows, and updates ``num_experts``/``num_local_experts`` (top-k never exceeds what is left) on the
block, its parts and the model config, so the model runs, and generates, as before.

Tokens that went to a removed expert go to the next-best kept one: outputs stay the same only
where removed experts were never routed to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import batches as B
from ..errors import ConfigError
from ..gemm import expert_weight_names, is_experts
from ..masking import Mask, parametrization_list

log = logging.getLogger(__name__)
EXPERT_SCORES = ("router", "magnitude")


@dataclass
class MoeBlock:
    name: str
    block: nn.Module
    experts: nn.Module
    router: nn.Module

    @property
    def n(self) -> int:
        n: Any = self.experts.num_experts  # a plain int attribute, which nn.Module does not type
        return int(n)


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every mixture-of-experts block of ``model`` whose router has one output row per expert."""
    found = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if isinstance(experts, nn.Module) and is_experts(experts) and isinstance(router, nn.Module) and \
                getattr(router, "weight", torch.empty(0)).shape[:1] == (experts.num_experts,):
            found.append(MoeBlock(name, block, experts, router))
    return found


def prune_experts_(model: nn.Module, fraction: float | None = None, *, keep: int | None = None,
                   by: str = "router", data: Iterable | None = None) -> nn.Module:
    """Remove the least important experts of every MoE block, in place; returns ``model``.

    Say how many go with ``fraction`` (of each block's experts) or how many stay with ``keep``.
    ``by="router"`` ranks experts by the routing weight they get on ``data`` (an iterable of
    batches): never-routed experts go first. ``by="magnitude"`` ranks them by weight norm.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError(f"prune_experts_: {type(model).__name__} has no mixture-of-experts block "
                          "(a module with 'experts' stored as 3-D parameters and a 'gate' or 'router')")
    counts = [_n_keep(b.n, fraction, keep) for b in blocks]  # every check before anything runs
    if by not in EXPERT_SCORES:
        raise ConfigError(f"prune_experts_: by={by!r}; choose one of {list(EXPERT_SCORES)}")
    if by == "router" and data is None:
        raise ConfigError("prune_experts_: by='router' needs calibration data (an iterable of batches)")
    scores = _router_scores(model, blocks, data) if by == "router" else [_norms(b.experts) for b in blocks]
    for block, score, n_keep in zip(blocks, scores, counts):
        kept = torch.sort(torch.argsort(score, descending=True, stable=True)[:n_keep]).values
        log.info("%s: keeping experts %s of %d", block.name, kept.tolist(), block.n)
        remove_experts_(model, block, kept)
    return model


def remove_dead_experts_(model: nn.Module) -> dict[str, list[int]]:
    """Remove every expert whose weights are all zero (masked or pruned whole); returns the removed
    expert ids per block. A block keeps at least one expert."""
    removed = {}
    for block in moe_blocks(model):
        alive = torch.zeros(block.n, dtype=torch.bool)
        for name in expert_weight_names(block.experts):
            alive |= getattr(block.experts, name).detach().flatten(1).ne(0).any(1).cpu()
        if alive.all():
            continue
        alive[0] |= not alive.any()
        removed[block.name] = (~alive).nonzero().flatten().tolist()
        remove_experts_(model, block, alive.nonzero().flatten())
    return removed


def remove_experts_(model: nn.Module, block: MoeBlock, kept: Tensor) -> None:
    """Keep only the experts ``kept`` (sorted ids) of ``block``: bank, router rows and counts."""
    n = block.n
    for module in (block.experts, block.router):
        for name in _per_expert(module, n):
            _take_(module, name, kept)
    _set_counts(model, block, len(kept))


def _n_keep(n: int, fraction: float | None, keep: int | None) -> int:
    if (fraction is None) == (keep is None):
        raise ConfigError(f"prune_experts_: give fraction or keep, not both or neither (got {fraction=}, {keep=})")
    if keep is not None and not 1 <= keep <= n:
        raise ConfigError(f"prune_experts_: keep={keep} must be between 1 and the {n} experts")
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise ConfigError(f"prune_experts_: fraction={fraction} must be in [0, 1)")
    return keep if keep is not None else max(1, round((1.0 - fraction) * n))  # type: ignore[operator]


# ---- scores ----------------------------------------------------------------------------------


def _norms(experts: nn.Module) -> Tensor:
    """L2 norm of each expert over all of its matrices."""
    sq = sum(getattr(experts, n).detach().float().flatten(1).pow(2).sum(1).cpu()
             for n in expert_weight_names(experts))
    return torch.as_tensor(sq).sqrt()


def _router_scores(model: nn.Module, blocks: list[MoeBlock], data: Any) -> list[Tensor]:
    """Routing weight each expert receives over ``data`` (softmax probability summed over the tokens
    that pick it in their top-k); ties, as between never-picked experts, go by total probability."""
    picked = [torch.zeros(b.n, dtype=torch.float64) for b in blocks]
    total = [torch.zeros(b.n, dtype=torch.float64) for b in blocks]

    def hook(i: int, k: int):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            probs = logits.detach().float().reshape(-1, blocks[i].n).softmax(-1).cpu().double()
            top = probs.topk(k, dim=-1)
            picked[i].index_add_(0, top.indices.reshape(-1), top.values.reshape(-1))
            total[i] += probs.sum(0)
        return record

    B.observe(model, data, [(b.router, hook(i, _top_k(b) or b.n)) for i, b in enumerate(blocks)])
    if not any(t.any() for t in total):
        raise ConfigError("prune_experts_: no router ran on the calibration data")
    # rank by picked weight, then by total probability: a tiny tie-break weight keeps the order
    return [p + t * 1e-9 / max(float(t.sum()), 1.0) for p, t in zip(picked, total)]


# ---- surgery ---------------------------------------------------------------------------------


def _per_expert(module: nn.Module, n: int) -> list[str]:
    """Names of the parameters and buffers of ``module`` with one leading entry per expert."""
    masked = list(getattr(module, "parametrizations", {}))
    names = [*module._parameters, *masked, *module._buffers]
    return [name for name in names if getattr(module, name) is not None and getattr(module, name).dim() >= 1
            and getattr(module, name).shape[0] == n]


def _take_(module: nn.Module, name: str, kept: Tensor) -> None:
    """Replace ``module.<name>`` (a parameter, buffer or masked parameter) by its rows ``kept``."""
    if parametrize.is_parametrized(module, name):
        plist = parametrization_list(module, name)
        original = plist.original
        plist.original = nn.Parameter(original.detach()[kept.to(original.device)].clone(),
                                      requires_grad=original.requires_grad)
        for p in plist:
            if isinstance(p, Mask):
                p.mask = p.mask[kept.to(p.mask.device)]
        return
    tensor = getattr(module, name)
    rows = tensor.detach()[kept.to(tensor.device)].clone()
    if name in module._parameters:
        setattr(module, name, nn.Parameter(rows, requires_grad=tensor.requires_grad))
    else:
        module._buffers[name] = rows


def _top_k(block: MoeBlock) -> int | None:
    for owner in (block.block, block.router):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    return None


def _set_counts(model: nn.Module, block: MoeBlock, n: int) -> None:
    """The new expert count where the block, its parts and the config keep it; top-k ≤ n."""
    configs = [c for c in (getattr(model, "config", None), getattr(block.experts, "config", None)) if c is not None]
    for owner in (block.block, block.experts, block.router, *configs):
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, n)
        for attr in ("top_k", "num_experts_per_tok"):
            k = getattr(owner, attr, None)
            if isinstance(k, int) and k > n:
                setattr(owner, attr, n)
    if isinstance(block.router, nn.Linear):
        block.router.out_features = n
