"""``quantize_``: replace a model's Linear layers by :class:`QuantizedLinear`, in place.

``rtn`` rounds every weight to its nearest grid point and needs no data. ``gptq`` walks the model
block by block with the layer-by-layer engine (:mod:`sparsenets.layerwise`): each block's layers
are solved from the Gram matrices of their inputs, and the next block is fed the outputs of the
quantized one, so the error does not compound unseen. With ``sparsity`` > 0 GPTQ prunes in the
same sweep (SparseGPT's joint mode). Zeros already in a weight (a model pruned before, with
``masks=False``) stay zero and count as pruned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import batches as B
from ..config import SparsityConfig
from ..criteria import CRITERIA
from ..errors import ConfigError
from ..gemm import to_gemm
from ..layerwise.engine import prune_layerwise
from ..layerwise.stats import InputStats
from ..masking import get_mask
from ..patterns import Pattern, parse_pattern
from ..targets import Unit, find_units
from .gptq import QuantizedWeight, gptq_quantize_, rtn_quantize
from .layers import QuantizedLinear
from .spec import QuantSpec

METHODS = ("rtn", "gptq")


@dataclass
class QuantConfig:
    """How to quantize a model's weights.

    Args:
        bits: 2..8. symmetric: a grid symmetric around 0, else with a zero point.
        group_size: inputs sharing one scale; None: one scale per output channel.
        method: ``rtn`` (round to nearest, no data) or ``gptq`` (calibration ``data`` needed).
        sparsity / pattern: prune in the same GPTQ sweep (``"unstructured"``, ``"2:4"``, ``"block:RxC"``);
            an N:M pattern fixes the sparsity (0 means its own).
        include / exclude: globs on module names (default: everything but ``lm_head``).
        damp, blocksize, act_order: GPTQ's dampening (relative to the mean Hessian diagonal), lazy
            block and input order (:func:`~sparsenets.quant.gptq.gptq_quantize_`).
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 128
    method: str = "rtn"
    sparsity: float = 0.0
    pattern: str | Pattern = "unstructured"
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])
    damp: float = 0.01
    blocksize: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        QuantSpec(self.bits, self.symmetric, self.group_size)  # validates them
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        try:
            pattern = parse_pattern(self.pattern)
        except ValueError as err:
            raise ConfigError(f"pattern: {err}") from None
        self.pattern = pattern
        if pattern.fixed_density is not None and self.sparsity == 0.0:
            self.sparsity = 1.0 - pattern.fixed_density
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if self.method == "rtn" and (self.sparsity > 0 or not pattern.elementwise):
            raise ConfigError("pruning while quantizing needs method='gptq' (rtn only rounds)")
        if self.damp < 0 or isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) \
                or self.blocksize < 1:
            raise ConfigError(f"damp must be >= 0 and blocksize a positive integer, got {self.damp!r}, "
                              f"{self.blocksize!r}")
        for key in ("include", "exclude"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    def sparsity_config(self) -> SparsityConfig:
        """The layer selection (and pruning target) as the pruning engine reads it."""
        return SparsityConfig(sparsity=self.sparsity, pattern=self.pattern, criterion="sparsegpt",
                              include=self.include, exclude=list(self.exclude), module_types=["Linear", "Conv1D"])


def quantize_(model: nn.Module, config: QuantConfig | dict[str, Any], data: Iterable | None = None) -> nn.Module:
    """Quantize the selected Linear (and Hugging Face Conv1D) layers of ``model`` in place, each
    replaced by a :class:`QuantizedLinear`, and return ``model``. ``gptq`` needs ``data``, an
    iterable of batches (as for ``sparsify_``); ``rtn`` ignores it.

    Everything that can be checked (config, layer selection, patterns, data) is checked before a
    weight changes; should GPTQ fail midway, the weights it rewrote are restored.
    """
    if isinstance(config, dict):
        unknown = sorted(set(config) - set(QuantConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown quantization key(s) {unknown}; valid keys: "
                              f"{', '.join(QuantConfig.__dataclass_fields__)}")
        config = QuantConfig(**config)
    units = find_units(model, config.sparsity_config())
    for unit in units:
        m = unit.members[0]
        if not unit.name:
            raise ConfigError("the model is itself a layer, which cannot be replaced in place; use "
                              "QuantizedLinear.from_linear(layer, rtn_quantize(...)) instead")
        if get_mask(m.module, m.param) is not None:
            raise ConfigError(f"layer '{unit.name}' carries a sparsity mask; finalize it first "
                              f"(sparsenets.finalize_) so that its zeros are in the weight")
    if config.method == "rtn":
        results = {u.name: _rtn(u, config.spec) for u in units}
    else:
        if data is None:
            raise ConfigError("method 'gptq' needs calibration data: quantize_(model, config, data=batches)")
        results = _gptq(model, units, config, B.take(data, None))
    layers = {u.name: QuantizedLinear.from_linear(u.members[0].module, results[u.name]) for u in units}
    for name, layer in layers.items():
        _replace(model, name, layer)
    return model


def _gemm_weight(unit: Unit) -> tuple[nn.Module, Tensor]:
    m = unit.members[0]
    return m.module, to_gemm(m.module, m.tensor().data)  # a view: GPTQ writes through it


def _zeros_kept(weight: Tensor) -> Tensor | None:
    """The keep-mask of a weight that already holds zeros (pruned before), else None."""
    keep = weight != 0
    return None if bool(keep.all()) else keep


def _rtn(unit: Unit, spec: QuantSpec) -> QuantizedWeight:
    _, weight = _gemm_weight(unit)
    return rtn_quantize(weight, spec, mask=_zeros_kept(weight))


def _gptq(model: nn.Module, units: list[Unit], config: QuantConfig, batches: list) -> dict[str, QuantizedWeight]:
    results: dict[str, QuantizedWeight] = {}
    originals: dict[str, Tensor] = {}  # on the CPU, to put back should anything fail

    def solve(unit: Unit, stats: dict[nn.Module, InputStats], target: float) -> dict[str, Tensor]:
        module, weight = _gemm_weight(unit)
        gram = stats[module].gram if module in stats else None
        if gram is None:
            raise ConfigError(f"GPTQ: layer '{unit.name}' saw no input in the calibration batches")
        originals[unit.name] = unit.members[0].tensor().detach().to("cpu", copy=True)
        results[unit.name] = gptq_quantize_(weight, gram, config.spec, sparsity=target, pattern=unit.pattern,
                                            keep=_zeros_kept(weight), blocksize=config.blocksize,
                                            damp=config.damp, act_order=config.act_order)
        return {}

    try:
        prune_layerwise(model, units, config.sparsity_config(), CRITERIA["sparsegpt"], batches,
                        lambda unit, masks: None, solve=solve)
    except BaseException:
        with torch.no_grad():
            for unit in units:
                if unit.name in originals:
                    unit.members[0].tensor().copy_(originals[unit.name])
        raise
    return results


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
