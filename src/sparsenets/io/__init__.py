"""Sparse checkpoints: ``save(model, path)`` and ``load(path)``, one safetensors file, no pickle.

- :mod:`.encoding`: each tensor in the smallest of dense, bitmask, CSR and block encodings
  (and, for quantized layers, integer codes packed at their bit width);
- :mod:`.architecture`: how the model is described and built again (built-in, layers, or given);
- :mod:`.container`: the safetensors file and the sha256 that covers all of it;
- :mod:`.checkpoint`: :func:`save`, :func:`load`, :func:`read_checkpoint`.
"""

from ..errors import CheckpointError
from .architecture import describe_layer
from .checkpoint import load, read_checkpoint, save
from .encoding import decode, encode

__all__ = ["CheckpointError", "decode", "describe_layer", "encode", "load", "read_checkpoint", "save"]
