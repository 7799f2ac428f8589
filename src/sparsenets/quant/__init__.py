"""Weight quantization: round-to-nearest and GPTQ (alone or jointly with SparseGPT pruning),
mixed precision from Hessian traces (HAWQ), and :class:`QuantizedLinear`, the layer that stores
the integer codes."""

from .gptq import QuantizedWeight, gptq_quantize_, rtn_quantize
from .layers import QuantizedLinear
from .mixed import allocate_bits, hessian_traces
from .quantize import QuantConfig, quantize_
from .spec import QuantSpec, dequantize, fake_quantize, fit_scales, quantize_codes

__all__ = ["QuantConfig", "QuantSpec", "QuantizedLinear", "QuantizedWeight", "allocate_bits", "dequantize",
           "fake_quantize", "fit_scales", "gptq_quantize_", "hessian_traces", "quantize_", "quantize_codes",
           "rtn_quantize"]
