"""GPTQ (Frantar et al. 2023) and round-to-nearest for one weight matrix.

GPTQ is SparseGPT's column-by-column OBS sweep with rounding in place of pruning: each input's
rounding error is spread over the inputs still to come, weighted by the inverse Hessian of the
calibration inputs, so the layer's output on them moves as little as the grid allows. The sweep
itself lives in :func:`sparsenets.layerwise.sparsegpt.sparsegpt_prune_` (one engine for pruning,
quantization and both at once); this module supplies the rounding and keeps the integer codes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import ConfigError
from ..layerwise.sparsegpt import sparsegpt_prune_
from ..patterns import Pattern, parse_pattern
from .spec import QuantSpec, dequantize, fit_scales, quantize_codes


@dataclass
class QuantizedWeight:
    """A GEMM-form weight (rows × cols) as integer codes with per-group ``scale``/``zero``
    (rows × n_groups); ``mask`` (bool, rows × cols) marks the kept entries of a pruned one (the
    others hold the zero point, value exactly 0), None when nothing is pruned."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    mask: Tensor | None
    spec: QuantSpec

    def dequantize(self) -> Tensor:
        """The float32 values (rows × cols)."""
        return dequantize(self.codes, self.scale, self.zero, self.spec)


class _Rounder:
    """The quantizer :func:`sparsegpt_prune_` calls: fits each group's scales when it begins and
    records every input's codes. ``order[j]`` is the original column of processed input ``j``
    (act-order); ``static`` scales are fitted up front from the original weight, in its order."""

    def __init__(self, spec: QuantSpec, rows: int, cols: int, device: torch.device,
                 order: Tensor | None = None, static: Tensor | None = None) -> None:
        self.spec, self.order = spec, order
        self.channel = replace(spec, group_size=None)  # one input at a time: one scale per row
        self.group_size = None if static is not None else spec.group_size
        n = spec.n_groups(cols)
        self.scale = torch.ones(rows, n, device=device)
        self.zero = torch.zeros(rows, n, dtype=torch.int8, device=device)
        if static is not None:
            self.scale, self.zero = fit_scales(static, spec)
        self.static = static is not None
        self.codes = torch.empty(cols, rows, dtype=torch.int8, device=device)  # one input per row

    def _group(self, j: int) -> int:
        col = j if self.order is None else int(self.order[j])
        return 0 if self.spec.group_size is None else col // self.spec.group_size

    def begin(self, block: Tensor, start: int) -> None:
        if not self.static:
            g = self._group(start)
            self.scale[:, g:g + 1], self.zero[:, g:g + 1] = fit_scales(block.t(), self.channel)

    def __call__(self, values: Tensor, j: int) -> Tensor:
        g = self._group(j)
        scale, zero = self.scale[:, g:g + 1], self.zero[:, g:g + 1]
        codes = quantize_codes(values[:, None], scale, zero, self.channel)
        self.codes[j] = codes[:, 0]
        return dequantize(codes, scale, zero, self.channel)[:, 0]


def gptq_quantize_(weight: Tensor, gram: Tensor, spec: QuantSpec, *, sparsity: float = 0.0,
                   pattern: Pattern | str | None = None, keep: Tensor | None = None, blocksize: int = 128,
                   damp: float = 0.01, act_order: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` (GEMM form, rows × cols) with GPTQ from ``gram`` = Σ xxᵀ (cols × cols),
    writing the dequantized values into it, and return its codes.

    With ``sparsity`` > 0 (``pattern``: unstructured, N:M or blocks, as for SparseGPT) the same
    sweep prunes and quantizes together: pruned entries end exactly 0, kept ones on the grid.
    Entries ``keep`` marks pruned stay pruned and count towards ``sparsity``. Group scales are fitted
    when a group begins, from the weights as updated by the inputs before it (the paper's choice).
    ``act_order`` visits inputs by decreasing ``gram`` diagonal (largest activations first, while
    the most inputs remain to absorb their error); with groups, the scales are then fitted from the
    original weight up front (groups stay contiguous in the stored order). Unstructured only.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(f"GPTQ needs a 2-D float weight (rows x cols), got {tuple(weight.shape)} {weight.dtype}")
    try:
        pat = parse_pattern(pattern if pattern is not None else "unstructured")
    except ValueError as err:
        raise ConfigError(f"pattern: {err}") from None
    if act_order and not pat.elementwise:
        raise ConfigError(f"act_order reorders inputs, which pattern {pat} ties together; use act_order=False")
    rows, cols = weight.shape
    order = torch.argsort(gram.diagonal(), descending=True, stable=True).to(weight.device) if act_order else None
    static = None
    if act_order and spec.group_size is not None:
        static = weight.detach() if keep is None else weight.detach().masked_fill(~keep, 0)
    rounder = _Rounder(spec, rows, cols, weight.device, order, static)
    w, g, k = weight, gram, keep
    if order is not None:  # sweep a permuted copy; weight gets the result below
        w, g = weight[:, order], gram[order.to(gram.device)][:, order.to(gram.device)]
        k = None if keep is None else keep[:, order]
    mask = sparsegpt_prune_(w, g, pat, sparsity, keep=k, blocksize=blocksize, damp=damp, quantizer=rounder)
    codes = rounder.codes.t()
    if order is not None:
        back = torch.argsort(order)
        mask, codes = mask[:, back], codes[:, back]
    zero = spec.columns(rounder.zero, cols)
    codes = torch.where(mask, codes, zero).contiguous()  # pruned: the zero point, value exactly 0
    quantized = QuantizedWeight(codes, rounder.scale, rounder.zero, None if bool(mask.all()) else mask, spec)
    with torch.no_grad():
        weight.copy_(quantized.dequantize())
    return quantized


def rtn_quantize(weight: Tensor, spec: QuantSpec, *, mask: Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest codes of ``weight`` (GEMM form), which is left as it is. Entries ``mask``
    marks pruned (bool, rows × cols, True = kept) get the zero point and are left out of the scales."""
    w = weight.detach()
    if mask is not None:
        w = w.masked_fill(~mask, 0)
    scale, zero = fit_scales(w, spec)
    codes = quantize_codes(w, scale, zero, spec)
    return QuantizedWeight(codes, scale, zero, mask, spec)
