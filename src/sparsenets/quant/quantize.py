"""``quantize_``: replace a model's Linear layers by :class:`QuantizedLinear`, in place.

``rtn`` rounds every weight to its nearest grid point and needs no data. ``gptq`` walks the model
block by block with the layer-by-layer engine (:mod:`sparsenets.layerwise`): each block's layers
are solved from the Gram matrices of their inputs, and the next block is fed the outputs of the
quantized one, so the error does not compound unseen. With ``sparsity`` > 0 GPTQ prunes in the
same sweep (SparseGPT's joint mode). Zeros already in a weight (a model pruned before, with
``masks=False``) stay zero and count as pruned.

With ``average_bits`` each layer gets its own bit width (HAWQ, :mod:`sparsenets.quant.mixed`): the
Hessian traces of the loss on ``data`` say how much rounding each layer costs, and the widths from
``bit_choices`` that cost least within the budget are then used by either method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
from .layers import QuantizedLinear, check_activations
from .mixed import allocate_bits, hessian_traces
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
        average_bits: mixed precision: each layer gets bits from ``bit_choices`` (2..8), chosen from
            the Hessian traces of the loss on the calibration ``data`` (needed then), with at most this
            many bits per weight on average over the quantized layers (codes only; ``bits`` is unused).
        activations: None (weights only) or ``"int8"``: the layers quantize their inputs per token
            and run on the int8 kernels (needs symmetric, per-channel weights; inference only).
        outlier_threshold: with int8 activations, input columns holding a value above it in
            magnitude are multiplied in floating point (LLM.int8(); 6.0 in the paper).
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
    average_bits: float | None = None
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    activations: str | None = None
    outlier_threshold: float | None = None

    def __post_init__(self) -> None:
        check_activations(QuantSpec(self.bits, self.symmetric, self.group_size),  # validates them all
                          self.activations, self.outlier_threshold)
        self._check_mixed()
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

    def _check_mixed(self) -> None:
        choices = self.bit_choices
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"bit_choices must be a non-empty list of bit widths, got {choices!r}")
        for b in choices:
            QuantSpec(b, self.symmetric, self.group_size)
        self.bit_choices = tuple(sorted(set(choices)))
        avg = self.average_bits
        if avg is not None and (isinstance(avg, bool) or not isinstance(avg, (int, float))
                                or not self.bit_choices[0] <= avg <= self.bit_choices[-1]):
            raise ConfigError(f"average_bits must be a number within the bit_choices {self.bit_choices}, "
                              f"from {self.bit_choices[0]} to {self.bit_choices[-1]}, got {avg!r}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    def sparsity_config(self) -> SparsityConfig:
        """The layer selection (and pruning target) as the pruning engine reads it."""
        return SparsityConfig(sparsity=self.sparsity, pattern=self.pattern, criterion="sparsegpt",
                              include=self.include, exclude=list(self.exclude), module_types=["Linear", "Conv1D"])


def quantize_(model: nn.Module, config: QuantConfig | dict[str, Any], data: Iterable | None = None, *,
              loss_fn: B.LossFn | None = None, on_layer: Callable[[str], None] | None = None) -> nn.Module:
    """Quantize the selected Linear (and Hugging Face Conv1D) layers of ``model`` in place, each
    replaced by a :class:`QuantizedLinear`, and return ``model``. ``gptq`` and ``average_bits`` need
    ``data``, an iterable of batches (as for ``sparsify_``); plain ``rtn`` ignores it. ``loss_fn``: the
    loss whose Hessian ``average_bits`` weighs (:func:`~sparsenets.quant.mixed.hessian_traces`).
    ``on_layer(name)`` is called as each layer's codes are done (a progress bar's hook).

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
    needs_data = config.method == "gptq" or config.average_bits is not None
    if needs_data and data is None:
        need = "method 'gptq'" if config.method == "gptq" else "average_bits"
        raise ConfigError(f"{need} needs calibration data: quantize_(model, config, data=batches)")
    batches = B.take(data, None) if needs_data else []
    specs = _specs(model, units, config, batches, loss_fn)
    done = on_layer or (lambda name: None)
    if config.method == "rtn":
        results = {}
        for unit in units:
            results[unit.name] = _rtn(unit, specs[unit.name])
            done(unit.name)
    else:
        results = _gptq(model, units, config, batches, specs, done)
    layers = {u.name: QuantizedLinear.from_linear(u.members[0].module, results[u.name], activations=config.activations,
                                                  outlier_threshold=config.outlier_threshold) for u in units}
    for name, layer in layers.items():
        _replace(model, name, layer)
    return model


def _specs(model: nn.Module, units: list[Unit], config: QuantConfig, batches: list,
           loss_fn: B.LossFn | None) -> dict[str, QuantSpec]:
    """Each unit's grid: ``config.spec``, or with ``average_bits`` its own bits (HAWQ)."""
    if config.average_bits is None or not units:
        return {u.name: config.spec for u in units}
    traces = hessian_traces(model, {u.name: u.members[0].module for u in units}, batches, loss_fn)
    bits = allocate_bits(traces, {u.name: _gemm_weight(u)[1] for u in units}, config.bit_choices,
                         config.average_bits, symmetric=config.symmetric, group_size=config.group_size)
    return {u.name: QuantSpec(bits[u.name], config.symmetric, config.group_size) for u in units}


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


def _gptq(model: nn.Module, units: list[Unit], config: QuantConfig, batches: list,
          specs: dict[str, QuantSpec], done: Callable[[str], None]) -> dict[str, QuantizedWeight]:
    results: dict[str, QuantizedWeight] = {}
    originals: dict[str, Tensor] = {}  # on the CPU, to put back should anything fail

    def solve(unit: Unit, stats: dict[nn.Module, InputStats], target: float) -> dict[str, Tensor]:
        module, weight = _gemm_weight(unit)
        gram = stats[module].gram if module in stats else None
        if gram is None:
            raise ConfigError(f"GPTQ: layer '{unit.name}' saw no input in the calibration batches")
        originals[unit.name] = unit.members[0].tensor().detach().to("cpu", copy=True)
        results[unit.name] = gptq_quantize_(weight, gram, specs[unit.name], sparsity=target, pattern=unit.pattern,
                                            keep=_zeros_kept(weight), blocksize=config.blocksize,
                                            damp=config.damp, act_order=config.act_order)
        done(unit.name)
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
