"""Strong lottery tickets: find a subnetwork of *frozen* weights by learning which to keep.

Edge-popup (Ramanujan et al. 2020) gives every weight (or every group of a pattern) a score,
uses the top ``density`` fraction by |score| of each layer in the forward pass, and trains
only the scores, passing the gradient straight through the hard top-k (a straight-through
estimator). The weights themselves never change: they are random (signed Kaiming constant
or Kaiming normal), or, for *lottery jackpots* (Chen et al. 2021), trained weights with the
scores starting at |w| so that the first mask is magnitude pruning.

It is a ``torch.nn.utils.parametrize`` parametrization, like the core's masks, so it works on
Linear, Conv and both projections of ``nn.MultiheadAttention`` without touching model code::

    scores = edge_popup_(model, density=0.5, init="signed_constant", seed=0)
    optimizer = torch.optim.SGD(scores, lr=0.1, momentum=0.9)
    ...  # your loop: only the scores move
    finalize_(model)   # plain weights = frozen weights × the chosen mask

or, like every other method, from a :class:`~sparsenets.SparsityConfig` (its pattern, sparsity,
include/exclude and module_types; density = 1 − sparsity)::

    method = EdgePopup(model, {"sparsity": 0.5, "pattern": "block:4x4"})
    optimizer = torch.optim.SGD(method.scores, lr=0.1, momentum=0.9)
    ...
    method.finalize()
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..batches import LossFn
from ..config import SparsityConfig
from ..errors import ConfigError, PatternError
from ..gemm import from_gemm, to_gemm
from ..masking import _make_picklable, attach, parametrization_list
from ..patterns import Pattern, parse_pattern
from ..targets import DEFAULT_MODULE_TYPES, is_layer, name_matches, weight_names
from .base import Method

INITS = ("signed_constant", "kaiming_normal", "keep")
SCORE_INITS = ("kaiming_uniform", "magnitude")


class _TopK(torch.autograd.Function):
    """Hard top-k mask of a score vector in the forward, identity gradient in the backward."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: int) -> Tensor:
        mask = torch.zeros_like(scores)
        mask[scores.topk(k, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class ScoreMask(nn.Module):
    """The parametrization: ``weight * mask``, mask = top-k groups by |score|, k = round(density · groups).

    ``group_ids`` maps each weight element (in the weight's own shape) to its group;
    ``scores`` holds one learnable score per group.
    """

    group_ids: Tensor

    def __init__(self, scores: Tensor, group_ids: Tensor, density: float, pattern: str = "unstructured") -> None:
        super().__init__()
        self.scores = nn.Parameter(scores.detach().clone().float())
        self.register_buffer("group_ids", group_ids.long())
        self.density = float(density)
        self.pattern = pattern

    @property
    def k(self) -> int:
        return max(1, round(self.density * self.scores.numel()))

    def group_mask(self) -> Tensor:
        """The float 0/1 keep vector over groups, differentiable (straight-through) in the scores."""
        return _TopK.apply(self.scores.abs(), self.k)

    def mask(self) -> Tensor:
        """The boolean element mask the forward uses now."""
        with torch.no_grad():
            return self.group_mask()[self.group_ids].bool()

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.group_mask()[self.group_ids].to(weight.dtype)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, density={self.density:.4f}, groups={self.scores.numel()}"


def _tensors(model: nn.Module, module_types: Sequence[str], include: Sequence[str] | None,
             exclude: Sequence[str]) -> Iterator[tuple[str, nn.Module, str]]:
    """(module name, module, weight name) of every layer edge-popup searches, incl. both MHA projections."""
    def selected(name: str) -> bool:
        return (not include or name_matches(name, list(include))) and not name_matches(name, list(exclude))

    types = tuple(module_types)
    for name, module in model.named_modules():
        if not is_layer(module, types) or not selected(name):
            continue
        for param in weight_names(module):
            yield name, module, param
        if isinstance(module, nn.MultiheadAttention) and "Linear" not in module_types:
            # out_proj is a Linear subclass: when Linear isn't searched, still take attention's output
            yield f"{name}.out_proj", module.out_proj, "weight"


def _grouping(pattern: Pattern | str | None) -> Pattern:
    """The pattern as a grouping of each weight: edge-popup ranks groups, one layer at a time."""
    pattern = parse_pattern(pattern or "unstructured")
    if pattern.selects_locally or pattern.scope != "layer":
        raise PatternError(f"edge-popup needs a pattern that groups each weight on its own "
                           f"(unstructured, block:RxC, channel), got {str(pattern)!r}")
    return pattern


@torch.no_grad()
def _random_weight(module: nn.Module, weight: Tensor, init: str, generator: torch.Generator) -> Tensor:
    """Kaiming (fan-in, ReLU gain) weights: ±σ (signed constant) or N(0, σ²)."""
    gemm = to_gemm(module, weight)
    std = math.sqrt(2.0 / gemm.shape[1])
    values = torch.randn(gemm.shape, generator=generator)
    values = values.sign() * std if init == "signed_constant" else values * std
    return from_gemm(module, values, weight.shape).to(weight)


def edge_popup_(model: nn.Module, density: float, init: str = "signed_constant", seed: int = 0,
                pattern: Pattern | str | None = None, scores: str = "kaiming_uniform",
                module_types: Sequence[str] = DEFAULT_MODULE_TYPES, freeze_rest: bool = True,
                include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[nn.Parameter]:
    """Put edge-popup on every searched weight of ``model``, in place; returns the score parameters.

    Args:
        density: fraction of each layer's groups kept (the top-k by |score|), i.e. 1 − sparsity.
        init: ``signed_constant`` or ``kaiming_normal`` to redraw the weights at random (from
            ``seed``), or ``keep`` to search over the weights the model has (lottery jackpots).
        pattern: group layout in GEMM form (``"block:4x4"``, ``"channel"``, a Pattern); default one
            score per weight.
        scores: ``kaiming_uniform`` (random, from ``seed``) or ``magnitude`` (|w|, the mean per
            group): the first mask is then magnitude pruning.
        module_types: layer classes searched, as in :class:`~sparsenets.SparsityConfig`.
        freeze_rest: also freeze every other parameter (biases, norms), as in the paper.
        include / exclude: globs on module names, as in :class:`~sparsenets.SparsityConfig`.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density (the kept fraction) must be in (0, 1], got {density!r}")
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if scores not in SCORE_INITS:
        raise ConfigError(f"unknown scores {scores!r}; choose from {', '.join(SCORE_INITS)}")
    pattern = _grouping(pattern)
    generator = torch.Generator().manual_seed(seed)
    targets = list(_tensors(model, module_types, include, exclude))
    if not targets:
        raise ConfigError(f"edge-popup found no layer of type {list(module_types)} in {type(model).__name__} "
                          f"(include={include!r}, exclude={list(exclude)!r})")
    if freeze_rest:
        for p in model.parameters():
            p.requires_grad_(False)
    found = []
    for name, module, param in targets:
        if parametrize.is_parametrized(module, param):
            raise ConfigError(f"{name}.{param} is already parametrized (masked?); finalize it first")
        weight = getattr(module, param)
        with torch.no_grad():
            if init != "keep":
                weight.copy_(_random_weight(module, weight, init, generator))
        rows, cols = to_gemm(module, weight).shape
        pattern.check(rows, cols, name)
        ids, n_groups = pattern.group_ids(rows, cols)
        ids = from_gemm(module, ids.contiguous(), weight.shape)
        if scores == "magnitude":
            sums = torch.zeros(n_groups).index_add_(0, ids.reshape(-1), weight.detach().abs().reshape(-1).float())
            counts = torch.zeros(n_groups).index_add_(0, ids.reshape(-1), torch.ones(ids.numel()))
            initial = sums / counts
        else:  # kaiming_uniform over a (groups,) vector, as the paper's scores
            bound = math.sqrt(6.0 / cols)
            initial = (torch.rand(n_groups, generator=generator) * 2 - 1) * bound
        popup = ScoreMask(initial, ids, density, pattern.name)
        parametrize.register_parametrization(module, param, popup)
        parametrization_list(module, param).original.requires_grad_(False)
        _make_picklable(module)
        found.append(popup.scores)
    return found


def popups(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, ScoreMask]]:
    """Every edge-popup parametrization: (module name, module, tensor name, ScoreMask)."""
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                for p in module.parametrizations[name]:
                    if isinstance(p, ScoreMask):
                        yield module_name, module, name, p


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p.scores for *_, p in popups(model)]


def lottery_jackpot_(model: nn.Module, density: float, pattern: Pattern | str | None = None,
                     module_types: Sequence[str] = DEFAULT_MODULE_TYPES) -> list[nn.Parameter]:
    """Edge-popup over the model's own (trained) weights, scores from |w|: starts at magnitude pruning."""
    return edge_popup_(model, density, init="keep", pattern=pattern, scores="magnitude", module_types=module_types)


@torch.no_grad()
def finalize_(model: nn.Module, as_masks: bool = False) -> nn.Module:
    """Bake the chosen subnetworks into plain weights (frozen weight × mask) and drop the scores.

    With ``as_masks`` the result carries the core's fixed :class:`~sparsenets.masking.Mask`
    instead, so reports show the density and further training keeps the pruned weights at zero.
    Weights become trainable again either way.
    """
    for _, module, name, popup in list(popups(model)):
        if len(parametrization_list(module, name)) > 1:
            raise ConfigError(f"{type(module).__name__}.{name} has other parametrizations; remove them first")
        mask = popup.mask()
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        getattr(module, name).requires_grad_(True)
        if as_masks:
            attach(module, name, mask, popup.pattern)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


_PER_LAYER_DEFAULTS = {"allocation": "uniform", "overrides": {}, "keep_first_last_dense": False}


class EdgePopup(Method):
    """Edge-popup as a method: search a subnetwork of ``model``'s frozen weights at the config's
    density (1 − sparsity), pattern, include/exclude and module_types.

    The score search keeps the same fraction in every layer, so the config's allocation must be
    ``uniform``; its criterion is not used (``scores`` picks the initial scores). ``scores`` and
    ``init`` are as in :func:`edge_popup_`, and ``config.seed`` seeds both. Train
    :attr:`scores` (the only trainable tensors), then call :meth:`finalize`.
    """

    def __init__(self, model: nn.Module, config: SparsityConfig | dict | str, data: Iterable | None = None,
                 loss_fn: LossFn | None = None, *, init: str = "signed_constant", scores: str = "kaiming_uniform",
                 freeze_rest: bool = True) -> None:
        super().__init__(model, config, data, loss_fn)
        c = self.config
        unsupported = {key: getattr(c, key) for key, default in _PER_LAYER_DEFAULTS.items()
                       if getattr(c, key) != default}
        if unsupported:
            raise ConfigError(f"edge-popup keeps the same fraction of every layer; it does not take "
                              f"{', '.join(f'{k}={v!r}' for k, v in unsupported.items())}")
        self.scores = edge_popup_(model, 1.0 - c.target_sparsity, init=init, seed=c.seed, pattern=c.pattern,
                                  scores=scores, module_types=c.module_types or DEFAULT_MODULE_TYPES,
                                  freeze_rest=freeze_rest, include=c.include, exclude=c.exclude)

    def finalize(self, as_masks: bool = False) -> nn.Module:
        """Bake the chosen subnetwork in (see :func:`finalize_`); returns the model."""
        return finalize_(self.model, as_masks=as_masks)
