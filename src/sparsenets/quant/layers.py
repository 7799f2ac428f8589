"""``QuantizedLinear``: a Linear whose weight is stored as low-bit integer codes.

Weight-only quantization: the forward pass rebuilds the float weight from the codes and runs a
plain ``F.linear`` (nothing is cached, so ``state_dict`` holds exactly the codes, scales, zero
points, mask and bias). What it saves is storage, not compute.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..gemm import to_gemm
from ..io.architecture import describe_layer
from ..record import set_record
from .gptq import QuantizedWeight
from .spec import QuantSpec, dequantize


class QuantizedLinear(nn.Module):
    """``y = x · dequantize(codes)ᵀ + b``. ``codes`` (int8, out × in), ``scale`` (float32) and
    ``zero`` (int8) per output row and group of ``group_size`` inputs; ``mask`` (bool, out × in)
    for a pruned weight. ``dtype`` is the dtype of :meth:`dense_weight` and of the bias."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    mask: Tensor | None
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bits: int = 4, symmetric: bool = True,
                 group_size: int | None = None, bias: bool = True, masked: bool = False,
                 dtype: str = "float32", device: torch.device | str | None = None) -> None:
        super().__init__()
        spec = QuantSpec(bits, symmetric, group_size)  # validates
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype must name a torch dtype like 'float16', got {dtype!r}")
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
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense_weight().to(x.dtype), bias)

    def format_name(self) -> str:
        """``int4:g128``, ``int8:channel``; ``:asym`` for a zero-point grid."""
        groups = f"g{self.group_size}" if self.group_size is not None else "channel"
        return f"int{self.bits}:{groups}" + ("" if self.symmetric else ":asym")

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

    def init_args(self) -> dict[str, Any]:
        """Plain values with which ``QuantizedLinear(**init_args())`` rebuilds this layer's shapes."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "symmetric": self.symmetric, "group_size": self.group_size, "bias": self.bias is not None,
                "masked": self.mask is not None, "dtype": self.dtype_name}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_name()}, bias={self.bias is not None}")

    @classmethod
    def from_linear(cls, linear: nn.Module, quantized: QuantizedWeight) -> QuantizedLinear:
        """The layer for ``linear`` (``nn.Linear`` or Hugging Face ``Conv1D``) with the codes of its
        GEMM-form weight; the bias is copied, device and dtype follow the linear's weight."""
        weight = linear.weight
        assert isinstance(weight, Tensor), "a Linear or Conv1D has a weight tensor"
        rows, cols = to_gemm(linear, weight).shape
        if tuple(quantized.codes.shape) != (rows, cols):
            raise ConfigError(f"codes of shape {tuple(quantized.codes.shape)} do not fit a {rows}x{cols} weight")
        spec, bias = quantized.spec, getattr(linear, "bias", None)
        layer = cls(cols, rows, spec.bits, spec.symmetric, spec.group_size, bias is not None,
                    quantized.mask is not None, str(weight.dtype).removeprefix("torch."), weight.device)
        with torch.no_grad():
            layer.codes.copy_(quantized.codes)
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
