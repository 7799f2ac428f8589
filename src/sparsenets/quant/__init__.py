"""Weight quantization: round-to-nearest and GPTQ (alone or jointly with SparseGPT pruning),
and :class:`QuantizedLinear`, the layer that stores the integer codes."""

from .gptq import QuantizedWeight, gptq_quantize_, rtn_quantize
from .layers import QuantizedLinear
from .quantize import QuantConfig, quantize_
from .spec import QuantSpec, dequantize, fake_quantize, fit_scales, quantize_codes

__all__ = ["QuantConfig", "QuantSpec", "QuantizedLinear", "QuantizedWeight", "dequantize", "fake_quantize",
           "fit_scales", "gptq_quantize_", "quantize_", "quantize_codes", "rtn_quantize"]
