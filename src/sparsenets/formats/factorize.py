"""``factorize_(model, FactorizeConfig(...))``: dense layers replaced by low-rank or Monarch layers, in place.

The selected ``nn.Linear`` / Hugging Face ``Conv1D`` layers are projected onto the format
(truncated SVD, or the closed-form Monarch projection), optionally weighting each output row
by its Fisher information from calibration data (FWSVD, Hsu et al. 2022), or freshly
initialised to train from scratch. A parameter budget sets the ranks: the same fraction of
parameters in every layer, or ranks spread by kept spectral energy or by Fisher sensitivity.
The model's code is untouched; the new layers remember the dense layer they replaced, so
``save``/``load`` and ``report`` know them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..batches import LossFn
from ..errors import ConfigError
from ..gemm import is_hf_conv1d
from ..record import set_record
from ..targets import class_names, name_matches
from .low_rank import LowRankLinear, spectrum
from .monarch import MonarchLinear, monarch_shapes
from .ranks import ALLOCATIONS, allocate_ranks

FORMATS = ("low-rank", "monarch")
METHODS = ("svd", "fisher", "random")  # project by SVD, by Fisher-weighted SVD, or initialise afresh


@dataclass
class FactorizeConfig:
    """Which dense layers become structured, in which format, and how many parameters they keep.

    Args:
        format: ``"low-rank"`` (W ≈ left · right, two GEMMs) or ``"monarch"`` (two block-diagonal
            factors with a fixed permutation between them).
        budget: parameters the factorised layers keep, as a fraction of their dense count, in
            (0, 1). A layer that can't save at its rank stays dense.
        rank: low-rank only: one rank for every layer instead of a budget.
        nblocks: monarch only: blocks per factor.
        block_rank: monarch only: one block rank for every layer instead of a budget.
        method: ``"svd"`` projects the trained weights (truncated SVD / optimal Monarch
            projection), ``"fisher"`` weights each output row by its Fisher information on
            ``data`` first (FWSVD), ``"random"`` initialises the factors to train from scratch.
        allocation: how the budget becomes ranks: ``"uniform"`` (same fraction everywhere),
            ``"energy"`` (greedy on the fraction of each layer's spectral energy kept per
            parameter) or ``"sensitivity"`` (greedy on Fisher-weighted singular values, an
            estimate of the loss increase; needs ``data``). Monarch takes ``uniform`` only.
        include / exclude: globs on module names; a glob covers a module's children.
        module_types: layer classes to factorise (default Linear and HF Conv1D).
        overrides: ``{glob: budget}``; the first match wins; a budget of 1 keeps a layer dense.
        batches: how many batches of ``data`` the Fisher information uses (default all).
        seed: seeds the initialisation of ``method="random"``.
    """

    format: str = "low-rank"
    budget: float = 0.5
    rank: int | None = None
    nblocks: int = 4
    block_rank: int | None = None
    method: str = "svd"
    allocation: str = "uniform"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    module_types: list[str] = field(default_factory=lambda: ["Linear", "Conv1D"])
    overrides: dict[str, float] = field(default_factory=dict)
    batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("format", self.format, FORMATS)
        _choice("method", self.method, METHODS)
        _choice("allocation", self.allocation, ALLOCATIONS)
        self.budget = _budget(self.budget, "budget")
        self.overrides = {glob: _budget(b, f"overrides[{glob!r}]", allow_dense=True)
                          for glob, b in self.overrides.items()}
        for key in ("rank", "block_rank", "nblocks"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key}={value!r}: must be an integer >= 1")
        if self.format == "monarch" and self.rank is not None:
            raise ConfigError("rank is for format 'low-rank'; Monarch layers take nblocks and block_rank")
        if self.format == "low-rank" and self.block_rank is not None:
            raise ConfigError("block_rank is for format 'monarch'; low-rank layers take rank")
        if self.format == "monarch" and self.allocation != "uniform":
            raise ConfigError(f"allocation={self.allocation!r}: Monarch layers take allocation 'uniform' only")
        if self.method == "random" and self.allocation != "uniform":
            raise ConfigError(f"allocation={self.allocation!r} reads trained weights; method 'random' "
                              f"has none, use 'uniform'")
        if self.allocation == "sensitivity" and self.method != "fisher":
            raise ConfigError("allocation 'sensitivity' ranks by Fisher information: use method 'fisher' with data")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactorizeConfig:
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"unknown factorize keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def budget_for(self, name: str) -> float | None:
        """The budget of an overridden layer (None: the shared budget applies)."""
        return next((b for glob, b in self.overrides.items() if name_matches(name, [glob])), None)


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(options)}")


def _budget(value: Any, where: str, allow_dense: bool = False) -> float:
    top_ok = allow_dense and value == 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < 1 or top_ok):
        raise ConfigError(f"{where}={value!r}: must be a fraction of parameters in (0, 1)"
                          + (" (1 keeps the layer dense)" if allow_dense else ""))
    return float(value)


# ---- the verb ------------------------------------------------------------------------------------------


def factorize_(model: nn.Module, config: FactorizeConfig | dict, data: Iterable | None = None,
               loss_fn: LossFn | None = None) -> nn.Module:
    """Replace the layers ``config`` selects by low-rank or Monarch layers, in place; returns the model.

    ``data`` (batches, as for :func:`sparsenets.sparsify_`) is needed by ``method="fisher"``.
    Everything is computed before the first layer is replaced, so an error leaves the model as it was.
    """
    config = FactorizeConfig.from_dict(config) if isinstance(config, dict) else config
    layers = _select(model, config)
    if not layers:
        raise ConfigError(f"no {'/'.join(config.module_types)} layer matches include={config.include} "
                          f"exclude={config.exclude}")
    weights = {name: _gemm_weight(m) for name, m in layers.items()}
    rows = _row_weights(model, layers, config, data, loss_fn)
    sizes = _sizes(config, weights, rows)
    built = {name: _build(layers[name], weights[name], size, config, rows.get(name))
             for name, size in sizes.items() if size is not None}
    for name, layer in built.items():
        if not name:
            return layer
        model.set_submodule(name, layer)
    return model


def _select(model: nn.Module, config: FactorizeConfig) -> dict[str, nn.Module]:
    types = set(config.module_types)
    return {name: m for name, m in model.named_modules()
            if class_names(m) & types and (isinstance(m, nn.Linear) or is_hf_conv1d(m))
            and (config.include is None or name_matches(name, config.include))
            and not name_matches(name, config.exclude)}


def _gemm_weight(module: nn.Module) -> Tensor:
    """The weight as the forward sees it (a mask applied), (out, in)."""
    weight = cast(Tensor, module.weight).detach()
    return weight.t() if is_hf_conv1d(module) else weight


def _row_weights(model: nn.Module, layers: dict[str, nn.Module], config: FactorizeConfig,
                 data: Iterable | None, loss_fn: LossFn | None) -> dict[str, Tensor]:
    if config.method != "fisher":
        return {}
    if data is None:
        raise ConfigError("method 'fisher' weights rows by Fisher information: pass data= (calibration batches)")
    from .fisher import fisher_rows

    return fisher_rows(model, layers, data, loss_fn, config.batches)


def _unit_cost(config: FactorizeConfig, weight: Tensor) -> int:
    """Parameters per unit of rank (low-rank) or of block rank (Monarch; padded blocks count)."""
    m, n = weight.shape
    if config.format == "low-rank":
        return m + n
    p, _, s = monarch_shapes(n, m, config.nblocks)
    return config.nblocks * (p + s)


def _max_units(config: FactorizeConfig, weight: Tensor) -> int:
    m, n = weight.shape
    if config.format == "low-rank":
        return min(m, n)
    p, _, s = monarch_shapes(n, m, config.nblocks)
    return min(p, s)


def _sizes(config: FactorizeConfig, weights: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, int | None]:
    """Rank (or block rank) per layer; None keeps the layer dense."""
    fixed = config.rank if config.format == "low-rank" else config.block_rank
    sizes: dict[str, int | None] = {}
    shared = []
    for name, w in weights.items():
        own = config.budget_for(name)
        if own == 1.0:
            sizes[name] = None
        elif fixed is not None or own is not None:
            sizes[name] = fixed if fixed is not None else _uniform(config, w, cast(float, own))
        else:
            shared.append(name)
    if shared and config.allocation == "uniform":
        sizes |= {n: _uniform(config, weights[n], config.budget) for n in shared}
    elif shared:
        spectra = {n: spectrum(weights[n], rows.get(n) if config.allocation == "sensitivity" else None)
                   for n in shared}
        sizes |= allocate_ranks(spectra, {n: _unit_cost(config, weights[n]) for n in shared},
                                {n: weights[n].numel() for n in shared}, config.budget, config.allocation)
    return {n: _fit(config, weights[n], s) for n, s in sizes.items()}


def _uniform(config: FactorizeConfig, weight: Tensor, budget: float) -> int:
    """The rank that keeps ``budget`` of this layer's parameters (at least 1)."""
    return max(1, math.floor(budget * weight.numel() / _unit_cost(config, weight)))


def _fit(config: FactorizeConfig, weight: Tensor, units: int | None) -> int | None:
    """Clip to what the shape can use; None when the factors would cost as much as the dense weight."""
    if units is None:
        return None
    units = min(units, _max_units(config, weight))
    return None if units * _unit_cost(config, weight) >= weight.numel() else units


def _build(dense: nn.Module, weight: Tensor, units: int, config: FactorizeConfig,
           row_weights: Tensor | None) -> nn.Module:
    from ..io.architecture import describe_layer

    bias = getattr(dense, "bias", None)
    bias = bias.detach() if isinstance(bias, Tensor) else None
    m, n = weight.shape
    layer: nn.Module
    if config.method == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.format == "low-rank":
                layer = LowRankLinear(n, m, units, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            else:
                layer = MonarchLinear(n, m, config.nblocks, units, bias=bias is not None,
                                      device=weight.device, dtype=weight.dtype)
        if bias is not None:
            with torch.no_grad():
                cast(Tensor, layer.bias).copy_(bias)
    elif config.format == "low-rank":
        layer = LowRankLinear.from_dense(weight, bias, rank=units, row_weights=row_weights)
    else:
        layer = MonarchLinear.from_dense(weight, bias, nblocks=config.nblocks, block_rank=units,
                                         row_weights=row_weights)
    layer.train(dense.training)
    origin = describe_layer(dense)
    if origin is not None:
        set_record(layer, origin=origin)
    return layer


__all__ = ["FORMATS", "METHODS", "FactorizeConfig", "factorize_"]
