"""``QuantizedLinear``: a Linear whose weight is stored as low-bit integer codes.

Weight-only by default: the forward pass rebuilds the float weight from the codes and runs a
plain ``F.linear`` (nothing is cached, so ``state_dict`` holds exactly the codes, scales, zero
points, mask and bias). What that saves is storage, not compute.

With ``activations="int8"`` (symmetric codes, one scale per output channel) the layer runs on
the int8 kernels of :mod:`sparsenets.kernels.int8` instead: inputs are quantized per token at
every call and multiplied with the codes in int32. ``outlier_threshold`` adds LLM.int8()'s
decomposition: input columns holding a value above it in magnitude are multiplied in floating
point. That path is inference-only, like :class:`~sparsenets.layers.Int8Linear`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..gemm import from_gemm, to_gemm
from ..io.architecture import build_described, describe_layer
from ..kernels.int8 import check_outlier_threshold, int8_linear
from ..record import get_record, set_record
from .gptq import QuantizedWeight
from .spec import QuantSpec, dequantize


class QuantizedLinear(nn.Module):
    """``y = x · dequantize(codes)ᵀ + b``. ``codes`` (int8, out × in), ``scale`` (float32) and
    ``zero`` (int8) per output row and group of ``group_size`` inputs; ``mask`` (bool, out × in)
    for a pruned weight. ``dtype`` is the dtype of :meth:`dense_weight` and of the bias.
    ``activations``: None (weights only) or ``"int8"`` (dynamic int8 inputs, int8 product), with
    an optional ``outlier_threshold`` for LLM.int8()'s floating-point outlier columns."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    mask: Tensor | None
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bits: int = 4, symmetric: bool = True,
                 group_size: int | None = None, bias: bool = True, masked: bool = False,
                 dtype: str = "float32", device: torch.device | str | None = None,
                 activations: str | None = None, outlier_threshold: float | None = None) -> None:
        super().__init__()
        spec = QuantSpec(bits, symmetric, group_size)  # validates
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype must name a torch dtype like 'float16', got {dtype!r}")
        check_activations(spec, activations, outlier_threshold)
        self.activations, self.outlier_threshold = activations, outlier_threshold
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric, self.group_size, self.dtype_name = bits, symmetric, group_size, dtype
        n = spec.n_groups(in_features)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n, dtype=torch.int8, device=device))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device)
                             if masked else None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    def dense_weight(self) -> Tensor:
        """The ``out × in`` float weight the codes stand for (pruned entries exactly 0)."""
        w = dequantize(self.codes, self.scale, self.zero, self.spec)
        if self.mask is not None:
            w = w.masked_fill(~self.mask, 0)
        return w.to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.activations == "int8":
            return self._int8_forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def _int8_forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("a QuantizedLinear with int8 activations is inference-only (no gradient flows "
                               "through its int8 product); call .eval() or run it under torch.no_grad()")
        # Pruned entries hold code 0 on a symmetric grid, so the codes are the int8 weight as they are.
        with torch.no_grad():
            y = int8_linear(x, self.codes, self.scale[:, 0], self.bias, outlier_threshold=self.outlier_threshold)
        return y.to(x.dtype)

    def to_float(self) -> nn.Module:
        """The dense layer this one replaced (``nn.Linear``, or the ``Conv1D`` it was made from),
        holding the rounded values: what tools that read only float weights can load."""
        origin = get_record(self).origin
        layer = build_described(origin) if origin is not None else nn.Linear(
            self.in_features, self.out_features, self.bias is not None)
        layer = layer.to(device=self.codes.device, dtype=self.dtype)
        weight, bias = layer.weight, layer.bias
        assert isinstance(weight, Tensor) and (bias is None) == (self.bias is None)
        with torch.no_grad():
            weight.copy_(from_gemm(layer, self.dense_weight(), weight.shape))
            if self.bias is not None:
                assert isinstance(bias, Tensor)
                bias.copy_(self.bias)
        return layer.train(self.training)

    def format_name(self) -> str:
        """``int4:g128``, ``int8:channel``; ``:asym`` for a zero-point grid, ``:a8`` for int8
        activations."""
        groups = f"g{self.group_size}" if self.group_size is not None else "channel"
        name = f"int{self.bits}:{groups}" + ("" if self.symmetric else ":asym")
        return name + (":a8" if self.activations == "int8" else "")

    def num_parameters(self) -> int:
        """Stored weights: the kept ones (the bias, which a dense layer has too, not counted)."""
        return int(self.mask.sum()) if self.mask is not None else self.codes.numel()

    def storage_bytes(self) -> int:
        """Packed codes of the kept weights plus the scales (and zero points when asymmetric);
        the mask's index and the bias are not counted."""
        extra = self.scale.numel() * self.scale.element_size()
        if not self.symmetric:
            extra += self.zero.numel() * self.zero.element_size()
        return math.ceil(self.bits * self.num_parameters() / 8) + extra

    def entry_masks(self) -> dict[str, Tensor]:
        """Buffers whose entries outside the mask are never read (a checkpoint stores only the kept ones)."""
        return {} if self.mask is None else {"codes": self.mask}

    def init_args(self) -> dict[str, Any]:
        """Plain values with which ``QuantizedLinear(**init_args())`` rebuilds this layer's shapes."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "symmetric": self.symmetric, "group_size": self.group_size, "bias": self.bias is not None,
                "masked": self.mask is not None, "dtype": self.dtype_name, "activations": self.activations,
                "outlier_threshold": self.outlier_threshold}

    def extra_repr(self) -> str:
        outliers = "" if self.outlier_threshold is None else f", outlier_threshold={self.outlier_threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_name()}{outliers}, bias={self.bias is not None}")

    @classmethod
    def from_linear(cls, linear: nn.Module, quantized: QuantizedWeight, *, activations: str | None = None,
                    outlier_threshold: float | None = None) -> QuantizedLinear:
        """The layer for ``linear`` (``nn.Linear`` or Hugging Face ``Conv1D``) with the codes of its
        GEMM-form weight; the bias is copied, device and dtype follow the linear's weight."""
        weight = linear.weight
        assert isinstance(weight, Tensor), "a Linear or Conv1D has a weight tensor"
        rows, cols = to_gemm(linear, weight).shape
        if tuple(quantized.codes.shape) != (rows, cols):
            raise ConfigError(f"codes of shape {tuple(quantized.codes.shape)} do not fit a {rows}x{cols} weight")
        spec, bias = quantized.spec, getattr(linear, "bias", None)
        layer = cls(cols, rows, spec.bits, spec.symmetric, spec.group_size, bias is not None,
                    quantized.mask is not None, str(weight.dtype).removeprefix("torch."), weight.device,
                    activations, outlier_threshold)
        with torch.no_grad():
            layer.codes.copy_(quantized.codes)  # pruned entries hold the zero point: 0 on a symmetric grid
            layer.scale.copy_(quantized.scale)
            layer.zero.copy_(quantized.zero)
            if layer.mask is not None and quantized.mask is not None:
                layer.mask.copy_(quantized.mask)
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias.detach())
        origin = describe_layer(linear)
        if origin is not None:  # save/load rebuild the dense layer first, then this one in its place
            set_record(layer, origin=origin)
        layer.train(linear.training)
        return layer


ACTIVATIONS = (None, "int8")


def check_activations(spec: QuantSpec, activations: str | None, outlier_threshold: float | None) -> None:
    """int8 activations multiply the codes directly: a symmetric grid with one scale per row."""
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations must be None (weights only) or 'int8', got {activations!r}")
    if activations == "int8" and (not spec.symmetric or spec.group_size is not None):
        raise ConfigError("int8 activations need symmetric weights with one scale per output channel "
                          f"(symmetric=True, group_size=None), got symmetric={spec.symmetric}, "
                          f"group_size={spec.group_size}")
    if outlier_threshold is not None:
        if activations != "int8":
            raise ConfigError("outlier_threshold splits int8 activations: set activations='int8' too")
        check_outlier_threshold(outlier_threshold)
