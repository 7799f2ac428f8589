"""Integer grids for weight quantization: what a bit width, symmetry and group size mean.

A weight (GEMM form, rows × cols) is cut along its inputs into groups of ``group_size`` columns
(the last may be shorter; ``None``: one group per output row). Each row of each group has its
own ``scale`` and ``zero``, and its entries are stored as integer codes ``c`` with value
``(c − zero) · scale``.

* symmetric: ``c ∈ [−(2^(b−1)−1), 2^(b−1)−1]`` and ``zero = 0``. The most negative code
  ``−2^(b−1)`` is left out so that the grid is symmetric around 0 (``scale = max|w| / qmax``
  maps both ``±max|w|`` onto it): one level fewer, but no sign bias.
* asymmetric: the grid ``q ∈ [0, 2^b−1]`` spans ``[min(w, 0), max(w, 0)]`` with an integer zero
  point (0 lies on the grid: a pruned entry is exactly 0). Codes are stored centred,
  ``c = q − 2^(b−1)`` (and so is ``zero``) so that 8 bits fit an int8; the value is the same
  ``(c − zero) · scale``.

Rounding to nearest then puts every entry within ``scale / 2`` of its value. An all-zero group
gets scale 1 (codes 0, values exactly 0), never a NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` in 2..8; ``group_size`` inputs share a scale (``None``: one per output row)."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be True or False, got {self.symmetric!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ConfigError(f"group_size must be a positive integer or None (per output channel), got {g!r}")

    @property
    def code_range(self) -> tuple[int, int]:
        """The smallest and largest stored code."""
        half = 2 ** (self.bits - 1)
        return (-(half - 1), half - 1) if self.symmetric else (-half, half - 1)

    def n_groups(self, cols: int) -> int:
        return 1 if self.group_size is None else -(-cols // self.group_size)

    def columns(self, t: Tensor, cols: int) -> Tensor:
        """A per-group tensor (rows × groups) spread over the ``cols`` columns it covers."""
        if self.group_size is None:
            return t[:, :1].expand(t.shape[0], cols)
        return t.repeat_interleave(self.group_size, dim=1)[:, :cols]


def _check(w: Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"quantization needs a 2-D float weight (rows x cols), got {tuple(w.shape)} {w.dtype}")


def fit_scales(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Round-to-nearest ``(scale, zero)`` for ``w`` (rows × cols), each rows × n_groups: scale
    float32, zero int8 (all 0 when symmetric)."""
    _check(w)
    rows, cols = w.shape
    g = cols if spec.group_size is None else spec.group_size
    n = spec.n_groups(cols)
    x = w.detach().float()
    if n * g != cols:  # pad the last group with zeros: they change neither max |w| nor [min(w,0), max(w,0)]
        x = torch.nn.functional.pad(x, (0, n * g - cols))
    x = x.view(rows, n, g)
    half = 2 ** (spec.bits - 1)
    if spec.symmetric:
        scale = x.abs().amax(-1) / (half - 1)
        zero = torch.zeros(rows, n, dtype=torch.int8, device=w.device)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / (2 * half - 1)
        zero = (torch.round(-lo / torch.where(scale > 0, scale, 1)) - half).to(torch.int8)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale is exact
    return scale, zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """int8 codes (rows × cols) of ``w`` on the grid of ``scale``/``zero``: nearest, then clamped."""
    _check(w)
    cols = w.shape[1]
    lo, hi = spec.code_range
    s, z = spec.columns(scale.float(), cols), spec.columns(zero.float(), cols)
    return torch.clamp(torch.round(w.float() / s) + z, lo, hi).to(torch.int8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """The float32 values ``(codes − zero) · scale`` (rows × cols)."""
    cols = codes.shape[1]
    return (codes.float() - spec.columns(zero.float(), cols)) * spec.columns(scale.float(), cols)


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round-to-nearest: ``w`` on its own grid, in ``w``'s dtype."""
    scale, zero = fit_scales(w, spec)
    return dequantize(quantize_codes(w, scale, zero, spec), scale, zero, spec).to(w.dtype)
